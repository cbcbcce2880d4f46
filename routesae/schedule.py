"""The learning-rate schedule of SAE training: linear warm-up, constant, linear decay to zero.

Steps are 0-indexed, ``0 .. total-1``. With ``W = ceil(warmup_frac * total)`` warm-up steps and
``D = ceil(decay_frac * total)`` decay steps::

    lr(s) = base * (s + 1) / W              s <  W           (base / W at step 0, base at step W-1)
    lr(s) = base                            W <= s < total-D
    lr(s) = base * (total - 1 - s) / D      s >= total - D   (exactly 0 at the last step)

If warm-up and decay overlap (very short runs) the smaller of the two factors is used. The
RouteSAE reference code let the rate jump at 80%; here it decays linearly (REFERENCE §1).
"""

from __future__ import annotations

import math


def lr_at(step: int, total: int, base: float, warmup_frac: float = 0.05, decay_frac: float = 0.2) -> float:
    """Learning rate of 0-indexed ``step`` in a run of ``total`` steps (see the module docstring)."""
    if total < 1:
        raise ValueError(f"total={total} steps must be at least 1")
    if not 0 <= step < total:
        raise ValueError(f"step {step} is outside the run of {total} steps")
    factor = 1.0
    warmup = math.ceil(warmup_frac * total)
    if warmup > 0 and step < warmup:
        factor = (step + 1) / warmup
    decay = math.ceil(decay_frac * total)
    if decay > 0 and step >= total - decay:
        factor = min(factor, (total - 1 - step) / decay)
    return base * factor
