"""Lets torch.compile see into the Triton kernels.

Each public op (`fastcnn::add_act`, ...) is opaque to Inductor. When it is
traced for compilation (AOTAutograd functionalises the graph) on CUDA tensors
with the triton backend selected, it is replaced by its `triton_op` twin
(`fastcnn::add_act_triton`), whose `wrap_triton` launches Inductor traces and
schedules like its own kernels. Everywhere else the op stays opaque.
"""

from __future__ import annotations

import torch
from torch._subclasses.functional_tensor import FunctionalTensorMode

from fastcnn import backends


def route_to_triton_when_compiled(op_def, triton_op_def) -> None:
    def functional_rule(mode, op, types, args, kwargs):
        from torch.export._trace import custom_triton_ops_decomposition_disabled

        first = args[0]
        # torch.export keeps ops whole (Triton kernels do not serialise), as triton_op does.
        if (not custom_triton_ops_decomposition_disabled()
                and isinstance(first, torch.Tensor) and first.device.type == "cuda"
                and backends.resolve(first.device) == "triton"):
            with mode:
                return triton_op_def(*args, **kwargs)
        return mode.__torch_dispatch__(op, types, args, kwargs)

    op_def.register_torch_dispatch(FunctionalTensorMode, functional_rule)
