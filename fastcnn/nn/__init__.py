"""Drop-in modules, in the style of torch.nn: same constructor arguments as their
torch.nn namesakes."""

from fastcnn.nn.avg_pool import AdaptiveAvgPool2d, AvgPool2d
from fastcnn.nn.batch_norm import BatchNorm2dReLU
from fastcnn.nn.conv2d import Conv2d, Conv2dReLU
from fastcnn.nn.linear import Linear
from fastcnn.nn.local_response_norm import LocalResponseNorm
from fastcnn.nn.max_pool import MaxPool2d
from fastcnn.nn.residual import AddReLU

__all__ = ["AdaptiveAvgPool2d", "AddReLU", "AvgPool2d", "BatchNorm2dReLU", "Conv2d", "Conv2dReLU", "Linear", "LocalResponseNorm",
           "MaxPool2d"]
