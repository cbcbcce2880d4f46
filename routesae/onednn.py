"""oneDNN's fused linear for float32 on CPU, with a fallback to ``torch.nn.functional.linear``.

``torch.ops.mkldnn._linear_pointwise`` is the kernel torch's compiler uses for CPU linear layers. On
the AVX-512 CPUs measured here it computes the same float32 product as the BLAS call behind
``F.linear`` 1.5-2.5x faster for the small matrices of SAEs and small MoE models (docs/RESULTS.md).
Where the op is missing or refuses (another torch build), ``F.linear`` takes over for the rest of
the process. It has no autograd formula, so inputs that need gradients take ``F.linear`` too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

ONEDNN = {"enabled": True}  # set False to force the BLAS path (tests compare both)


def usable(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> bool:
    """Whether :func:`linear` would run oneDNN for these operands."""
    tensors = (x, weight) if bias is None else (x, weight, bias)
    return (ONEDNN["enabled"] and x.device.type == "cpu" and all(t.dtype == torch.float32 for t in tensors)
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
            and torch.backends.mkldnn.is_available())


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x @ weight.T + bias`` (``F.linear``'s contract: ``weight [out, in]``, any leading dims of ``x``)."""
    if usable(x, weight, bias):
        try:
            return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight.contiguous(), bias, "none", [], "")
        except (AttributeError, RuntimeError, NotImplementedError):
            ONEDNN["enabled"] = False
    return F.linear(x, weight, bias)
