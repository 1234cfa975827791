"""`mitdet`: the trained model from the command line (predict, export, score, compare, monitor).

Thin over the library, like the stage scripts: each command parses its arguments and calls src/mitdet; a
MitdetError (a missing model, a bad file, an absent device) prints one `error:` line (mitdet.stage.run).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import NoReturn

from mitdet import stage
from mitdet.errors import MitdetError
from mitdet.params import DEFAULT_SCORER, SCORERS


class UsageError(MitdetError, ValueError):
    """A command-line value that cannot be used (a device torch does not see, a threshold out of range)."""

    exit_code = 2


def _device(name: str):
    from mitdet.engine.device import resolve_device
    try:
        return resolve_device(name)
    except (RuntimeError, ValueError) as err:
        raise UsageError(str(err), where="--device") from None


def _unit_interval(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not in [0, 1]")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


# ------------------------------------------------------------------------------------------------ predict
def cmd_predict(args) -> int:
    """Detections on image files and folders: one COCO-format JSON, optional drawings; 1 when files were skipped."""
    from mitdet.engine.predict_files import draw_predictions, predict_files
    from mitdet.io import write_json
    from mitdet.models import load_inference_model

    device = _device(args.device)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    model, spec = load_inference_model(args.model, device=str(device))
    result = predict_files(model, spec, args.paths, device, batch_size=args.batch_size, num_workers=args.workers,
                           amp=args.amp, score_thresh=args.score, model_dir=str(args.model),
                           progress=sys.stderr.isatty(), aux_dir=args.aux)
    doc = result.document
    write_json(args.out, doc, indent=None)
    threshold = doc["info"]["score_threshold"]
    print(f"{spec['backbone']} ({args.model}, step {spec.get('step')}) on {result.device}: {len(doc['images'])} "
          f"images, {len(doc['annotations'])} detections with score >= {threshold:g} in {result.seconds:.1f} s")
    print(f"wrote {args.out} (COCO format: images, categories, annotations with scores)")
    if args.draw:
        draw_score = max(threshold, 0.3) if args.draw_score is None else args.draw_score
        drawn = draw_predictions(doc, args.draw, draw_score)
        print(f"drew {len(drawn)} images with detections >= {draw_score:g} in {args.draw}")
    if result.not_images:
        print(f"left alone {result.not_images} file(s) in the folders whose names are not image files")
    for path, why in result.skipped:
        print(f"skipped {path}: {why}", file=sys.stderr)
    if result.skipped:
        print(f"{len(result.skipped)} file(s) skipped (listed above)", file=sys.stderr)
    return 1 if result.skipped else 0


def add_predict(sub) -> None:
    p = sub.add_parser("predict", help="detect objects in image files or folders (recursively)",
                       description=cmd_predict.__doc__)
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders (searched recursively)")
    p.add_argument("--model", required=True, help="saved model folder (models/<backbone>: model.json + weights)")
    p.add_argument("--aux", metavar="DIR", default=None,
                   help="RGB+X models: the folder of aligned aux images, one per image by file stem (.png/.npy; "
                        "not needed for .npy images holding 3 + N channels)")
    p.add_argument("--out", default="predictions.json", help="output JSON (default: predictions.json)")
    p.add_argument("--score", type=_unit_interval, default=None,
                   help="keep detections with at least this score (default: the model's own roi score threshold)")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="images per forward pass (default 8)")
    p.add_argument("--device", default="auto", help="auto (cuda, else mps, else cpu), cpu, cuda, cuda:N or mps")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"],
                   help="half precision for the backbone on CUDA, as the evaluate stage (default auto)")
    p.add_argument("--workers", type=int, default=2, help="image-loading processes (default 2; 0 = in process)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's own)")
    p.add_argument("--draw", metavar="DIR", help="also write each image with its boxes, classes and scores here")
    p.add_argument("--draw-score", type=_unit_interval, default=None,
                   help="lowest score drawn (default: the larger of --score and 0.3)")
    p.set_defaults(func=cmd_predict)


# ------------------------------------------------------------------------------------------------ export
def cmd_export(args) -> int:
    """The whole detector (resize, normalisation, NMS, boxes in image pixels) to ONNX, checked with onnxruntime."""
    from mitdet.models import load_inference_model
    from mitdet.models.export import OPSET, export_checked, input_text, load_check_inputs, require_onnx

    require_onnx()  # before loading anything: say at once how to install it
    model, spec = load_inference_model(args.model, device="cpu")
    images = load_check_inputs(spec, args.check_images, args.check_count, aux_dir=args.check_aux)
    report = export_checked(model, spec, args.out, images, box_tol=args.box_tol, score_tol=args.score_tol)
    print(f"wrote {report.path}: {spec['backbone']} (step {spec.get('step')}), opset {OPSET}, input "
          f"{input_text(spec).removeprefix('image: ')} of any size; outputs boxes (xyxy pixels), scores, labels")
    print(report.text())
    return 0


def add_export(sub) -> None:
    p = sub.add_parser("export", help="export the detector to ONNX (needs the export extra)",
                       description=cmd_export.__doc__)
    p.add_argument("out", metavar="OUT.onnx", help="file to write")
    p.add_argument("--model", required=True, help="saved model folder (models/<backbone>)")
    p.add_argument("--format", choices=["onnx"], default="onnx", help="export format (onnx)")
    p.add_argument("--check-images", nargs="+", metavar="PATH", default=None,
                   help="images or folders the export is checked on (default: the first of data/index/val.jsonl)")
    p.add_argument("--check-aux", metavar="DIR", default=None,
                   help="RGB+X models: the aux images of --check-images, by file stem (as predict --aux)")
    p.add_argument("--check-count", type=_positive_int, default=4, help="images checked at most (default 4)")
    p.add_argument("--box-tol", type=float, default=0.1, help="largest box difference allowed, pixels (default 0.1)")
    p.add_argument("--score-tol", type=float, default=1e-3, help="largest score difference allowed (default 0.001)")
    p.set_defaults(func=cmd_export)


# ------------------------------------------------------------------------------------------------ score
def cmd_score(args) -> int:
    """COCO bbox metrics of a predictions file against a ground truth, with the evaluate stage's scoring code."""
    from mitdet.engine.score_files import score_file, stats_text, write_score_outputs
    from mitdet.engine.scoring import per_class_table

    scores = score_file(args.ground_truth, args.predictions, scorer=args.scorer)
    print(stats_text(scores.summary))
    print()
    print(per_class_table(scores, args.top_k))
    if args.out:
        written = write_score_outputs(scores, args.out)
        print(f"wrote {' and '.join(map(str, written))}")
    return 0


