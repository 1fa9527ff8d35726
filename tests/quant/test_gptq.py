"""GPTQ against round-to-nearest under the Hessian-weighted loss it minimises."""

from __future__ import annotations

import pytest
import torch

from metal_marlin import get_format, quantize_weight
from metal_marlin.quant.gptq import gptq_quantize
from metal_marlin.quant.hessian import HessianAccumulator


def correlated_problem(n=48, k=192, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    mix = torch.randn(k, k, generator=g) / k**0.5
    x = torch.randn(2048, k, generator=g) @ mix + 0.05 * torch.randn(2048, k, generator=g)
    acc = HessianAccumulator(k)
    acc.add(x[:1000])
    acc.add(x[1000:])
    return w, acc.hessian(), x


def hessian_loss(w, w_hat, h):
    d = (w_hat.double() - w.double())
    return torch.einsum("nk,kl,nl->", d, h, d).item()


def test_accumulator_is_the_mean_outer_product():
    _, h, x = correlated_problem()
    # per-batch products are float32 (speed), accumulated in float64
    torch.testing.assert_close(h, (x.double().T @ x.double()) / x.shape[0], rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="no calibration rows"):
        HessianAccumulator(4).hessian()


@pytest.mark.parametrize(("fmt", "group_size"), [("int4", 64), ("int3", 32), ("int2", 64), ("fp4", 32), ("int4", -1)])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn(fmt, group_size, act_order):
    w, h, _ = correlated_problem()
    rtn = quantize_weight(w, fmt, group_size=group_size)
    gptq = gptq_quantize(w, h, get_format(fmt), group_size=group_size, act_order=act_order)
    assert (gptq.format, gptq.group_size, gptq.packed.shape) == (rtn.format, rtn.group_size, rtn.packed.shape)
    assert hessian_loss(w, gptq.dequantize(), h) < 0.8 * hessian_loss(w, rtn.dequantize(), h)


def test_identity_hessian_without_damping_is_rtn():
    w, _, _ = correlated_problem()
    eye = torch.eye(w.shape[1], dtype=torch.float64)
    for fmt, sym in (("int4", False), ("int3", True), ("fp4", None)):
        gptq = gptq_quantize(w, eye, get_format(fmt), group_size=32, symmetric=sym, damp=0.0)
        rtn = quantize_weight(w, fmt, group_size=32, symmetric=sym)
        assert torch.equal(gptq.packed, rtn.packed) and torch.equal(gptq.scales, rtn.scales)


def test_dead_inputs_and_shape_errors():
    w, h, _ = correlated_problem()
    h = h.clone()
    h[5, :] = 0
    h[:, 5] = 0
    q = gptq_quantize(w, h, get_format("int4"), group_size=32)
    assert torch.isfinite(q.dequantize()).all()
    with pytest.raises(ValueError, match="do not match"):
        gptq_quantize(w, h[:10, :10], get_format("int4"))
