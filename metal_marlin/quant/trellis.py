"""Choosing trellis codes: incoherence processing, per-tensor scale, and LDLQ error feedback around the
tail-biting Viterbi encoder in ``_core`` (docs/formats.md, "Trellis format").

With a Hessian ``H = E[x x^T]`` of the layer's inputs, 16-column slabs are quantized from the last to
the first, each target corrected by the errors of the slabs already quantized (BlockLDLQ with
16x16 blocks, the tile width); without one, every tile is quantized independently.
"""

from __future__ import annotations

import torch

from .. import _core
from ..formats.hadamard import hadamard_block_size, hadamard_transform
from ..formats.trellis import (
    CODEBOOKS,
    TILE,
    TRELLIS,
    TrellisWeight,
    check_bits,
    codebook_rms,
    tile,
    untile,
)

# Input scale relative to the codebook RMS that minimises Gaussian distortion, per bit width
# (measured with our encoder: the optimum shrinks as the grid gets finer).
DEFAULT_RELATIVE_SCALE = {1: 1.0, 2: 0.97, 3: 0.93, 4: 0.88, 5: 0.86, 6: 0.85, 7: 0.85, 8: 0.85}
DEFAULT_DAMP = 0.01


def encode_tiles(targets: torch.Tensor, bits: int, codebook: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Tail-biting Viterbi of tiles ``targets [..., 256]``: packed streams ``[..., 8*bits]`` and values."""
    flat = targets.reshape(-1, TILE * TILE).float().contiguous()
    packed = torch.empty(flat.shape[0], 8 * bits, dtype=torch.int32)
    values = torch.empty_like(flat)
    _core.trellis_quantize(flat, bits, codebook, packed, values, torch.get_num_threads())
    return packed.reshape(*targets.shape[:-1], -1), values.reshape(targets.shape)


def to_q_space(w: torch.Tensor, su: torch.Tensor, sv: torch.Tensor, had_in: int, had_out: int) -> torch.Tensor:
    """``H_out diag(1/sv) W diag(1/su) H_in`` (the inverse of the reconstruction)."""
    m = w / sv.unsqueeze(1) / su.unsqueeze(0)
    m = hadamard_transform(m, had_in)
    return hadamard_transform(m.T.contiguous(), had_out).T


def rotate_hessian(hessian: torch.Tensor, su: torch.Tensor, had_in: int) -> torch.Tensor:
    """The Hessian of the Q-space inputs ``hadamard_in(x * su)``: ``H_in diag(su) H diag(su) H_in``."""
    h = hessian * su.unsqueeze(0) * su.unsqueeze(1)
    h = hadamard_transform(h, had_in)
    return hadamard_transform(h.T.contiguous(), had_in).T


def block_ldl(hessian: torch.Tensor, damp: float, block: int = TILE) -> torch.Tensor:
    """``L`` of ``H = L D L^T`` with identity ``block x block`` diagonal blocks (float64), after adding
    ``damp * mean(diag H)`` to the diagonal (more if the Cholesky factorisation fails)."""
    h = hessian.double()
    n = h.shape[0]
    mean_diag = h.diagonal().mean().clamp_min(1e-12)
    for attempt in range(8):
        reg = h + torch.eye(n, dtype=h.dtype) * mean_diag * damp * (4**attempt)
        chol, info = torch.linalg.cholesky_ex(reg)
        if info == 0:
            break
    else:
        raise ValueError("the Hessian is not positive definite even after damping")
    diag_blocks = chol.reshape(n // block, block, n // block, block).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    inv_blocks = torch.linalg.inv(diag_blocks)
    return chol @ torch.block_diag(*inv_blocks)


def ldlq(target: torch.Tensor, lower: torch.Tensor, bits: int, codebook: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``target [N, K]`` slab by slab from the last, feeding errors forward through ``lower``.

    For a row error ``e``, ``e H e^T = (e L) D (e L)^T`` and ``(e L)_j = e_j + sum_{i>j} e_i L_ij``: slab
    ``j`` is quantized to cancel the error the later slabs left. Returns tiles and values ``[N, K]``.
    """
    n, k = target.shape
    slabs = k // TILE
    packed = torch.empty(n // TILE, slabs, 8 * bits, dtype=torch.int32)
    values = torch.empty(n, k, dtype=torch.float32)
    error = torch.zeros(n, k, dtype=torch.float64)
    t64 = target.double()
    for j in range(slabs - 1, -1, -1):
        cols = slice(j * TILE, (j + 1) * TILE)
        later = slice((j + 1) * TILE, k)
        slab = t64[:, cols] + error[:, later] @ lower[later, cols]
        tiles = slab.float().reshape(n // TILE, TILE, TILE).reshape(n // TILE, TILE * TILE)
        slab_packed, slab_values = encode_tiles(tiles, bits, codebook)
        packed[:, j] = slab_packed
        values[:, cols] = slab_values.reshape(n, TILE)
        error[:, cols] = t64[:, cols] - values[:, cols].double()
    return packed, values


def quantize_trellis(
    w: torch.Tensor,
    bits: int = 4,
    codebook: str = "3inst",
    hessian: torch.Tensor | None = None,
    damp: float = DEFAULT_DAMP,
    relative_scale: float | None = None,
    max_hadamard_block: int = 128,
    seed: int = 0,
    name: str = "weight",
) -> TrellisWeight:
    """Trellis-quantize ``w [N, K_in]``, optionally with the input Hessian ``[K_in, K_in]`` (LDLQ)."""
    if not isinstance(w, torch.Tensor) or not w.is_floating_point() or w.dim() != 2:
        raise TypeError(f"{name}: expected a 2-D floating-point weight, got {getattr(w, 'shape', type(w))}")
    check_bits(bits)
    if codebook not in CODEBOOKS:
        raise ValueError(f"{name}: unknown trellis codebook {codebook!r}; choose from {CODEBOOKS}")
    n, k = w.shape
    if n % TILE or k % TILE:
        raise ValueError(f"{name}: trellis needs both dimensions to be multiples of {TILE}, got {n}x{k}")
    if not torch.isfinite(w).all():
        raise ValueError(f"{name}: weight contains NaN or Inf")
    if hessian is not None and tuple(hessian.shape) != (k, k):
        raise ValueError(f"{name}: Hessian shape {tuple(hessian.shape)} does not match K_in={k}")
    w = w.detach().double().cpu()
    had_in, had_out = hadamard_block_size(k, max_hadamard_block), hadamard_block_size(n, max_hadamard_block)
    gen = torch.Generator().manual_seed(seed)
    sign_in = torch.randint(0, 2, (k,), generator=gen).double() * 2 - 1
    sign_out = torch.randint(0, 2, (n,), generator=gen).double() * 2 - 1
    row_rms = w.square().mean(dim=1).sqrt()
    row_rms = torch.where(row_rms > 0, row_rms, torch.ones_like(row_rms))
    rel = DEFAULT_RELATIVE_SCALE[bits] if relative_scale is None else relative_scale
    # Rows are brought to RMS 1 before the output Hadamard mixes them; the codebook then sees an RMS of
    # rel * codebook_rms. Scales are rounded to float16 first, so the codes fit what is stored.
    su = sign_in.half()
    sv = (sign_out * row_rms / (rel * codebook_rms(codebook))).half()
    if torch.any(sv == 0) or not torch.isfinite(sv).all():
        raise ValueError(f"{name}: row scales do not fit float16")
    target = to_q_space(w, su.double(), sv.double(), had_in, had_out)
    if hessian is None:
        packed, _ = encode_tiles(tile(target.float()), bits, codebook)
    else:
        lower = block_ldl(rotate_hessian(hessian.double().cpu(), su.double(), had_in), damp)
        packed, _ = ldlq(target, lower, bits, codebook)
    return TrellisWeight(TRELLIS, (n, k), packed, su, sv, bits, codebook, had_in, had_out)


__all__ = ["block_ldl", "encode_tiles", "ldlq", "quantize_trellis", "untile"]
