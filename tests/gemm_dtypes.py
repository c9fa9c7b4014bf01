"""Which dtypes the GEMMs of a region ran in: a TorchDispatchMode that logs every matrix product.

Under autocast a GPU step must run its GEMMs in bf16/fp16, backward included. On CUDA the backward
runs on autograd's device thread with autocast off, so an op that only relies on the ambient
autocast silently runs its backward GEMMs in fp32; recording the operand dtypes on CPU (backward
called outside the autocast region, as on the GPU) catches that without a GPU.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
# The matrix operands of each GEMM overload family (by position).
_GEMMS = {aten.mm: (0, 1), aten.bmm: (0, 1), aten.addmm: (1, 2), aten.baddbmm: (1, 2), aten.addmm_: (1, 2)}


class GemmDtypes(TorchDispatchMode):
    """records: one (op name, operand dtypes, output rows x cols) per GEMM run inside the mode."""

    def __init__(self):
        super().__init__()
        self.records: list[tuple[str, tuple[torch.dtype, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        where = _GEMMS.get(func.overloadpacket)
        if where is not None:
            self.records.append((str(func.overloadpacket), tuple(args[i].dtype for i in where)))
        return func(*args, **(kwargs or {}))

    def in_dtype(self, dtype: torch.dtype) -> list[tuple[str, tuple[torch.dtype, ...]]]:
        """The recorded GEMMs with an operand in `dtype` (e.g. the fp32 ones that should not be)."""
        return [r for r in self.records if dtype in r[1]]
