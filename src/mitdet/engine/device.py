"""Devices and mixed precision: which device runs, which half precision, and autocast of the backbone only.

Shared by training and inference.
"""
from __future__ import annotations

import contextlib
import logging

import torch

from mitdet.errors import ParamsError

log = logging.getLogger(__name__)


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' -> cuda if available, else mps, else cpu; a named device that is absent fails clearly."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ParamsError("device 'cuda' was asked for but torch sees no CUDA GPU", where="train.device / evaluate.device",
                          fix="set it to auto or cpu")
    return torch.device(device)


_HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


def amp_mode(amp: str, device: torch.device) -> str:
    """The precision actually used for `amp` (auto | bf16 | fp16 | off): bf16 | fp16 | off (off outside CUDA)."""
    if amp not in ("auto", "bf16", "fp16", "off"):
        raise ParamsError(f"amp = {amp!r} is not a precision", where="train.amp / evaluate.amp",
                          fix="choose one of auto, bf16, fp16, off")
    if device.type != "cuda" or amp == "off":
        if amp in _HALF:
            log.info("amp = %s ignored on %s: running in float32", amp, device.type)
        return "off"
    if amp == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return amp


@contextlib.contextmanager
def backbone_autocast(model: torch.nn.Module, device: torch.device, amp: str):
    """Run only `model.backbone` (encoder + FPN, most of the compute) in half precision, in training and inference.

    Under a whole-model autocast torchvision decodes boxes in the regression head's dtype (BoxCoder casts the
    proposals to it): in bf16 a coordinate near 1000 px moves in steps of 4 px, which costs AP75. So the heads
    stay in float32 and the features are cast back to it. Nested uses (validation inside training) keep the
    outer one.
    """
    mode = amp_mode(amp, device)
    backbone = getattr(model, "backbone", None)
    if mode == "off" or backbone is None or "forward" in backbone.__dict__:  # off, or already patched
        yield
        return
    original, dtype = backbone.forward, _HALF[mode]

    def forward(*args, **kwargs):
        with torch.autocast(device.type, dtype=dtype):
            out = original(*args, **kwargs)
        if isinstance(out, dict):
            return type(out)((k, v.float()) for k, v in out.items())
        return out.float() if torch.is_tensor(out) else out

    backbone.forward = forward
    try:
        yield
    finally:
        del backbone.forward  # back to the class's forward


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA only), so a wall-clock time covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
