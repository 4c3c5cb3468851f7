"""fastcnn: fused Triton, CUDA and CPU kernels for the classic convolutional networks."""

from fastcnn import data  # augmentation: seeded batch transforms, FusedAugment
from fastcnn import functional, models, nn
from fastcnn import inference  # multi_crop, Ensemble
from fastcnn import transfer  # freeze, replace_head, precompute_features
from fastcnn.backends import BACKENDS, available_backends, use_backend
from fastcnn.cost import summary
from fastcnn.fusion.graph import fuse

__all__ = ["BACKENDS", "available_backends", "data", "functional", "fuse", "inference", "models", "nn", "summary",
           "transfer", "use_backend"]
__version__ = "0.1.0"
