"""mitdet: Faster R-CNN + FPN on SegFormer MiT encoders, trained and compared through a DVC pipeline."""
__version__ = "0.1.0"
