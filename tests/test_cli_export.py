"""`mitdet export --format onnx`: the whole detector as one ONNX graph, checked against PyTorch with onnxruntime."""
from __future__ import annotations

import contextlib
import io
import json
import sys

import numpy as np
import pytest

from mitdet import cli
from tests.cli_fixtures import run_cli, train_tiny_model, write_image_folder
from tests.conftest import FIXTURES

pytest.importorskip("onnxruntime", reason="the export extra is not installed (pip install -e '.[export]')")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return train_tiny_model(tmp_path_factory.mktemp("trained"))


REAL = FIXTURES / "coco2017-tiny50" / "val2017"
needs_real = pytest.mark.skipif(not REAL.is_dir(), reason=f"real COCO fixtures not found at {FIXTURES}")


def _images(folder, real: bool = False):
    write_image_folder(folder, real_photos=REAL if real and REAL.is_dir() else None, broken=False)
    return folder


def _export(capsys, model_dir, out, folder, *extra):
    return run_cli(["export", "--model", str(model_dir), "--format", "onnx", str(out), "--check-images", str(folder),
                    "--check-count", "12", *extra], capsys)


@pytest.fixture(scope="module")
def exported(model_dir, tmp_path_factory):
    """One export, checked on the generated images and (when present) 4 real photos: (folder, file, its output)."""
    root = tmp_path_factory.mktemp("exported")
    folder = _images(root / "images", real=True)
    out, err = io.StringIO(), io.StringIO()  # a module fixture has no capsys: capture by hand
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as done:
        cli.main(["export", "--model", str(model_dir), "--format", "onnx", str(root / "m.onnx"), "--check-images",
                  str(folder), "--check-count", "12"])
    assert done.value.code == 0, err.getvalue()
    return folder, root / "m.onnx", out.getvalue()


def _session(path):
    import onnxruntime as ort
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_export_checks_parity_and_writes_metadata(exported):
    import onnx

    folder, path, out = exported
    n = len([p for p in folder.rglob("*") if p.suffix in (".jpg", ".png")])
    assert f"checked on {n} image(s) with onnxruntime" in out and "largest difference: boxes" in out
    assert "0 unmatched beyond score ties" in out
    graph = onnx.load(str(path))
    assert graph.opset_import[0].version == 17
    meta = {p.key: p.value for p in graph.metadata_props}
    assert meta["mitdet_backbone"] == "mit_b0" and meta["mitdet_score_threshold"] == "0.05"
    assert [c["id"] for c in json.loads(meta["mitdet_categories"])] == [3, 7]
    dims = [d.dim_param or d.dim_value for d in graph.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["height", "width", 3]


@needs_real
def test_onnx_agrees_with_pytorch_at_sizes_it_was_not_traced_on(model_dir, exported):
    import cv2
    import torch

    from mitdet.models import load_inference_model
    from mitdet.models.export import OnnxDetector, match_detections

    folder, path, _ = exported
    session = _session(path)
    model, spec = load_inference_model(model_dir)
    wrapper = OnnxDetector(model, spec["model"]["min_size"], spec["model"]["max_size"]).eval()
    photos = sorted(folder.glob("0000*.jpg"))
    assert len(photos) == 4
    total = 0
    for photo in photos:
        rgb = np.ascontiguousarray(cv2.imread(str(photo))[:, :, ::-1])
        for image in (rgb, np.ascontiguousarray(rgb[: rgb.shape[0] // 2, :: 2])):  # new heights and widths
            with torch.no_grad():
                ref = tuple(t.numpy() for t in wrapper(torch.from_numpy(image)))
            got = tuple(session.run(None, {"image": image}))
            parity = match_detections(ref, got, score_tol=1e-3)
            assert parity.unexplained == 0 and parity.box_diff < 0.05 and parity.score_diff < 1e-4, parity
            assert got[0].dtype == np.float32 and got[2].dtype == np.int64
            h, w = image.shape[:2]
            assert (got[0][:, 0::2] <= w).all() and (got[0][:, 1::2] <= h).all() and (got[0] >= 0).all()
            total += parity.matched
    assert total > 0


def test_onnx_is_close_to_mitdet_predict(model_dir, exported, tmp_path, capsys):
    """The graph resizes as the loader does (bilinear; OpenCV's rounding differs by at most one grey level)."""
    import cv2

    from mitdet.models.export import match_detections

    folder, path, _ = exported
    assert run_cli(["predict", "--model", str(model_dir), str(folder), "--out", str(tmp_path / "p.json"),
                    "--workers", "0", "--batch-size", "1"], capsys)[0] == 0
    doc = json.loads((tmp_path / "p.json").read_text())
    session, label = _session(path), {3: 1, 7: 2}
    matched = total = 0
    for im in doc["images"]:
        dets = [a for a in doc["annotations"] if a["image_id"] == im["id"]]
        ref = (np.array([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in dets)]).reshape(-1, 4),
               np.array([a["score"] for a in dets]), np.array([label[a["category_id"]] for a in dets]))
        rgb = np.ascontiguousarray(cv2.imread(im["path"], cv2.IMREAD_COLOR)[:, :, ::-1])
        parity = match_detections(ref, tuple(session.run(None, {"image": rgb})), score_tol=0.02)
        matched, total = matched + parity.matched, total + parity.torch_n
        assert parity.box_diff < 1.5 and parity.score_diff < 0.02, (im["file_name"], parity)
    assert total and matched >= 0.8 * total


def test_a_disagreeing_graph_fails_and_writes_nothing(model_dir, tmp_path, capsys, monkeypatch):
    from mitdet.models import export

    real = export.check_parity

    def off_by_a_pixel(path, wrapper, images, score_tol):
        return [export.Parity(p.torch_n, p.onnx_n, p.matched, 1.5, p.score_diff, p.unexplained)
                for p in real(path, wrapper, images, score_tol)]

    monkeypatch.setattr(export, "check_parity", off_by_a_pixel)
    code, _, err = _export(capsys, model_dir, tmp_path / "m.onnx", _images(tmp_path / "images"))
    assert code == 1 and err.startswith("error: ") and "disagrees with PyTorch" in err and "boxes 1.5 px" in err
    assert not (tmp_path / "m.onnx").exists() and not list(tmp_path.glob(".m.onnx*"))


def test_without_onnxruntime_it_says_how_to_install_it(model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    code, _, err = _export(capsys, model_dir, tmp_path / "m.onnx", tmp_path)
    assert code == 1 and err.count("\n") == 1
    assert err.startswith("error: onnxruntime is not installed") and "pip install" in err and "[export]" in err


def test_matching_ignores_the_order_of_tied_detections():
    from mitdet.models.export import match_detections

    boxes = np.array([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]], np.float32)
    scores, labels = np.array([0.5, 0.5, 0.5], np.float32), np.array([1, 1, 2])
    a = (boxes, scores, labels)
    b = (boxes[::-1] + 0.01, scores[::-1], labels[::-1])
    parity = match_detections(a, b, score_tol=1e-3)
    assert parity.matched == 3 and parity.unexplained == 0 and parity.box_diff == pytest.approx(0.01, abs=1e-5)
    # top-k cut among ties: a detection one side kept at the lowest score is not a fault; one above it is
    cut = match_detections(a, (boxes[:2], scores[:2], labels[:2]), score_tol=1e-3)
    assert cut.matched == 2 and cut.unexplained == 0
    high = (boxes, np.array([0.9, 0.5, 0.5], np.float32), labels)
    assert match_detections(high, (boxes[1:], scores[1:], labels[1:]), score_tol=1e-3).unexplained == 1
