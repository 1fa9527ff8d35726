"""GPTQ (Frantar et al., 2022) for the group formats: columns are quantized in order and each column's
rounding error is spread over the columns not yet quantized, through the inverse Hessian's Cholesky
factor. Groups stay contiguous along K (the format's layout): without act-order a group's scales are
chosen when its first column is reached (from the error-updated weights); with act-order, columns
are visited by decreasing Hessian diagonal and every group's scales are chosen up front ("static
groups").
"""

from __future__ import annotations

import torch

from ..formats import GroupFormat, GroupQuantizedWeight, n_groups, resolve_group_size
from .hessian import damped

BLOCK = 128  # columns updated lazily together (the algorithm's blocking; results do not depend on it)


def gptq_quantize(
    w: torch.Tensor,
    hessian: torch.Tensor,
    fmt: GroupFormat,
    group_size: int = 128,
    symmetric: bool | None = None,
    scale_method: str = "mse",
    act_order: bool = False,
    damp: float = 0.01,
    name: str = "weight",
) -> GroupQuantizedWeight:
    """GPTQ-quantize ``w [N, K]`` with the input Hessian ``hessian [K, K]``."""
    if w.dim() != 2 or tuple(hessian.shape) != (w.shape[1], w.shape[1]):
        raise ValueError(f"{name}: weight {tuple(w.shape)} and Hessian {tuple(hessian.shape)} do not match")
    symmetric = fmt.default_symmetric if symmetric is None else symmetric
    if not symmetric and not fmt.supports_asymmetric:
        raise ValueError(f"{name}: format {fmt.name} has no asymmetric variant")
    n, k = w.shape
    g = resolve_group_size(group_size, k, name)
    groups = n_groups(k, g)
    h = damped(hessian, damp)
    weight = w.detach().double().cpu().clone()
    weight[:, hessian.diagonal() == 0] = 0
    order = torch.argsort(h.diagonal(), descending=True) if act_order else torch.arange(k)
    scales = torch.empty(n, groups, dtype=torch.float32)
    offsets = None if symmetric else torch.empty(n, groups, dtype=torch.float32)

    def set_group(j: int, values: torch.Tensor) -> None:
        s, o = fmt.choose_scales(values.float().unsqueeze(1), symmetric, scale_method, name)
        scales[:, j] = s[:, 0]
        if offsets is not None:
            offsets[:, j] = o[:, 0]

    if act_order:
        for j in range(groups):
            set_group(j, weight[:, j * g : (j + 1) * g])
    hp = h[order][:, order]
    wp = weight[:, order]
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hp)), upper=True)
    codes = torch.empty(n, k, dtype=torch.long)
    for b0 in range(0, k, BLOCK):
        b1 = min(b0 + BLOCK, k)
        block = wp[:, b0:b1].clone()
        errors = torch.zeros_like(block)
        for i in range(b1 - b0):
            col = order[b0 + i].item()
            j = col // g
            if not act_order and col % g == 0:
                set_group(j, torch.cat([block[:, i:], wp[:, b1:]], dim=1)[:, : min(g, k - col)])
            s = scales[:, j]
            o = None if offsets is None else offsets[:, j]
            c = fmt.encode_with(block[:, i : i + 1].float(), s, o)
            q = fmt.decode_with(c, s, o).double()
            codes[:, col] = c[:, 0]
            err = (block[:, i] - q[:, 0]) / hinv[b0 + i, b0 + i]
            block[:, i:] -= err.unsqueeze(1) * hinv[b0 + i, b0 + i : b1].unsqueeze(0)
            errors[:, i] = err
        wp[:, b1:] -= errors @ hinv[b0:b1, b1:]
    packed = fmt.pack(codes.to(torch.uint8))
    off16 = None if offsets is None else offsets.half()
    return GroupQuantizedWeight(fmt, (n, k), packed, scales.half(), off16, g)
