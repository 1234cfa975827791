"""MiT encoders, checkpoint import, the Faster R-CNN detector built on them, and the saved inference model."""
from mitdet.models.bundle import inference_spec, load_inference_model, save_inference_model
from mitdet.models.detector import build_detector, count_parameters, detector_gflops
from mitdet.models.mit import MIT_CONFIGS, build_mit
from mitdet.models.pretrained import CheckpointMismatchError, load_pretrained

__all__ = ["MIT_CONFIGS", "CheckpointMismatchError", "build_mit", "load_pretrained", "build_detector",
           "count_parameters", "detector_gflops", "inference_spec", "save_inference_model", "load_inference_model"]
