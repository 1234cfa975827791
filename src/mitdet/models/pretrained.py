"""Encoder checkpoint import: original SegFormer `mit_b*.pth` and Hugging Face `nvidia/mit-b*`, file or URL.

Nothing here unpickles code: `.pth`/`.bin` files go through `torch.load(weights_only=True)`, the rest is
safetensors. A checkpoint that does not fit the encoder exactly is refused with every missing, unexpected and
mis-shaped key listed, never loaded in part. A URL is downloaded once into the cache, and only a complete
transfer becomes the cached file.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import re
import urllib.parse
import urllib.request
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from mitdet.errors import CheckpointError, DownloadError
from mitdet.io import atomic_path
from mitdet.models.mit import MIT_CONFIGS

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


class CheckpointMismatchError(CheckpointError, ValueError):
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


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A weights file (or model folder) that is not there."""


class UnreadableCheckpointError(CheckpointError, ValueError):
    """A weights file that is truncated, not safetensors / weights-only torch, or not a dict of tensors."""


def _listing(items: list[str], limit: int = 60) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... and {len(items) - limit} more" if len(items) > limit else "")


# ------------------------------------------------------------------------------------------ reading files
def cache_dir() -> Path:
    """Where downloaded weights are kept: $MITDET_CACHE or ~/.cache/mitdet/weights."""
    return Path(os.environ.get("MITDET_CACHE") or Path.home() / ".cache" / "mitdet" / "weights")


def pretrained_for(pretrained: str, backbone: str) -> str:
    """`model.pretrained` for one backbone: `{backbone}` becomes `mit_b0`, `{backbone_dashed}` `mit-b0` (so one
    value names six files, e.g. `weights/{backbone}.pth` or a folder per `nvidia/{backbone_dashed}`)."""
    return pretrained.replace("{backbone}", backbone).replace("{backbone_dashed}", backbone.replace("_", "-"))


def is_detector_folder(path_or_url: str) -> bool:
    """A trained mitdet model folder (`model.json` beside its weights): it starts the whole detector
    (models/bundle.py `init_from_model`), not the encoder alone."""
    path = Path(path_or_url).expanduser()
    return path.is_dir() and (path / "model.json").is_file()


def fetch(path_or_url: str, cache: str | os.PathLike | None = None, timeout_s: float = 60.0) -> Path:
    """A local file for `path_or_url`: the path itself (a Hugging Face model folder: its weights file), or the
    URL downloaded once into the cache."""
    scheme = urllib.parse.urlparse(path_or_url).scheme
    if scheme not in ("http", "https", "ftp", "file"):
        path = Path(path_or_url).expanduser()
        if path.is_dir():  # a Hugging Face model folder (save_pretrained / a Hub snapshot)
            found = [path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()]
            if not found:
                raise CheckpointNotFoundError("a folder without model.safetensors or pytorch_model.bin",
                                              where=str(path), fix="point model.pretrained at the weights file")
            return found[0]
        if not path.is_file():
            raise CheckpointNotFoundError("pretrained weights not found", where=str(path),
                                          fix="set model.pretrained to a file or URL")
        return path
    name = Path(urllib.parse.urlparse(path_or_url).path).name or "weights"
    digest = hashlib.sha256(path_or_url.encode()).hexdigest()[:12]
    target = Path(cache or cache_dir()) / f"{digest}-{name}"
    if not target.is_file():
        _download(path_or_url, target, timeout_s)
    return target


