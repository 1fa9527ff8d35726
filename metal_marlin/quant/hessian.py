"""The layer-input Hessian ``H = E[x x^T]`` shared by GPTQ and trellis LDLQ."""

from __future__ import annotations

import torch


class HessianAccumulator:
    """Running ``sum x x^T`` over the rows of every batch seen; ``hessian()`` is the mean."""

    def __init__(self, features: int) -> None:
        self.features = features
        self.sum = torch.zeros(features, features, dtype=torch.float64)
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, self.features).to(torch.float32).cpu()
        self.sum += (x.T @ x).double()
        self.rows += x.shape[0]

    def hessian(self) -> torch.Tensor:
        if self.rows == 0:
            raise ValueError("no calibration rows reached this layer")
        return self.sum / self.rows


def damped(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """``H + damp * mean(diag H) * I``, with dead inputs (zero diagonal) given a unit diagonal."""
    h = hessian.double().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    h.diagonal().add_(damp * h.diagonal().mean())
    return h
