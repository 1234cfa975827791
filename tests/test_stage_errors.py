"""Every stage script fails on a user's mistake with one `error:` line naming the file or field, no traceback.

Each case runs `stages/<x>.py` as a subprocess in a tmp project folder laid out with just what that stage needs
(a params.yaml copied from the repo with small changes, a manifest, an index, a model folder). No training.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mitdet import stage
from mitdet.errors import DataError, ParamsError
from tests.train_fixtures import write_index

ROOT = Path(__file__).resolve().parents[1]
B = "mit_b0"
STAGES = {"prepare_data": [], "build_index": [], "train": ["--backbone", B], "evaluate": ["--backbone", B],
          "report": []}


def write_params(root: Path, **changes) -> None:
    """The repo's params.yaml with `changes` ("a.b.c": value) applied, written to `root/params.yaml`."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["evaluate"].update(device="cpu", threads=1, num_workers=0)  # quick, and the same on any machine
    raw["index"]["workers"] = 1
    for dotted, value in changes.items():
        *parents, key = dotted.split(".")
        node = raw
        for p in parents:
            node = node[p]
        node[key] = value
    (root / "params.yaml").write_text(yaml.safe_dump(raw))


def run_stage(root: Path, name: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):  # a plain run, even when pytest runs under torchrun
        env.pop(key, None)
    return subprocess.run([sys.executable, str(ROOT / "stages" / f"{name}.py"), *STAGES[name]], cwd=root, env=env,
                          capture_output=True, text=True, timeout=timeout)


def assert_one_error_line(proc: subprocess.CompletedProcess, code: int, *names: str) -> str:
    """The stage exited `code` with stderr exactly one `error: ` line mentioning each of `names`."""
    lines = proc.stderr.splitlines()
    assert proc.returncode == code, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    for name in names:
        assert name in lines[0], lines[0]
    return lines[0]


def test_run_turns_a_mitdet_error_into_one_line_and_keeps_bugs_loud(capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)

    def bad_params():
        raise ParamsError("is not valid YAML: line 1\n  column 3", where="params.yaml", fix="fix it")

    with pytest.raises(SystemExit) as stop:
        stage.run(bad_params)
    assert stop.value.code == 2
    assert capsys.readouterr().err == "error: params.yaml: is not valid YAML: line 1 column 3; fix it\n"
    with pytest.raises(SystemExit) as stop:
        stage.run(lambda: (_ for _ in ()).throw(DataError("no index yet", where="data/index/val.jsonl")))
    assert stop.value.code == 1
    with pytest.raises(SystemExit) as stop:
        stage.run(lambda: 3)
    assert stop.value.code == 3
    with pytest.raises(KeyError):  # a bug is not a user's mistake: its traceback stays
        stage.run(lambda: {}["x"])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A saved (untrained) mit_b0 inference model: model.json + model.safetensors, as train writes them."""
    from mitdet.data.index import Category
    from mitdet.models import build_detector, inference_spec, save_inference_model
    from mitdet.params import load_params
    model_params = load_params(ROOT / "params.yaml").model
    categories = [Category(3, "square", 1), Category(7, "disc", 2)]
    out = tmp_path_factory.mktemp("model") / B
    save_inference_model(build_detector(B, len(categories) + 1, model_params),
                         inference_spec(B, categories, model_params, "best.pt", 0), out)
    return out


def copy_model(model: Path, root: Path) -> Path:
    dest = root / "models" / B
    dest.mkdir(parents=True)
    for f in model.iterdir():
        (dest / f.name).write_bytes(f.read_bytes())
    return dest


@pytest.mark.parametrize("name", list(STAGES))
def test_unknown_params_key_exits_2_naming_it(tmp_path, name):
    write_params(tmp_path, **{"train.lrr": 0.01})
    line = assert_one_error_line(run_stage(tmp_path, name), 2, "params.yaml", "`train.lrr`")
    assert "lr" in line.split("`train.lrr`", 1)[1]  # the allowed keys follow
    assert not (tmp_path / "data").exists() and not (tmp_path / "models").exists()  # nothing was written


def test_a_backbone_left_out_of_backbones_exits_2(tmp_path):
    write_params(tmp_path, backbones=["mit_b1"])
    assert_one_error_line(run_stage(tmp_path, "train"), 2, "params.yaml", "mit_b0", "`backbones:`")


def test_train_without_an_index(tmp_path):
    write_params(tmp_path)
    assert_one_error_line(run_stage(tmp_path, "train"), 1, "data/index/train.jsonl", "`dvc repro build_index`")


def test_evaluate_without_an_index(tmp_path, model_dir):
    write_params(tmp_path)
    copy_model(model_dir, tmp_path)
    assert_one_error_line(run_stage(tmp_path, "evaluate"), 1, "data/index/val.jsonl", "`dvc repro build_index`")


def test_evaluate_without_a_model(tmp_path):
    write_params(tmp_path)
    write_index(tmp_path, n_train=1, n_val=1)
    assert_one_error_line(run_stage(tmp_path, "evaluate"), 1, f"models/{B}", f"train_{B}")


def test_evaluate_with_corrupt_weights(tmp_path, model_dir):
    write_params(tmp_path)
    write_index(tmp_path, n_train=1, n_val=1)
    dest = copy_model(model_dir, tmp_path)
    (dest / "model.safetensors").write_bytes(b"\x00garbage, not safetensors" * 40)
    assert_one_error_line(run_stage(tmp_path, "evaluate"), 1, f"models/{B}/model.safetensors", f"train_{B}")


def test_build_index_without_a_manifest(tmp_path):
    write_params(tmp_path)
    assert_one_error_line(run_stage(tmp_path, "build_index"), 1, "data/raw/manifest.json",
                          "`dvc repro prepare_data`")


@pytest.mark.parametrize("text, what", [
    ('{"images": [', "not valid JSON"),
    ("[1, 2]", "expected a COCO object"),
    ('{"annotations": [], "categories": []}', "`images`"),
    ('{"images": [], "annotations": [], "categories": [{"id": "one", "name": "cat"}]}', "categories[0]"),
])
def test_build_index_on_malformed_local_annotations(tmp_path, text, what):
    write_params(tmp_path, **{"data.source": "local"})
    (tmp_path / "images").mkdir()
    good = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "cat"}]}
    (tmp_path / "train.json").write_text(json.dumps(good))
    (tmp_path / "val.json").write_text(text)
    manifest = {"source": "local", "fingerprint": {},
                "splits": {s: {"images": "images", "annotations": f"{s}.json"} for s in ("train", "val")}}
    (tmp_path / "data" / "raw").mkdir(parents=True)
    (tmp_path / "data" / "raw" / "manifest.json").write_text(json.dumps(manifest))
    assert_one_error_line(run_stage(tmp_path, "build_index"), 1, "val.json", what)
    assert not (tmp_path / "data" / "index").exists()


def test_prepare_data_with_an_unreachable_coco_mirror(tmp_path):
    with socket.socket() as s:  # a port nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    write_params(tmp_path, **{"data.source": "coco2017", "data.coco2017.base_url": base,
                              "data.coco2017.retries": 0, "data.coco2017.timeout_s": 2, "data.coco2017.subset": 2})
    line = assert_one_error_line(run_stage(tmp_path, "prepare_data"), 1,
                                 f"{base}/annotations/annotations_trainval2017.zip", "data.coco2017.base_url")
    assert "refused" in line.lower()
    assert not (tmp_path / "data" / "raw" / "manifest.json").exists()
