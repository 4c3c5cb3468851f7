"""fastcnn: fused Triton, CUDA and CPU kernels for the classic convolutional networks."""

from fastcnn import functional, nn
from fastcnn.backends import BACKENDS, available_backends, use_backend

__all__ = ["BACKENDS", "available_backends", "functional", "nn", "use_backend"]
__version__ = "0.1.0"