def _download(url: str, target: Path, timeout_s: float) -> None:
    """`url` -> `target` through a temporary file that becomes `target` only once the transfer is complete
    (all of Content-Length, when the server sends one): a cut download is never cached."""
    fix = "check the URL and the network, or download the file and set model.pretrained to its path"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response, atomic_path(target) as tmp:
            length = response.headers.get("Content-Length")
            received = 0
            with open(tmp, "wb") as out:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    received += len(chunk)
            if length is not None and length.strip().isdigit() and received != int(length):
                raise DownloadError(f"could not download pretrained weights from {url}: the transfer stopped at "
                                    f"{received} of {int(length)} bytes", fix=fix)
    except DownloadError:
        raise
    except (OSError, http.client.HTTPException) as err:  # URLError, HTTPError, timeouts, a dropped connection
        raise DownloadError(f"could not download pretrained weights from {url}: {err}", fix=fix) from err


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Tensors of a safetensors file or of a torch checkpoint (weights only), unwrapped from state_dict/model."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except FileNotFoundError:
        raise CheckpointNotFoundError("weights file not found", where=str(path),
                                      fix="check model.pretrained (a file, a Hugging Face folder or a URL)") from None
    except OSError as err:
        raise UnreadableCheckpointError(f"cannot be read ({err.strerror or err})", where=str(path)) from None
    if path.suffix == ".safetensors" or (len(head) == 9 and head[8:9] == b"{"):
        try:
            return load_file(str(path))
        except Exception as err:  # SafetensorError: truncated or not safetensors at all
            raise UnreadableCheckpointError(f"not a readable safetensors file ({err})", where=str(path)) from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError for pickled code, RuntimeError for a corrupt file
        raise UnreadableCheckpointError(f"not a readable weights-only checkpoint ({type(err).__name__}: {err})",
                                        where=str(path)) from None
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise UnreadableCheckpointError("expected a dict of tensors (optionally under 'state_dict' or 'model')",
                                        where=str(path))
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
    try:
        dims = tuple(state[f"norm{i}.weight"].shape[0] for i in range(1, 5))
    except KeyError:
        return None
    depths = tuple(len({k.split(".")[1] for k in state if k.startswith(f"block{i}.")}) for i in range(1, 5))
    return next((name for name, c in MIT_CONFIGS.items() if (c.embed_dims, c.depths) == (dims, depths)), None)


def load_state_dict_strict(module: nn.Module, state: dict[str, Tensor], source: str, assign: bool = False) -> None:
    """Copy `state` into `module` (`assign`: use its tensors, as a model built on the meta device needs), or raise
    CheckpointMismatchError listing every difference."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted((k, tuple(state[k].shape), tuple(own[k].shape))
                        for k in set(own) & set(state) if state[k].shape != own[k].shape)
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(source, getattr(module, "name", type(module).__name__),
                                      missing, unexpected, mismatched, guess_variant(state))
    module.load_state_dict(state, strict=True, assign=assign)


def load_pretrained(encoder: nn.Module, path_or_url: str, cache: str | os.PathLike | None = None) -> None:
    """Load original `mit_b*.pth` or Hugging Face `nvidia/mit-b*` weights (file or URL) into `encoder`."""
    path = fetch(path_or_url, cache)
    state, fmt = to_mit_names(read_state_dict(path))
    load_state_dict_strict(encoder, state, f"{path_or_url} ({fmt} format)")


AUX_FIRST_KEY = "patch_embed1.proj.weight"  # the only tensor whose shape depends on the input channels


def aux_first_filters(weight: Tensor, channels: int) -> Tensor:
    """The first patch embedding's RGB filters [C, 3, k, k] for `channels` aux inputs: their mean over R, G, B
    repeated over the aux channels and rescaled by 3 / channels."""
    # Rescaled by 3 / N (timm's adapt_input_conv rescales so too): a uniform (gray) aux input then gives exactly
    # the response the pretrained filters give to the same gray RGB image, whatever N, so the pretrained norm and
    # bias that follow see activations of the magnitude they were trained on.
    mean = weight.mean(dim=1, keepdim=True)
    return mean.repeat(1, channels, 1, 1) * (3.0 / channels)


def load_pretrained_rgbx(rgb: nn.Module, aux: nn.Module, path_or_url: str,
                         cache: str | os.PathLike | None = None) -> None:
    """Both streams of an RGB+X encoder from one SegFormer checkpoint (original or Hugging Face format): the RGB
    stream as `load_pretrained`, the aux stream too with its first filters from `aux_first_filters`."""
    path = fetch(path_or_url, cache)
    state, fmt = to_mit_names(read_state_dict(path))
    source = f"{path_or_url} ({fmt} format)"
    load_state_dict_strict(rgb, state, source)
    channels = aux.state_dict()[AUX_FIRST_KEY].shape[1]
    if AUX_FIRST_KEY in state and state[AUX_FIRST_KEY].ndim == 4:
        state = {**state, AUX_FIRST_KEY: aux_first_filters(state[AUX_FIRST_KEY], channels)}
    load_state_dict_strict(aux, state, f"{source}, aux stream")
