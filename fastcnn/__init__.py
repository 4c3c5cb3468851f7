"""fastcnn: fused Triton, CUDA and CPU kernels for the classic convolutional networks."""

from fastcnn import functional, models, nn
from fastcnn.backends import BACKENDS, available_backends, use_backend
from fastcnn.fusion.graph import fuse

__all__ = ["BACKENDS", "available_backends", "functional", "fuse", "models", "nn", "use_backend"]
__version__ = "0.1.0"
