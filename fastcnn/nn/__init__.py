"""Drop-in modules, in the style of torch.nn: same constructor arguments as their
torch.nn namesakes."""

from fastcnn.nn.avg_pool import AdaptiveAvgPool2d, AvgPool2d
from fastcnn.nn.conv2d import Conv2d, Conv2dReLU
from fastcnn.nn.linear import Linear
from fastcnn.nn.max_pool import MaxPool2d
from fastcnn.nn.residual import AddReLU

__all__ = ["AdaptiveAvgPool2d", "AddReLU", "AvgPool2d", "Conv2d", "Conv2dReLU", "Linear", "MaxPool2d"]
