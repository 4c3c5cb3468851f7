"""LocalResponseNorm: torch.nn.LocalResponseNorm (same constructor, repr and state_dict)
running fastcnn::local_response_norm."""

from __future__ import annotations

from torch import Tensor, nn

from fastcnn import functional as F


class LocalResponseNorm(nn.LocalResponseNorm):
    """As torch.nn.LocalResponseNorm: normalisation across the channels (dim 1) of (N, C, *) input."""

    def forward(self, input: Tensor) -> Tensor:
        return F.local_response_norm(input, self.size, self.alpha, self.beta, self.k)
