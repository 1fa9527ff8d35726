"""Shared test setup, and an oracle written straight from docs/formats.md.

The oracle (the ``spec`` fixture) never calls metal_marlin: it reads the raw int32 words as unsigned
integers with numpy and evaluates the spec's bit-field formulas in float64.
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

torch.set_num_threads(2)

# Independent of the package's registry: the spec's table of formats.
SPEC_BITS = {"int2": 2, "int3": 3, "int4": 4, "int8": 8, "fp4": 4, "fp8": 8}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def e2m1(u):
    """E2M1 value of each 4-bit code (docs: sign bit 3, exponent bits 2-1, mantissa bit 0)."""
    u = np.asarray(u, dtype=np.int64)
    e, m = (u >> 1) & 3, u & 1
    mag = np.where(e == 0, m * 0.5, 2.0 ** (e - 1.0) * (1 + m / 2))
    return np.where(u & 8, -mag, mag)


def e4m3(u):
    """E4M3 ("fn") value of each byte; NaN for 0x7F/0xFF."""
    u = np.asarray(u, dtype=np.int64)
    e, m = (u >> 3) & 15, u & 7
    mag = np.where(e == 0, 2.0**-6 * m / 8, 2.0 ** (e - 7.0) * (1 + m / 8))
    mag = np.where((e == 15) & (m == 7), np.nan, mag)
    return np.where(u & 128, -mag, mag)


def codes(packed: torch.Tensor, bits: int, k: int) -> np.ndarray:
    """Unsigned codes [..., k] (int64) from int32 words [..., k*bits/32], per the spec's layouts."""
    w = packed.contiguous().numpy().view(np.uint32).astype(np.int64)
    kk = np.arange(k)
    if bits == 3:
        b, c = kk // 32, kk % 32
        lo = (w[..., 3 * b + c // 16] >> (2 * (c % 16))) & 3
        hi = (w[..., 3 * b + 2] >> c) & 1
        return lo + 4 * hi
    per = 32 // bits
    return (w[..., kk // per] >> (bits * (kk % per))) & ((1 << bits) - 1)


def values(fmt: str, u: np.ndarray, symmetric: bool) -> np.ndarray:
    """Value of code ``u`` at scale 1 (for asymmetric integers: ``u`` itself, the offset comes apart)."""
    if fmt == "fp4":
        return e2m1(u)
    if fmt == "fp8":
        return e4m3(u)
    return (u - 2 ** (SPEC_BITS[fmt] - 1)).astype(np.float64) if symmetric else u.astype(np.float64)


def dequant(fmt: str, packed, scales, offsets, k: int, group_size: int) -> np.ndarray:
    """float64 ``W`` [..., N, K] from the stored tensors (``w = s*v`` or ``w = s*u + o``); weight ``k``
    is in group ``k // group_size`` (the last group may be shorter)."""
    u = codes(packed, SPEC_BITS[fmt], k)
    group = np.arange(k) // group_size
    assert scales.shape[-1] == group[-1] + 1, "scales must have ceil(K / group_size) columns"
    w = scales.numpy().astype(np.float64)[..., group] * values(fmt, u, offsets is None)
    if offsets is not None:
        w = w + offsets.numpy().astype(np.float64)[..., group]
    return w


@pytest.fixture(scope="session")
def spec():
    return SimpleNamespace(bits=SPEC_BITS, e2m1=e2m1, e4m3=e4m3, codes=codes, values=values, dequant=dequant)
