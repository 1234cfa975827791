"""Checkpoint import (original SegFormer `mit_b*.pth`, Hugging Face `nvidia/mit-b*`) and the inference model files.

Nothing here unpickles code: `.pth`/`.bin` files go through `torch.load(weights_only=True)`, the rest is
safetensors. A checkpoint that does not fit the encoder exactly is refused with every missing, unexpected and
mis-shaped key listed, never loaded in part.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
import urllib.parse
import urllib.request
from pathlib import Path

import torch
from torch import Tensor, nn

from mitdet.io import atomic_path, read_json, write_json

# Keys of classification / segmentation heads that an encoder import drops on purpose.
HEAD_PREFIXES = ("head.", "classifier.", "decode_head.")
# Wrappers some trainers add in front of every key.
WRAPPER_PREFIXES = ("module.", "segformer.", "backbone.")

# Hugging Face names -> NVlabs names (ours). Two namings exist: the Hub's (what `save_pretrained` writes, also in
# transformers 5), and transformers 5's in-memory module names (what `SegformerModel().state_dict()` returns).
_HF_RULES = [
    (r"encoder\.patch_embeddings\.(\d)\.proj\.", "patch_embed{0}.proj."),
    (r"encoder\.patch_embeddings\.(\d)\.layer_norm\.", "patch_embed{0}.norm."),
    (r"encoder\.block\.(\d)\.(\d+)\.layer_norm_1\.", "block{0}.{1}.norm1."),
    (r"encoder\.block\.(\d)\.(\d+)\.layer_norm_2\.", "block{0}.{1}.norm2."),
    (r"encoder\.block\.(\d)\.(\d+)\.attention\.self\.query\.", "block{0}.{1}.attn.q."),
    (r"encoder\.block\.(\d)\.(\d+)\.attention\.self\.key\.", "block{0}.{1}.attn.k."),
    (r"encoder\.block\.(\d)\.(\d+)\.attention\.self\.value\.", "block{0}.{1}.attn.v."),
    (r"encoder\.block\.(\d)\.(\d+)\.attention\.self\.sr\.", "block{0}.{1}.attn.sr."),
    (r"encoder\.block\.(\d)\.(\d+)\.attention\.self\.layer_norm\.", "block{0}.{1}.attn.norm."),
    (r"encoder\.block\.(\d)\.(\d+)\.attention\.output\.dense\.", "block{0}.{1}.attn.proj."),
    (r"encoder\.block\.(\d)\.(\d+)\.mlp\.dense1\.", "block{0}.{1}.mlp.fc1."),
    (r"encoder\.block\.(\d)\.(\d+)\.mlp\.dwconv\.dwconv\.", "block{0}.{1}.mlp.dwconv.dwconv."),
    (r"encoder\.block\.(\d)\.(\d+)\.mlp\.dense2\.", "block{0}.{1}.mlp.fc2."),
    (r"encoder\.layer_norm\.(\d)\.", "norm{0}."),
    (r"stages\.(\d)\.patch_embeddings\.proj\.", "patch_embed{0}.proj."),
    (r"stages\.(\d)\.patch_embeddings\.layer_norm\.", "patch_embed{0}.norm."),
    (r"stages\.(\d)\.blocks\.(\d+)\.layernorm_before\.", "block{0}.{1}.norm1."),
    (r"stages\.(\d)\.blocks\.(\d+)\.layernorm_after\.", "block{0}.{1}.norm2."),
    (r"stages\.(\d)\.blocks\.(\d+)\.attention\.q_proj\.", "block{0}.{1}.attn.q."),
    (r"stages\.(\d)\.blocks\.(\d+)\.attention\.k_proj\.", "block{0}.{1}.attn.k."),
    (r"stages\.(\d)\.blocks\.(\d+)\.attention\.v_proj\.", "block{0}.{1}.attn.v."),
    (r"stages\.(\d)\.blocks\.(\d+)\.attention\.sequence_reduction\.sequence_reduction\.", "block{0}.{1}.attn.sr."),
    (r"stages\.(\d)\.blocks\.(\d+)\.attention\.sequence_reduction\.layer_norm\.", "block{0}.{1}.attn.norm."),
    (r"stages\.(\d)\.blocks\.(\d+)\.attention\.o_proj\.", "block{0}.{1}.attn.proj."),
    (r"stages\.(\d)\.blocks\.(\d+)\.mlp\.fc1\.", "block{0}.{1}.mlp.fc1."),
    (r"stages\.(\d)\.blocks\.(\d+)\.mlp\.dwconv\.dwconv\.", "block{0}.{1}.mlp.dwconv.dwconv."),
    (r"stages\.(\d)\.blocks\.(\d+)\.mlp\.fc2\.", "block{0}.{1}.mlp.fc2."),
    (r"stages\.(\d)\.layer_norm\.", "norm{0}."),
]
_HF_RULES = [(re.compile("^" + pattern), repl) for pattern, repl in _HF_RULES]


class CheckpointMismatchError(ValueError):
    """A checkpoint whose keys or shapes do not match the model; lists every difference."""

    def __init__(self, source: str, target: str, missing: list[str], unexpected: list[str],
                 mismatched: list[tuple[str, tuple, tuple]], variant: str | None = None):
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched
        parts = [f"{source} does not fit {target}; nothing was loaded."]
        if variant and variant != target:
            parts.append(f"The checkpoint looks like {variant}: set the backbone to it, or use {target} weights.")
        if missing:
            parts.append(f"missing keys ({len(missing)}): " + _listing(missing))
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): " + _listing(unexpected))
        if mismatched:
            parts.append(f"shape mismatches ({len(mismatched)}): " + _listing(
                [f"{k} (checkpoint {list(a)} vs model {list(b)})" for k, a, b in mismatched]))
        if not variant:
            parts.append("Check that the checkpoint is the same MiT variant as the backbone (mit_b0..mit_b5).")
        super().__init__("\n  ".join(parts))


def _listing(items: list[str], limit: int = 60) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... and {len(items) - limit} more" if len(items) > limit else "")


# ------------------------------------------------------------------------------------------ reading files
def cache_dir() -> Path:
    """Where downloaded weights are kept: $MITDET_CACHE or ~/.cache/mitdet/weights."""
    return Path(os.environ.get("MITDET_CACHE") or Path.home() / ".cache" / "mitdet" / "weights")


def fetch(path_or_url: str, cache: str | os.PathLike | None = None, timeout_s: float = 60.0) -> Path:
    """A local file for `path_or_url`: the path itself (a Hugging Face model folder: its weights file), or the
    URL downloaded once into the cache."""
    scheme = urllib.parse.urlparse(path_or_url).scheme
    if scheme not in ("http", "https", "ftp", "file"):
        path = Path(path_or_url).expanduser()
        if path.is_dir():  # a Hugging Face model folder (save_pretrained / a Hub snapshot)
            found = [path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()]
            if not found:
                raise FileNotFoundError(f"{path} is a folder without model.safetensors or pytorch_model.bin; "
                                        "point model.pretrained at the weights file")
            return found[0]
        if not path.is_file():
            raise FileNotFoundError(f"pretrained weights not found: {path} (set model.pretrained to a file or URL)")
        return path
    name = Path(urllib.parse.urlparse(path_or_url).path).name or "weights"
    digest = hashlib.sha256(path_or_url.encode()).hexdigest()[:12]
    target = Path(cache or cache_dir()) / f"{digest}-{name}"
    if target.is_file():
        return target
    try:
        with urllib.request.urlopen(path_or_url, timeout=timeout_s) as response, atomic_path(target) as tmp:
            with open(tmp, "wb") as out:
                shutil.copyfileobj(response, out, length=1 << 20)
    except OSError as err:  # URLError, HTTPError, timeouts
        raise OSError(f"could not download pretrained weights from {path_or_url}: {err}") from err
    return target


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Tensors of a safetensors file or of a torch checkpoint (weights only), unwrapped from state_dict/model."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(9)
    if path.suffix == ".safetensors" or (len(head) == 9 and head[8:9] == b"{"):
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except Exception as err:  # SafetensorError: truncated or not safetensors at all
            raise ValueError(f"{path}: not a readable safetensors file ({err})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError for pickled code, RuntimeError for a corrupt file
        raise ValueError(f"{path}: not a readable weights-only checkpoint ({type(err).__name__}: {err})") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a dict of tensors (optionally under 'state_dict' or 'model')")
    return obj


# ------------------------------------------------------------------------------------------ name mapping
def to_mit_names(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], str]:
    """Map an original or Hugging Face MiT state dict onto our (NVlabs) names; returns (state, format name)."""
    state = dict(state)
    for prefix in WRAPPER_PREFIXES:  # peel wrappers one after another, e.g. module.backbone.
        if state and all(k.startswith(prefix) or k.startswith(HEAD_PREFIXES) for k in state):
            state = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIXES)}
    if not any(k.startswith(("encoder.", "stages.")) for k in state):
        return state, "original SegFormer (NVlabs)"
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        for pattern, repl in _HF_RULES:
            m = pattern.match(key)
            if m:
                groups = [str(int(g) + 1) if i == 0 else g for i, g in enumerate(m.groups())]  # stages count from 1
                key = repl.format(*groups) + key[m.end():]
                break
        out[key] = value
    # Hugging Face keeps keys and values as two linears; ours is one `kv` linear, keys first.
    for key in [k for k in out if ".attn.k." in k]:
        vkey = key.replace(".attn.k.", ".attn.v.")
        if vkey in out:
            out[key.replace(".attn.k.", ".attn.kv.")] = torch.cat([out.pop(key), out.pop(vkey)], dim=0)
    return out, "Hugging Face"


def guess_variant(state: dict[str, Tensor]) -> str | None:
    """The MiT variant whose widths and depths a (mapped) state dict has, if any."""
    from mitdet.models.mit import MIT_CONFIGS
    try:
        dims = tuple(state[f"norm{i}.weight"].shape[0] for i in range(1, 5))
    except KeyError:
        return None
    depths = tuple(len({k.split(".")[1] for k in state if k.startswith(f"block{i}.")}) for i in range(1, 5))
    return next((name for name, c in MIT_CONFIGS.items() if (c.embed_dims, c.depths) == (dims, depths)), None)


def load_state_dict_strict(module: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Copy `state` into `module`, or raise CheckpointMismatchError listing every difference."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted((k, tuple(state[k].shape), tuple(own[k].shape))
                        for k in set(own) & set(state) if state[k].shape != own[k].shape)
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(source, getattr(module, "name", type(module).__name__),
                                      missing, unexpected, mismatched, guess_variant(state))
    module.load_state_dict(state, strict=True)


def load_pretrained(encoder: nn.Module, path_or_url: str, cache: str | os.PathLike | None = None) -> None:
    """Load original `mit_b*.pth` or Hugging Face `nvidia/mit-b*` weights (file or URL) into `encoder`."""
    path = fetch(path_or_url, cache)
    state, fmt = to_mit_names(read_state_dict(path))
    load_state_dict_strict(encoder, state, f"{path_or_url} ({fmt} format)")


# ------------------------------------------------------------------------------------ inference model files
INFERENCE_FORMAT = "mitdet-detector-v1"
WEIGHTS_FILE = "model.safetensors"
SPEC_FILE = "model.json"


def save_inference_model(model: nn.Module, spec: dict, model_dir: str | os.PathLike) -> None:
    """Write `model.safetensors` and `model.json` (spec: backbone, num_classes, categories, model) atomically."""
    from safetensors.torch import save_file
    missing = [k for k in ("backbone", "num_classes", "categories", "model") if k not in spec]
    if missing:
        raise ValueError(f"inference model spec lacks {missing}; it needs backbone, num_classes, categories, model")
    model = getattr(model, "module", model)  # a DDP wrapper's model
    # safetensors wants plain contiguous CPU tensors (channels_last weights are not contiguous)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    model_dir = Path(model_dir)
    with atomic_path(model_dir / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"format": INFERENCE_FORMAT})
    write_json(model_dir / SPEC_FILE, {"format": INFERENCE_FORMAT, **{k: v for k, v in spec.items() if k != "format"}})


def load_inference_model(model_dir: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """The detector saved by `save_inference_model`, in eval mode on `device`, and its spec (safetensors only)."""
    from safetensors.torch import load_file
    from mitdet.models.detector import build_detector  # detector.py imports this module
    from mitdet.params import model_params_from_dict
    model_dir = Path(model_dir)
    spec = read_json(model_dir / SPEC_FILE)
    if spec.get("format") != INFERENCE_FORMAT:
        raise ValueError(f"{model_dir / SPEC_FILE}: format is {spec.get('format')!r}, expected {INFERENCE_FORMAT!r}")
    # the weights are all in the file: no pretrained download, no compile for plain inference
    params = dataclasses.replace(model_params_from_dict(spec["model"]), pretrained=None, compile=False)
    model = build_detector(spec["backbone"], int(spec["num_classes"]), params)
    load_state_dict_strict(model, load_file(str(model_dir / WEIGHTS_FILE)), str(model_dir / WEIGHTS_FILE))
    return model.to(device).eval(), spec
