"""A fully connected layer as one fused GEMM: torch.nn.Linear's arguments, parameters,
initialisation and state_dict keys, plus an activation in the epilogue."""

from __future__ import annotations

from torch import Tensor, nn

from fastcnn import functional as F
from fastcnn.ops.checks import check_act
from fastcnn.ops.linear import ACTS


class Linear(nn.Linear):
    """torch.nn.Linear computing act(x @ W.T + b) as one GEMM with its epilogue fused."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 activation: str | None = None):
        check_act(activation, ACTS)
        super().__init__(in_features, out_features, bias, device, dtype)
        self.activation = activation

    def forward(self, input: Tensor) -> Tensor:
        return F.linear(input, self.weight, self.bias, act=self.activation)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", activation={self.activation!r}"

