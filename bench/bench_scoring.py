"""Benchmark: COCO bbox scoring of a COCO-val-sized input, pycocotools against faster-coco-eval and `score`.

    .venv/bin/python bench/bench_scoring.py [--images 5000] [--rounds 3] [--skip-pycocotools]

Generates, deterministically and into a temporary folder, ground truth shaped like COCO val2017 (5,000 images,
80 categories with COCO's ids, about 7.3 boxes per image, crowd regions, `area` unlike the box area as for
segmented objects, two categories without ground truth, some images without any) and a detections file of 100
per image (jittered and confused hits, duplicates, background boxes, scores rounded to 5 digits so ties occur).
Times each scorer as a whole `python -c` process (imports and JSON reading included), interleaved for `--rounds`
rounds, checks that the 12 stats agree, and prints the ratios and where the project's time goes: pycocotools and
faster-coco-eval as their users call them, the project's `score` with `faster_coco_eval` and with `fast` (the array
core, mitdet.engine.coco_fast), and `score_file` with `fast` (what `mitdet score` runs: the bulk entry checks,
the 12 stats' text and the per-class table included). Then it measures in process (CPU seconds) the parts of
faster-coco-eval's C++ evaluator and of the array core on the same inputs.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# COCO 2017's 80 category ids (1..90 with gaps) and names
COCO_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
COCO_NAMES = (
    "person bicycle car motorcycle airplane bus train truck boat traffic_light fire_hydrant stop_sign parking_meter "
    "bench bird cat dog horse sheep cow elephant bear zebra giraffe backpack umbrella handbag tie suitcase frisbee "
    "skis snowboard sports_ball kite baseball_bat baseball_glove skateboard surfboard tennis_racket bottle "
    "wine_glass cup fork knife spoon bowl banana apple sandwich orange broccoli carrot hot_dog pizza donut cake "
    "chair couch potted_plant bed dining_table toilet tv laptop mouse remote keyboard cell_phone microwave oven "
    "toaster sink refrigerator book clock vase scissors teddy_bear hair_drier toothbrush").split()
NO_GT = (80, 89)  # toaster, hair drier: categories without ground truth, as rare classes are in small splits
SIZES = [(640, 480), (480, 640), (640, 427), (427, 640), (500, 375), (640, 360), (612, 612)]


def _boxes(rng, n: int, w: int, h: int, area_range=(40, 120_000)) -> np.ndarray:
    """n [x, y, w, h] boxes inside a w x h image, area log-uniform (COCO's small/medium/large mix)."""
    area = np.minimum(np.exp(rng.uniform(*np.log(area_range), n)), 0.9 * w * h)
    aspect = np.exp(rng.normal(0, 0.5, n))
    bw = np.clip(np.sqrt(area * aspect), 2, w - 1)
    bh = np.clip(area / bw, 2, h - 1)
    return np.stack([rng.uniform(0, w - bw), rng.uniform(0, h - bh), bw, bh], axis=1)


def make_ground_truth(n_images: int, seed: int = 0) -> dict:
    """COCO-val-shaped ground truth of n_images images (see the module docstring)."""
    rng = np.random.default_rng(seed)
    cats = [{"id": i, "name": n.replace("_", " "), "supercategory": "thing"}
            for i, n in zip(COCO_IDS, COCO_NAMES, strict=True)]
    with_gt = np.array([i for i in COCO_IDS if i not in NO_GT])
    freq = 1.0 / np.arange(1, len(with_gt) + 1) ** 0.9  # person-heavy, long tail
    freq /= freq.sum()
    ids = np.sort(rng.choice(np.arange(1, 600_000), n_images, replace=False))
    images, anns = [], []
    for image_id in ids.tolist():
        w, h = SIZES[int(rng.integers(len(SIZES)))]
        images.append({"id": image_id, "file_name": f"{image_id:012d}.jpg", "width": w, "height": h})
        n = 0 if rng.random() < 0.01 else int(rng.poisson(7.3))
        classes = rng.choice(with_gt, size=min(len(with_gt), 1 + int(rng.poisson(2))), replace=False, p=freq)
        for box, cat in zip(_boxes(rng, n, w, h), rng.choice(classes, n), strict=True):
            crowd = int(rng.random() < 0.01)
            if crowd:
                box = _boxes(rng, 1, w, h, (20_000, 150_000))[0]
            box = np.round(box, 2).tolist()
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": int(cat), "bbox": box,
                         "area": round(box[2] * box[3] * float(rng.uniform(0.45, 0.95)), 2), "iscrowd": crowd})
    return {"images": images, "annotations": anns, "categories": cats}


