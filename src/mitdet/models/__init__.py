"""MiT encoders, checkpoint import, and the Faster R-CNN detector built on them."""
from mitdet.models.detector import build_detector, count_parameters, detector_gflops
from mitdet.models.mit import MIT_CONFIGS, build_mit
from mitdet.models.weights import (CheckpointMismatchError, load_inference_model, load_pretrained,
                                   save_inference_model)

__all__ = ["MIT_CONFIGS", "CheckpointMismatchError", "build_mit", "load_pretrained", "build_detector",
           "count_parameters", "detector_gflops", "save_inference_model", "load_inference_model"]
