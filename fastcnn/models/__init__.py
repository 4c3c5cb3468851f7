"""The classic networks built from fastcnn's fused layers. Each builder takes
`num_classes` and `weights=` (a state_dict or a path to one) and is listed in the
registry: `list_models()`, `get_model(name, **kwargs)`. Every model has `fuse()`."""

from fastcnn.models.alexnet import AlexNet, AlexNetOriginal, alexnet, alexnet_original
from fastcnn.models.googlenet import GoogLeNet, GoogLeNetOutputs, googlenet
from fastcnn.models.lenet import LeNet5, lenet5
from fastcnn.models.nin import NiN, nin
from fastcnn.models.registry import get_model, list_models
from fastcnn.models.resnet import ResNet, resnet18, resnet34, resnet50, resnet101, resnet152
from fastcnn.models.vgg import VGG, vgg11, vgg11_bn, vgg13, vgg13_bn, vgg16, vgg16_bn, vgg19, vgg19_bn

__all__ = [
    "AlexNet", "AlexNetOriginal", "GoogLeNet", "GoogLeNetOutputs", "LeNet5", "NiN", "ResNet", "VGG",
    "alexnet", "alexnet_original", "get_model", "googlenet", "lenet5", "list_models", "nin",
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn",
]
