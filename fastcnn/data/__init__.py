"""Data augmentation: batched, seeded transforms on (N, C, H, W) tensors (augment.py),
and crop + mirror + colour shift + PCA colour fused into one pass (fused_augment.py)."""

from fastcnn.data.augment import (BatchTransform, ColorShift, Compose, LocalWarp, PCAColor, RandomCrop, RandomMirror,
                                  RandomRotation, RandomShear, rgb_pca)
from fastcnn.data.fused_augment import FusedAugment, flip_crop_offset

__all__ = ["BatchTransform", "ColorShift", "Compose", "FusedAugment", "LocalWarp", "PCAColor", "RandomCrop",
           "RandomMirror", "RandomRotation", "RandomShear", "flip_crop_offset", "rgb_pca"]