def make_detections(gt: dict, per_image: int = 100, seed: int = 1) -> list[dict]:
    """per_image detections for every image: hits (jittered, some of another class), duplicates, background."""
    rng = np.random.default_rng(seed)
    by_image: dict[int, list[dict]] = {}
    for a in gt["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    cat_ids = np.array([c["id"] for c in gt["categories"]])
    dets = []
    for im in gt["images"]:
        w, h = im["width"], im["height"]
        rows = []
        for a in by_image.get(im["id"], []):
            x, y, bw, bh = a["bbox"]
            for j in range(int(rng.integers(1, 5))):
                s = 0.03 * (1 + 2 * j) * max(bw, bh)  # the first hit close, later ones looser
                box = [x + rng.normal(0, s), y + rng.normal(0, s), bw * rng.uniform(0.85, 1.15),
                       bh * rng.uniform(0.85, 1.15)]
                cat = a["category_id"] if rng.random() > 0.15 else int(rng.choice(cat_ids))
                rows.append((cat, box, rng.beta(4, 2) / (1 + j)))
        n_bg = max(0, per_image - len(rows))
        near = [a["category_id"] for a in by_image.get(im["id"], [])]
        for box in _boxes(rng, n_bg, w, h):
            cat = int(rng.choice(near)) if near and rng.random() < 0.5 else int(rng.choice(cat_ids))
            rows.append((cat, box.tolist(), rng.beta(1, 6)))
        rows.sort(key=lambda r: -r[2])
        for cat, box, sc in rows[:per_image]:
            bx = [round(max(0.0, box[0]), 2), round(max(0.0, box[1]), 2), round(box[2], 2), round(box[3], 2)]
            dets.append({"image_id": im["id"], "category_id": int(cat), "bbox": bx, "score": round(float(sc), 5)})
    return dets


PROGRAMS = {
    "pycocotools": """
import contextlib, io, json, sys, time
t0 = time.perf_counter()
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
with contextlib.redirect_stdout(io.StringIO()):
    gt = COCO(sys.argv[1]); dt = gt.loadRes(sys.argv[2])
    ev = COCOeval(gt, dt, "bbox"); ev.evaluate(); ev.accumulate(); ev.summarize()
print(json.dumps({"stats": [float(s) for s in ev.stats], "inner_s": time.perf_counter() - t0}))
""",
    "faster_coco_eval": """
import json, sys, time
t0 = time.perf_counter()
from faster_coco_eval import COCO, COCOeval_faster
gt = COCO(sys.argv[1]); dt = gt.loadRes(sys.argv[2])
ev = COCOeval_faster(gt, dt, "bbox", print_function=lambda *a: None); ev.evaluate(); ev.accumulate(); ev.summarize()
print(json.dumps({"stats": [float(s) for s in ev.stats[:12]], "inner_s": time.perf_counter() - t0}))
""",
    "score": """
import json, sys, time
t0 = time.perf_counter()
from mitdet.engine.scoring import STAT_KEYS, score
s = score(sys.argv[1], sys.argv[2])
print(json.dumps({"stats": [-1.0 if s.summary[k] is None else s.summary[k] for k in STAT_KEYS],
                  "inner_s": time.perf_counter() - t0, "timings": s.timings}))
""",
    "score_fast": """
import json, sys, time
t0 = time.perf_counter()
from mitdet.engine.scoring import STAT_KEYS, score
s = score(sys.argv[1], sys.argv[2], scorer="fast")
print(json.dumps({"stats": [-1.0 if s.summary[k] is None else s.summary[k] for k in STAT_KEYS],
                  "inner_s": time.perf_counter() - t0, "timings": s.timings}))
""",
    "score_file_fast": """
import contextlib, io, json, sys, time
t0 = time.perf_counter()
from mitdet.engine.score_files import score_file, stats_text
from mitdet.engine.scoring import STAT_KEYS, per_class_table
s = score_file(sys.argv[1], sys.argv[2], scorer="fast")
with contextlib.redirect_stdout(io.StringIO()):
    print(stats_text(s.summary)); print(per_class_table(s))
print(json.dumps({"stats": [-1.0 if s.summary[k] is None else s.summary[k] for k in STAT_KEYS],
                  "inner_s": time.perf_counter() - t0, "timings": s.timings}))
""",
}


def run_process(name: str, gt_path: Path, det_path: Path) -> tuple[float, float, dict]:
    """(wall seconds, CPU seconds (user + system) of one whole scoring process, what it printed). CPU time is
    what other jobs on shared cores disturb least."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    argv = [sys.executable, "-c", PROGRAMS[name], str(gt_path), str(det_path)]
    out = subprocess.run(argv, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return wall, cpu, json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ in-process parts
def _cpu(fn):
    """(result, CPU seconds of this process): a figure the other jobs on shared cores disturb less than wall time."""
    t = time.process_time()
    out = fn()
    return out, time.process_time() - t


def evaluator_parts(gt_path: Path, det_path: Path) -> dict[str, float]:
    """CPU seconds of the parts of faster-coco-eval's C++ evaluator on score's own inputs, and of the array core."""
    import faster_coco_eval.faster_eval_api_cpp as _C
    from faster_coco_eval.core.cocoeval import Params

    from mitdet.engine import scoring as S

    with S._no_gc():
        coco_gt = S.load_coco(gt_path, scorer="faster_coco_eval")  # its C++ ground truth too
        prep = coco_gt.mitdet_prepared
        det = S.detection_arrays(S.read_results(det_path), str(det_path))
        ids = prep.image_ids
        rows = np.flatnonzero(S._scored(det, prep, ids, str(det_path))[1])
        p = Params(iouType="bbox")
        p.imgIds, p.catIds = ids.tolist(), prep.cat_ids.tolist()
        pairs = S._DetectionPairs(prep, det, rows, ids, max_dets=p.maxDets[-1])
        cpp_dt, t_dt = _cpu(lambda: pairs.cpp_dataset(det))
        ious, t_iou = _cpu(lambda: pairs.cpp_ious(prep, det))
        none = [[[]] * len(p.catIds) for _ in p.imgIds]
        args = (p.imgIds, p.catIds, True)
        out = {"detections to C++ dicts": t_dt, "IoUs as nested lists": t_iou,
               "C++ evaluate+accumulate": _cpu(lambda: _C.COCOevalEvaluateAccumulate(p, ious, prep.cpp_gt, cpp_dt,
                                                                                      *args))[1],
               "  of it: empty image x class grid": _cpu(lambda: _C.COCOevalEvaluateAccumulate(
                   p, none, _C.Dataset(), _C.Dataset(), *args))[1],
               "  of it: detections alone, no GT": _cpu(lambda: _C.COCOevalEvaluateAccumulate(
                   p, none, _C.Dataset(), cpp_dt, *args))[1]}
        evaluated, out["C++ evaluate alone (matching)"] = _cpu(lambda: _C.COCOevalEvaluateImages(
            p.areaRng, p.maxDets[-1], p.iouThrs, ious, prep.cpp_gt, cpp_dt, *args))
        out["C++ accumulate alone"] = _cpu(lambda: _C.COCOevalAccumulate(copy.deepcopy(p), evaluated))[1]
        ref = _C.COCOevalEvaluateAccumulate(p, ious, prep.cpp_gt, cpp_dt, *args)
        out.update(array_core_parts(prep, det, rows, ids))
        prec, rec = out.pop("arrays")
    out["array core max |difference| from faster-coco-eval"] = max(
        _max_diff(prec[..., -1], np.asarray(ref["precision"])[..., -1]), _max_diff(rec, np.asarray(ref["recall"])))
    return out


def array_core_parts(prep, det, rows: np.ndarray, ids: np.ndarray) -> dict:
    """CPU seconds of coco_fast's steps on score's inputs (as scoring._eval_fast calls them), and its arrays."""
    from mitdet.engine import coco_fast as F
    from mitdet.engine.scoring import fast_inputs

    params = F.Params()
    gt, dt = fast_inputs(prep, det, rows, ids)
    out = {}
    (pairs, _, _), out["array core: grouping by pair"] = _cpu(lambda: F.group_pairs(len(prep.cat_ids), gt, dt, 100))
    cand, out["array core: candidates and IoUs"] = _cpu(lambda: F.candidates(pairs, params))
    _, out["array core: match priorities"] = _cpu(lambda: F.priorities(cand))
    matches, out["array core: matching, all of it"] = _cpu(lambda: F.match(pairs, params))
    out["arrays"], out["array core: accumulation"] = _cpu(lambda: F.accumulate(pairs, matches, params))
    out["array core: matched (area, IoU, detection) entries"] = float(len(matches.det))
    return out


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    assert ((a > -1) == (b > -1)).all(), "the array core marks other cells 'no ground truth'"
    return float(np.abs(a - b).max())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=5000, help="images in the generated split (COCO val: 5000)")
    ap.add_argument("--per-image", type=int, default=100, help="detections per image")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the three processes")
    ap.add_argument("--skip-pycocotools", action="store_true", help="time only faster-coco-eval and score")
    ap.add_argument("--no-parts", action="store_true", help="skip the in-process measurement of the evaluator")
    ap.add_argument("--only", nargs="+", choices=list(PROGRAMS), help="time only these processes")
    ap.add_argument("--dir", default=None, help="where to write the generated files (default: the system temp dir)")
    args = ap.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="mitdet-bench-scoring-", dir=args.dir))
    try:
        gt_path, det_path = generate(tmp, args.images, args.per_image)
        skip = {"pycocotools"} if args.skip_pycocotools else set()
        names = [n for n in (args.only or PROGRAMS) if n not in skip]
        walls: dict[str, list[float]] = {n: [] for n in names}
        cpus: dict[str, list[float]] = {n: [] for n in names}
        outs: dict[str, dict] = {}
        for r in range(args.rounds):
            for n in names:
                wall, cpu, outs[n] = run_process(n, gt_path, det_path)
                walls[n].append(wall)
                cpus[n].append(cpu)
                print(f"round {r + 1}: {n:<17} {wall:6.2f} s wall, {cpu:6.2f} s CPU, load {os.getloadavg()[0]:.1f}",
                      flush=True)
        parts = {} if args.no_parts else evaluator_parts(gt_path, det_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report(walls, outs, parts)
    report_ratios("CPU", cpus)
    return 0


def generate(tmp: Path, n_images: int, per_image: int) -> tuple[Path, Path]:
    """Write the ground truth and detections files; (their paths)."""
    t0 = time.perf_counter()
    gt = make_ground_truth(n_images)
    dets = make_detections(gt, per_image)
    gt_path, det_path = tmp / "instances_val.json", tmp / "detections.json"
    gt_path.write_text(json.dumps(gt))
    det_path.write_text(json.dumps(dets))
    crowd = sum(a["iscrowd"] for a in gt["annotations"])
    print(f"generated {len(gt['images'])} images, {len(gt['annotations'])} GT boxes ({crowd} crowd), "
          f"{len(dets)} detections ({det_path.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t0:.1f} s",
          flush=True)
    return gt_path, det_path


def report_ratios(kind: str, seconds: dict[str, list[float]]) -> None:
    """Median seconds of each process and the project's ratios to the libraries (per round too)."""
    med = {n: statistics.median(w) for n, w in seconds.items()}
    print(f"\nmedian whole-process {kind} seconds: " + ", ".join(f"{n} {s:.2f}" for n, s in med.items()))
    for ours in ("score", "score_fast", "score_file_fast"):
        for ref in ("pycocotools", "faster_coco_eval"):
            if ref in med and ours in med:
                per_round = [a / b for a, b in zip(seconds[ref], seconds[ours], strict=True)]
                print(f"{ours} vs {ref} ({kind}): {med[ref] / med[ours]:.1f}x (per round: "
                      f"{', '.join(f'{x:.1f}' for x in per_round)})")


def report(walls: dict[str, list[float]], outs: dict[str, dict], parts: dict[str, float]) -> None:
    """Wall medians and ratios, the 12 stats' agreement, the breakdowns of `score` and the evaluators' parts."""
    report_ratios("wall", walls)
    ref_name = next((n for n in ("pycocotools", "faster_coco_eval") if n in outs), next(iter(outs)))
    for n, o in outs.items():
        if n == ref_name:
            continue
        diff = max(abs(a - b) for a, b in zip(o["stats"], outs[ref_name]["stats"], strict=True))
        print(f"12 stats, max |{n} - {ref_name}|: {diff:.2e}")
    for n in ("score", "score_fast", "score_file_fast"):
        if n in outs:
            t = outs[n]["timings"]
            rest = walls[n][-1] - sum(t.values())
            print(f"{n}'s breakdown (last round, wall s): " + ", ".join(f"{k} {v:.3f}" for k, v in t.items())
                  + f"; process start, imports and the rest {rest:.3f}")
    if parts:
        print("evaluator parts (in process, CPU s):")
        for k, v in parts.items():
            print(f"  {k:<36} {v:.3g}")


if __name__ == "__main__":
    sys.exit(main())
