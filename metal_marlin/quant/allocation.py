"""Bit allocation for ``--bpw``: integer trellis bits per tensor meeting an average budget while
minimising an estimate of the loss increase.

After incoherence processing a trellis code's error is close to i.i.d. with variance
``mse(K) * mean(W^2)``, so the expected loss increase of a matrix is about
``mse(K) * mean(W^2) * sensitivity / 2``, with the sensitivity ``E_t[||x_t||^2 ||dL/dy_t||^2]``
measured on calibration data (``metal_marlin.models.sensitivity``). Bits are handed out greedily,
always to the tensor whose proxy drops most per added bit of storage: the proxy is convex in K, so
this greedy walk is optimal for the relaxed budget.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

# Relative MSE of the 3inst trellis on i.i.d. N(0,1) weights (256x128, measured with our encoder).
TRELLIS_RELATIVE_MSE = {1: 0.2746, 2: 0.0693, 3: 0.0179, 4: 0.00467, 5: 0.00122, 6: 0.000332, 7: 0.000102,
                        8: 0.000043}


@dataclass
class TensorCost:
    name: str
    n_out: int
    n_in: int
    weight_ms: float  # mean(W^2)
    sensitivity: float  # E_t[||x_t||^2 ||dL/dy_t||^2]

    @property
    def params(self) -> int:
        return self.n_out * self.n_in

    def proxy(self, bits: int) -> float:
        return TRELLIS_RELATIVE_MSE[bits] * self.weight_ms * self.sensitivity

    def overhead_bits(self) -> float:
        return 16 * (self.n_out + self.n_in)  # the two float16 scale vectors


def allocate_bits(tensors: list[TensorCost], bpw: float, min_bits: int = 1, max_bits: int = 8,
                  floors: Mapping[str, int] | None = None) -> dict[str, int]:
    """Integer bits per tensor with ``sum(stored bits) <= bpw * sum(params)``, greedy by proxy drop per bit.

    ``floors`` raises the minimum of named tensors above ``min_bits``."""
    if not tensors:
        return {}
    floors = floors or {}
    total_params = sum(t.params for t in tensors)
    overhead = sum(t.overhead_bits() for t in tensors)
    budget = bpw * total_params - overhead
    bits = {t.name: max(min_bits, floors.get(t.name, min_bits)) for t in tensors}
    used = sum(bits[t.name] * t.params for t in tensors)
    if used > budget:
        raise ValueError(f"bpw={bpw} is below the minimum of {(used + overhead) / total_params:.3f} bits per weight "
                         f"(the minimum bits of every tensor plus the scale vectors)")
    while True:
        best, best_gain = None, 0.0
        for t in tensors:
            k = bits[t.name]
            if k >= max_bits or used + t.params > budget:
                continue
            gain = (t.proxy(k) - t.proxy(k + 1)) / t.params
            if gain > best_gain:
                best, best_gain = t, gain
        if best is None:
            return bits
        bits[best.name] += 1
        used += best.params