def add_score(sub) -> None:
    p = sub.add_parser("score", help="score a COCO results file against a COCO ground truth",
                       description=cmd_score.__doc__ + " PREDICTIONS is a COCO results list, or the file "
                       "`mitdet predict` writes (its images are matched to the ground truth's by file_name).")
    p.add_argument("ground_truth", metavar="GT.json", help="COCO instances JSON (images, annotations, categories)")
    p.add_argument("predictions", metavar="PREDICTIONS.json", help="COCO results list or `mitdet predict` output")
    p.add_argument("--out", metavar="DIR", help="write eval.json and per_class.json here (the evaluate stage's format)")
    p.add_argument("--scorer", choices=list(SCORERS), default=DEFAULT_SCORER,
                   help=f"COCOeval implementation, all with pycocotools' numbers: fast (numpy core), "
                   f"faster_coco_eval (C++) or pycocotools (the reference); default {DEFAULT_SCORER}")
    p.add_argument("--top-k", type=_positive_int, default=10, help="rows of the top and bottom class tables")
    p.set_defaults(func=cmd_score)


# ------------------------------------------------------------------------------------------------ compare
def cmd_compare(args) -> int:
    """Per-class AP of the workspace against REV (default HEAD), per backbone, largest drops first."""
    from mitdet.compare import compare, comparison_text, drops_over

    comparisons = compare(args.root, args.rev, args.backbone)
    print(comparison_text(comparisons, args.rev))
    if args.max_drop is None:
        return 0
    drops = drops_over(comparisons, args.max_drop)
    for backbone, row in drops:
        print(f"REGRESSION {backbone} {row.name}: AP {row.change:+.1f} points (more than --max-drop "
              f"{args.max_drop:g})", file=sys.stderr)
    return 1 if drops else 0


def add_compare(sub) -> None:
    p = sub.add_parser("compare", help="per-class AP of the workspace against a git revision (DVC)",
                       description=cmd_compare.__doc__)
    p.add_argument("rev", nargs="?", default="HEAD", metavar="REV", help="git revision (default HEAD)")
    p.add_argument("--max-drop", type=float, default=None, metavar="X",
                   help="exit 1 when any class's AP drops by more than X AP points, on the 0-100 scale "
                        "(--max-drop 2 allows 41.5 -> 39.5, not 39.4)")
    p.add_argument("--backbone", action="append", default=None, help="only this backbone (repeatable)")
    p.add_argument("--root", default=".", help="project folder (default: here)")
    p.set_defaults(func=cmd_compare)


# ------------------------------------------------------------------------------------------------ monitor
def cmd_monitor(args) -> int:
    """Watch a training run from its logs until it finishes, then print its summary."""
    from mitdet.engine.watch import latest_backbone, watch

    backbone = args.backbone or latest_backbone(args.root)
    try:
        return watch(args.root, backbone, interval=args.interval, once=args.once, timeout=args.timeout)
    except KeyboardInterrupt:
        return 130


def add_monitor(sub) -> None:
    from mitdet.params import BACKBONE_NAMES
    p = sub.add_parser("monitor", help="watch a training run (loss, lr, speed, ETA, validation, alerts)",
                       description=cmd_monitor.__doc__ + " Without a terminal: one plain line per logged step.")
    p.add_argument("backbone", nargs="?", choices=BACKBONE_NAMES, metavar="BACKBONE",
                   help="the run to watch (default: the one whose log changed last)")
    p.add_argument("--once", action="store_true", help="print one view (or the summary of a finished run) and exit")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes (default 2)")
    p.add_argument("--timeout", type=float, default=0.0, help="give up (exit 1) after this many seconds; 0 = never")
    p.add_argument("--root", default=".", help="project folder (default: here)")
    p.set_defaults(func=cmd_monitor)


# ------------------------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mitdet", description="Use a trained mitdet model: predict, export, score, compare, monitor.",
        epilog="Exit codes: 0 done; 1 a problem (printed as one `error:` line), or for predict some files skipped, "
               "for compare a drop past --max-drop; 2 a bad command line.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (add_predict, add_export, add_score, add_compare, add_monitor):
        add(sub)
    return parser


def dispatch(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit code (a MitdetError propagates)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)


def main(argv: list[str] | None = None) -> NoReturn:
    """The console script: `dispatch`, with a MitdetError as one `error:` line and its exit code."""
    try:
        stage.run(lambda: dispatch(argv))
    except BrokenPipeError:  # `mitdet score ... | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)


if __name__ == "__main__":
    main()
