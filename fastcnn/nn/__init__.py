"""Drop-in modules, in the style of torch.nn."""

from fastcnn.nn.residual import AddReLU

__all__ = ["AddReLU"]
