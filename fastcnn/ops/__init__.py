"""The torch.library ops (torch.ops.fastcnn.*), one module per op.

Importing this package imports every module in it, which registers every op."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
