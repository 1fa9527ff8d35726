"""The trellis format against oracles written here from docs/formats.md ("Trellis format"): scalar
Python codebooks (struct's binary16), a big-integer bit-stream decoder, and Kronecker-built Hadamards."""

from __future__ import annotations

import math
import random
import struct

import numpy as np
import pytest
import torch

from metal_marlin import TrellisWeight, get_format
from metal_marlin.formats.hadamard import hadamard_block_size, hadamard_transform
from metal_marlin.formats.trellis import (
    CODEBOOKS,
    codebook_values,
    decode_tiles,
    pack_states,
    stream_states,
    tile,
    untile,
)

M32 = 0xFFFFFFFF


def half(bits16: int) -> float:
    return struct.unpack("<e", struct.pack("<H", bits16))[0]


def round16(x: float) -> float:
    return struct.unpack("<e", struct.pack("<e", x))[0]  # struct rounds to nearest even


def spec_value(codebook: str, s: int) -> float:
    if codebook in ("3inst", "mcg"):
        x = (s * 89226354 + 64248484) & M32 if codebook == "3inst" else (s * 0xCBAC1FED) & M32
        x = (x & 0x8FFF8FFF) ^ 0x3B603B60
        return round16(half(x & 0xFFFF) + half(x >> 16))
    if codebook == "1mad":
        x = (s * 34038481 + 76625530) & M32
        y = sum((x >> (8 * i)) & 0xFF for i in range(4))
        return float(np.float32(y - 510) / np.float32(147.800537109375))
    x = (s * 0x83DCD12D) & M32
    y = sum((x >> (8 * i)) & 0xFF for i in range(4))
    return round16((1024 + y) * half(0x1EEE) + half(0xC931))


@pytest.mark.parametrize("codebook", CODEBOOKS)
def test_codebook_table_matches_the_spec(codebook):
    table = codebook_values(codebook)
    assert table.shape == (65536,) and table.dtype == torch.float32
    rng = random.Random(codebook)
    for s in [0, 1, 0x7FFF, 0x8000, 0xFFFF, *rng.sample(range(65536), 600)]:
        assert table[s].item() == spec_value(codebook, s), (codebook, s)


@pytest.mark.parametrize(("codebook", "rms"), [("3inst", 1.2437), ("mcg", 1.2441), ("1mad", 1.0001), ("mul1", 1.0003)])
def test_codebook_statistics(codebook, rms):
    t = codebook_values(codebook).double()
    assert abs(t.mean().item()) < 0.003
    assert t.square().mean().sqrt().item() == pytest.approx(rms, abs=5e-4)


def spec_states(words: list[int], bits: int) -> list[int]:
    """Step t's state: the 16-bit window ending at stream bit (t+1)*bits, MSB first, circular."""
    total = 256 * bits
    ring = 0
    for w in words:
        ring = (ring << 32) | (w & M32)
    bit = lambda m: (ring >> (total - 1 - (m % total))) & 1  # noqa: E731
    out = []
    for t in range(256):
        end = (t + 1) * bits
        out.append(sum(bit(end - 16 + i) << (15 - i) for i in range(16)))
    return out


@pytest.mark.parametrize("bits", range(1, 9))
def test_stream_decoding_matches_the_spec(bits):
    rng = np.random.default_rng(bits)
    words = rng.integers(0, 2**32, size=(3, 8 * bits), dtype=np.uint64)
    packed = torch.from_numpy(words.astype(np.uint32).view(np.int32))
    states = stream_states(packed, bits)
    for row in range(3):
        assert states[row].tolist() == spec_states([int(w) for w in words[row]], bits)
    # Consecutive states overlap: s_t = ((s_{t-1} << bits) | new) & 0xFFFF, ring included.
    prev = torch.roll(states, 1, dims=-1)
    assert torch.equal((prev << bits) & 0xFFFF, states & (0xFFFF ^ ((1 << bits) - 1)))
    assert torch.equal(pack_states(states, bits), packed)
    values = decode_tiles(packed, bits, "3inst")
    assert torch.equal(values, codebook_values("3inst")[states])


def test_tile_order_is_row_major_16x16():
    m = torch.arange(32 * 48, dtype=torch.float32).reshape(32, 48)
    tiles = tile(m)
    assert tiles.shape == (2, 3, 256)
    assert tiles[1, 2, 17].item() == m[16 + 1, 32 + 1].item()
    assert torch.equal(untile(tiles), m)


def dense_hadamard(n: int, block: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < block:
        h = torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64), h)
    return torch.block_diag(*[h / math.sqrt(block)] * (n // block))


@pytest.mark.parametrize(("n", "block"), [(576, 64), (1536, 128), (192, 64), (4096, 128), (48, 16), (96, 32)])
def test_hadamard_blocks(n, block):
    assert hadamard_block_size(n) == block
    x = torch.randn(3, n, dtype=torch.float64)
    torch.testing.assert_close(hadamard_transform(x, block), x @ dense_hadamard(n, block), rtol=0, atol=1e-12)
    assert hadamard_block_size(4096, max_block=512) == 512


def test_dequantize_is_the_spec_reconstruction():
    rng = np.random.default_rng(0)
    n, k, bits = 64, 96, 3
    packed = torch.from_numpy(rng.integers(0, 2**32, size=(n // 16, k // 16, 8 * bits),
                                           dtype=np.uint64).astype(np.uint32).view(np.int32))
    su = torch.from_numpy(rng.choice([-1.0, 1.0], k) * rng.uniform(0.5, 2, k)).half()
    sv = torch.from_numpy(rng.choice([-1.0, 1.0], n) * rng.uniform(0.5, 2, n)).half()
    tw = TrellisWeight(get_format("trellis"), (n, k), packed, su, sv, bits, "mcg", hadamard_block_size(k),
                       hadamard_block_size(n))
    q = torch.zeros(n, k, dtype=torch.float64)
    for i in range(n // 16):
        for j in range(k // 16):
            states = spec_states([int(w) & M32 for w in packed[i, j].tolist()], bits)
            for t, s in enumerate(states):
                q[16 * i + t // 16, 16 * j + t % 16] = spec_value("mcg", s)
    want = torch.diag(sv.double()) @ dense_hadamard(n, 64) @ q @ dense_hadamard(k, 32) @ torch.diag(su.double())
    torch.testing.assert_close(tw.dequantize(torch.float64), want, rtol=0, atol=1e-10)
    assert tw.bits_per_weight == pytest.approx(bits + 16 * (n + k) / (n * k))
