"""TP-invariant mode's float64 pieces on one rank (model/fp8/invariant.py): each equals the default computation up
to fp32 rounding, in value and gradient. Their TP=2 behaviour is tested in tests/distributed/test_fp8_parity.py."""

import torch

from genlip_mcore.model.fp8.invariant import cross_entropy_fp64, layer_norm_fp64, residual_add_fp64, tp_sum_fp64
from genlip_mcore.model.layer import residual_add


def _grads(fn, *tensors):
    ts = [t.clone().requires_grad_(True) for t in tensors]
    out = fn(*ts)
    out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape))
    return out.detach(), [t.grad for t in ts]


def test_cross_entropy_fp64_is_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(40, 300, generator=g, dtype=torch.float64) * 4
    labels = torch.randint(0, 300, (40,), generator=g)
    ours, (d_ours,) = _grads(lambda z: cross_entropy_fp64(z, labels), logits)
    ref, (d_ref,) = _grads(lambda z: torch.nn.functional.cross_entropy(z, labels, reduction="none"), logits)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(d_ours, d_ref, rtol=1e-12, atol=1e-12)


def test_layer_norm_and_residual_fp64_round_once():
    g = torch.Generator().manual_seed(1)
    x, res = torch.randn(2, 64, 1, 96, generator=g)
    w, b, gamma = torch.randn(3, 96, generator=g)
    scale = (torch.rand(64, 1, 1, generator=g) > 0.3).float() / 0.7
    for ours, ref, args in (
            (lambda *a: layer_norm_fp64(*a, eps=1e-6, sequence_parallel=True),
             lambda x_, w_, b_: torch.nn.functional.layer_norm(x_, (96,), w_, b_, 1e-6), (x, w, b)),
            (lambda *a: residual_add_fp64(a[0], a[1], a[2], scale, a[3], sequence_parallel=True),
             lambda x_, b_, g_, r_: residual_add(x_, b_, g_, scale, r_), (x, b, gamma, res))):
        y, dy = _grads(ours, *args)
        y_ref, dy_ref = _grads(ref, *args)
        assert y.dtype == torch.float32 and all(d.dtype == torch.float32 for d in dy)
        torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
        for d, d_ref in zip(dy, dy_ref, strict=True):
            torch.testing.assert_close(d, d_ref, rtol=1e-5, atol=1e-5)


def test_parameter_gradient_is_one_float64_sum():
    """Without a TP group the parameter's gradient is the float64 sum over tokens, rounded once: the same bits
    whichever way the tokens are ordered (fp32 sums of the same values in two orders differ here)."""
    g = torch.Generator().manual_seed(2)
    dy = torch.randn(4096, 8, generator=g) * torch.logspace(-4, 4, 4096)[:, None]
    w = torch.ones(8, requires_grad=True)
    (tp_sum_fp64(w, sequence_parallel=True) * dy.double()).sum().backward()
    perm = torch.randperm(4096, generator=g)
    w2 = torch.ones(8, requires_grad=True)
    (tp_sum_fp64(w2, sequence_parallel=True) * dy[perm].double()).sum().backward()
    assert w.grad.dtype == torch.float32 and torch.equal(w.grad, w2.grad)
    assert torch.equal(w.grad, dy.double().sum(0).float())
    assert not torch.equal(dy.sum(0), dy[perm].sum(0))
