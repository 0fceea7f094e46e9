"""The half-precision forms of `models/layers.py` and `models/kernels.py` (fewer kernels, no fp32 temporaries) agree
with the reference formulas evaluated in float64 on the same bf16 inputs, within bf16 rounding; the planner counts a
`mova::` op as one kernel and leaves gradient accumulation out of an optimizer step's first micro-step."""

from __future__ import annotations

import torch

from mova_train.models import kernels
from mova_train.models import layers as L
from mova_train.plan.tracker import StepTracker

CPU = torch.device("cpu")
BF16_EPS = 2.0**-8  # bf16 keeps 8 significant bits: one rounding is at most half of this, relative


def _close(got: torch.Tensor, want: torch.Tensor, roundings: int = 2) -> None:
    """|got - want| within `roundings` bf16 roundings of the largest value (and got really is bf16-rounded)."""
    err = (got.double() - want).abs().max().item()
    assert err <= roundings * BF16_EPS * want.abs().max().item(), err


def _bf16(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).bfloat16()


def test_interleaved_rope_as_complex_product():
    x, grad = _bf16(2, 12, 3, 32, seed=0), _bf16(2, 12, 3, 32, seed=1)
    rope = L.video_rope((3, 2, 2), 32, CPU)
    tables = tuple(t[None, :, None, :].double() for t in rope)
    xd = x.double().requires_grad_()
    want = L._rope_interleaved(xd, *tables)
    want.backward(grad.double())
    xb = x.clone().requires_grad_()
    got = L.apply_rope_interleaved(xb, rope)
    got.backward(grad)
    assert got.dtype == torch.bfloat16 and got.grad_fn.name() == "_RopePairsBackward"
    _close(got, want, roundings=1)
    _close(xb.grad, xd.grad, roundings=1)


def test_rotate_half_rope_in_pair_order_gives_the_same_scores():
    """The bridge's half-precision RoPE returns each pair's channels adjacent: a fixed permutation of the rotate-half
    result, the same for q and k, so q.k (the attention scores) is the reference's."""
    q, k, grad = _bf16(1, 10, 2, 32, seed=2), _bf16(1, 7, 2, 32, seed=3), _bf16(1, 10, 2, 32, seed=4)
    rope_q, rope_k = L._rotate_half_tables(10, 32, CPU), L._rotate_half_tables(7, 32, CPU)
    order = torch.stack([torch.arange(16), torch.arange(16) + 16], dim=-1).flatten()  # x[0], x[16], x[1], ...
    qd = q.double().requires_grad_()
    want_q = L._rope_rotate_half(qd, *(t[None, :, None, :].double() for t in rope_q))
    want_k = L._rope_rotate_half(k.double(), *(t[None, :, None, :].double() for t in rope_k))
    qb = q.clone().requires_grad_()
    got_q, got_k = L.rope_pairs(qb, rope_q, halves=True), L.rope_pairs(k, rope_k, halves=True)
    _close(got_q, want_q[..., order], roundings=1)
    scores = torch.einsum("blhd,bmhd->bhlm", got_q.double(), got_k.double())
    _close(scores, torch.einsum("blhd,bmhd->bhlm", want_q, want_k), roundings=4)
    got_q.backward(grad)
    reordered = torch.empty_like(grad, dtype=torch.float64)
    reordered[..., order] = grad.double()
    want_q.backward(reordered)  # the same gradient, seen in the reference's channel order
    _close(qb.grad, qd.grad, roundings=1)


def test_rms_norm_op_against_the_reference_formula():
    x, grad = _bf16(4, 9, 64, seed=5), _bf16(4, 9, 64, seed=6)
    xd = x.double().requires_grad_()
    want = L._rms_norm(xd, torch.ones(64, dtype=torch.float64), 1e-6)
    want.backward(grad.double())
    saved = []
    xb = x.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        got, rstd = kernels.rms_norm(xb, 1e-6)
    got.backward(grad)
    _close(got, want, roundings=1)
    _close(xb.grad, xd.grad, roundings=2)
    # backward keeps x itself and the per-row statistic, nothing of x's size in fp32
    assert rstd.shape == (4, 9, 1) and rstd.dtype == torch.float32 and not rstd.requires_grad
    assert sorted((str(t.dtype), t.numel()) for t in saved) == [
        ("torch.bfloat16", x.numel()),
        ("torch.float32", 36),
    ]


def test_fused_multiply_adds_match_the_reference():
    x, y = _bf16(2, 8, 16, seed=7), _bf16(2, 8, 16, seed=8)
    shift, scale, gate = _bf16(2, 1, 16, seed=9), _bf16(2, 1, 16, seed=10), _bf16(2, 1, 16, seed=11)
    cases = [
        (L.modulate(x, shift, scale), x.double() * (1 + scale.double()) + shift.double()),
        (L.gated_add(x, gate, y), x.double() + gate.double() * y.double()),
        (L.scaled_add(x, y, 0.7), x.double() + 0.7 * y.double()),
    ]
    for got, want in cases:
        assert got.dtype == torch.bfloat16
        _close(got, want, roundings=2)
    # fp32 keeps the reference graph bit for bit
    xf, yf, sf, gf = x.float(), y.float(), scale.float(), gate.float()
    assert torch.equal(L.modulate(xf, sf, sf), xf * (1 + sf) + sf)
    assert torch.equal(L.gated_add(xf, gf, yf), xf + gf * yf)


def test_tracker_counts_a_model_op_as_one_kernel_and_accumulation_apart():
    x = _bf16(4, 64, seed=12).requires_grad_()
    with StepTracker() as tracker:
        y, _ = kernels.rms_norm(x, 1e-6)
        y.sum().backward()
    # mova.rms_norm, sum, ones_like (the seed gradient), clone (the expanded seed made contiguous for the op) and
    # mova.rms_norm_backward: the norm is one kernel each way
    ops = tracker.kernels - tracker.matmul_kernels
    assert ops == 5 and tracker.matmul_kernels == 0
    assert tracker.accumulate_kernels == 0
    w = torch.nn.Parameter(torch.ones(64))
    w.grad = torch.zeros(64)  # as from an optimizer step's second micro-step
    with StepTracker() as again:
        (kernels.rms_norm(x.detach(), 1e-6)[0] * w).sum().backward()
    assert again.accumulate_kernels == 1  # w.grad += ...; the first micro-step (grad None) has none
    with StepTracker() as decomposed:
        xf = x.detach().requires_grad_().float()
        (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).bfloat16().sum().backward()
    assert (
        decomposed.kernels >= ops + 10
    )  # the same norm from aten ops: 6 kernels forward alone, more backward
