"""Drop-in modules, in the style of torch.nn: same constructor arguments as their
torch.nn namesakes."""

from fastcnn.nn.avg_pool import AdaptiveAvgPool2d, AvgPool2d
from fastcnn.nn.max_pool import MaxPool2d
from fastcnn.nn.residual import AddReLU

__all__ = ["AdaptiveAvgPool2d", "AddReLU", "AvgPool2d", "MaxPool2d"]
