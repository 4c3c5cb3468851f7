"""Placeholder: replaced by the max_pool2d work."""

from torch import nn


class MaxPool2d(nn.Module):
    pass
