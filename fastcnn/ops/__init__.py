"""The torch.library ops (torch.ops.fastcnn.*), one module per op.

Importing this package registers every op."""

from fastcnn.ops import add_act  # noqa: F401
