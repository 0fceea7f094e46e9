"""LoRA's scale-and-add folded into lora_B's GEMM (`mova_train.lora.precision`, issue #13): taken in lean precision
when the base result is bf16 (DeepSpeed's bf16 module, or autocast with fp32 adapters), within bf16 rounding of
PEFT's forward there, with a full-size mul and add fewer per layer in forward and a full-size mul fewer in backward;
PEFT's own forward, bit for bit, everywhere else (fp32, reference, DoRA, dropout, several or disabled adapters)."""

from __future__ import annotations

import contextlib
import copy
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mova_train.lora import apply_lora, lora_parameters, randomize_lora, set_precision
from mova_train.lora.config import LoraConfig
from mova_train.lora.inject import iter_lora_layers
from mova_train.lora.precision import FusedLoraLinear, ScaledAddLinear
from mova_train.models import build_mova
from mova_train.models import layers as L

# max |a - b| / max |b| of a video block's output, its input gradient and all its LoRA gradients together. bf16 keeps
# 8 significant bits (relative rounding 2^-9 ~ 2e-3 per op); lean rounds each adapter's sum once where PEFT rounds
# lora_B's output, the scaled product and the sum, and the difference passes on through attention, FFN and backward.
# Measured lean vs reference 3.7e-3, 3.8e-3, 4.2e-3; vs fp32 lean 6.0e-3, 5.9e-3, 5.7e-3 and reference 6.0e-3,
# 5.9e-3, 6.5e-3 (lean is as close to fp32 as reference is). The bound is the one of tests/test_lean_precision.py
# for a bf16 block against fp32.
BF16_REL_TOL = 1e-2
RANK, ALPHA = 4, 8.0  # scaling 2: a scale that is not folded in would show
LAYERS_PER_BLOCK = 10  # q, k, v, o of both attentions and the FFN's two linears
TOKENS, CONTEXT, DIM = 48, 7, 96
# the smallest output of a LoRA layer (cross-attention k, v: [7, 96]); rank-r tensors have at most 128 x 4 elements
FULL_SIZE = CONTEXT * DIM


def _model(**lora) -> torch.nn.Module:
    model = build_mova("tiny", components=("video_dit",), device="cpu", seed=0)
    targets = {"video_dit": ["self_attn", "text_cross_attn", "ffn"]}
    apply_lora(model, LoraConfig(rank=RANK, alpha=ALPHA, targets=targets, **lora))
    randomize_lora(model, seed=1)  # B != 0: the adapters change outputs and get gradients everywhere
    return model


@pytest.fixture(scope="module")
def models():
    """fp32; DeepSpeed's bf16 module (adapters bf16 too); accelerate's bf16 base with fp32 adapters."""
    fp32 = _model()
    deepspeed = copy.deepcopy(fp32).to(torch.bfloat16)
    accelerate = copy.deepcopy(deepspeed)
    for p in lora_parameters(accelerate):
        p.data = p.data.float()
    return fp32, deepspeed, accelerate


@contextlib.contextmanager
def fused_calls(model):
    """Counts the lora_B calls that received an accumulator (the fused path), by their modules' own pre-hooks."""
    calls = Counter()

    def record(module, args, kwargs):
        calls["fused" if kwargs.get("accumulate") is not None else "plain"] += 1

    handles = [
        m.register_forward_pre_hook(record, with_kwargs=True)
        for m in model.modules()
        if isinstance(m, ScaledAddLinear)
    ]
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


class FullSizeOps(TorchDispatchMode):
    """aten ops by name whose output has at least FULL_SIZE elements; with `inside` (a model), only those that run
    inside its LoRA layers' forwards."""

    def __init__(self, inside: torch.nn.Module | None = None):
        super().__init__()
        self.ops, self.depth, self.handles = Counter(), 0 if inside else 1, []
        for m in inside.modules() if inside else ():
            if isinstance(m, FusedLoraLinear):
                self.handles += [
                    m.register_forward_pre_hook(self._enter),
                    m.register_forward_hook(self._leave),
                ]

    def _enter(self, *_):
        self.depth += 1

    def _leave(self, *_):
        self.depth -= 1

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.depth and isinstance(out, torch.Tensor) and out.numel() >= FULL_SIZE and not func.is_view:
            self.ops[func.overloadpacket.__name__] += 1
        return out


def _inputs(dtype):
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(1, TOKENS, 96, generator=g).to(dtype),  # x [B, L, D]
        torch.randn(1, CONTEXT, DIM, generator=g).to(dtype),  # context [B, N, D]
        (torch.randn(1, 6, 96, generator=g) * 0.1).to(dtype),  # t_mod [B, 6, D]
        L.video_rope((3, 4, 4), 32, torch.device("cpu")),
        torch.randn(1, TOKENS, 96, generator=g),  # upstream gradient
    )


def _run_block(model, precision, *, autocast=False, peft_lora=False):
    """Block 0 of the video tower, forward and backward: ([output, x.grad, LoRA grads...] in fp32, fused lora_B
    calls, full-size ops inside the LoRA layers' forwards, full-size ops of the backward). `peft_lora`: lean norms,
    PEFT's LoRA forward."""
    set_precision(model, precision)
    if peft_lora:
        for _, _, layer in iter_lora_layers(model):
            layer.lean = False
    model.zero_grad(set_to_none=True)
    dtype = next(model.parameters()).dtype
    x, ctx, t_mod, rope, grad = _inputs(dtype)
    x.requires_grad_()
    forward_ops, backward_ops = FullSizeOps(inside=model), FullSizeOps()
    autocast_mode = torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast)
    with fused_calls(model) as calls, autocast_mode, forward_ops:
        y = model.video_dit.blocks[0](x, ctx, t_mod, rope)
    with backward_ops:
        y.float().backward(grad)
    grads = [p.grad.float() for p in lora_parameters(model) if p.grad is not None]
    assert len(grads) == 2 * LAYERS_PER_BLOCK and y.dtype == dtype
    return [y.detach().float(), x.grad.float(), *grads], calls["fused"], forward_ops.ops, backward_ops.ops


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _assert_close(lean: list, reference: list, exact: list) -> None:
    """Output, input gradient and the LoRA gradients together: lean within BF16_REL_TOL of reference and of fp32."""

    def groups(v):
        return [v[0], v[1], torch.cat([t.flatten() for t in v[2:]])]

    for a, b, e in zip(groups(lean), groups(reference), groups(exact), strict=True):
        assert (
            0 < _rel(a, b) < BF16_REL_TOL and _rel(a, e) < BF16_REL_TOL
        )  # the sum is rounded once: not equal


def test_bf16_module_folds_scale_and_add_into_the_gemm(models):
    """DeepSpeed's case: everything bf16, no autocast."""
    fp32, deepspeed, _ = models
    exact = _run_block(fp32, "lean")[0]
    lean, fused, fwd, bwd = _run_block(deepspeed, "lean")
    reference, ref_fused, _, _ = _run_block(deepspeed, "reference")
    peft, peft_fused, peft_fwd, peft_bwd = _run_block(deepspeed, "lean", peft_lora=True)
    assert (fused, ref_fused, peft_fused) == (LAYERS_PER_BLOCK, 0, 0)
    _assert_close(lean, reference, exact)
    # inside the LoRA layers PEFT runs the base GEMM, lora_B's GEMM, a mul and an add; lean the two GEMMs only
    assert peft_fwd["mul"] == peft_fwd["add"] == LAYERS_PER_BLOCK
    assert set(fwd) == {"addmm"} and fwd["addmm"] == peft_fwd["addmm"] + LAYERS_PER_BLOCK
    # backward (lean norms in both, so the difference is the adapters'): the gradient's scaling on rank-r tensors
    assert peft_bwd["mul"] - bwd["mul"] == LAYERS_PER_BLOCK
    assert sum(peft_bwd.values()) - sum(bwd.values()) == LAYERS_PER_BLOCK


def test_bf16_autocast_with_fp32_adapters_fuses_within_tolerance(models):
    """accelerate's case: bf16 base, fp32 adapters, bf16 autocast; the addmm runs in bf16 (B is cast, small)."""
    fp32, _, accelerate = models
    exact = _run_block(fp32, "lean")[0]
    lean, fused, fwd, _ = _run_block(accelerate, "lean", autocast=True)
    reference, ref_fused, _, _ = _run_block(accelerate, "reference", autocast=True)
    assert (fused, ref_fused) == (LAYERS_PER_BLOCK, 0)
    _assert_close(lean, reference, exact)
    assert set(fwd) == {"addmm"}  # inside the LoRA layers: the two GEMMs, no full-size cast, mul or add
    assert all(p.dtype == torch.float32 for p in lora_parameters(accelerate))


@pytest.mark.parametrize("case", ["fp32", "bf16 base, fp32 adapters, no autocast"])
def test_other_precisions_run_pefts_forward_bit_for_bit(models, case):
    fp32, _, accelerate = models
    model = fp32 if case == "fp32" else accelerate
    lean, fused, _, _ = _run_block(model, "lean")
    reference, _, _, _ = _run_block(model, "lean", peft_lora=True)  # only the LoRA layers on PEFT's forward
    assert fused == 0
    assert all(torch.equal(a, b) for a, b in zip(lean, reference, strict=True))


def _single_layer_cases():
    """(name, layer, call kwargs) of layers the fused path must leave to PEFT, all in bf16 without autocast."""
    model = _model().to(torch.bfloat16)
    ffn = model.video_dit.blocks[0].ffn[0]
    dora = _model(use_dora=True).to(torch.bfloat16).video_dit.blocks[0].ffn[0]
    dropout = _model(dropout=0.1).to(torch.bfloat16).video_dit.blocks[0].ffn[0]
    dropout.eval()  # the same bits in both runs; p > 0 decides, not the mode
    two = _model()
    apply_lora(two, LoraConfig(rank=RANK, alpha=ALPHA, targets={"video_dit": ["ffn"]}), adapter_name="second")
    randomize_lora(two, seed=2, adapter_name="second")
    two = two.to(torch.bfloat16).video_dit.blocks[0].ffn[0]
    two.set_adapter(["default", "second"])
    return ffn, [
        ("dora", dora, {}),
        ("dropout", dropout, {}),
        ("two active adapters", two, {}),
        ("adapter_names", ffn, {"adapter_names": ["default"] * 2}),
    ]


def test_vanilla_layers_only_and_any_input_rank():
    ffn, fallbacks = _single_layer_cases()
    assert isinstance(ffn, FusedLoraLinear) and isinstance(ffn.lora_B["default"], ScaledAddLinear)
    g = torch.Generator().manual_seed(3)
    for shape in ((2, 5, 96), (7, 96)):  # [B, L, D] and [N, D]
        x = torch.randn(shape, generator=g).bfloat16()
        outs = []
        for precision in ("lean", "reference"):
            set_precision(ffn, precision)
            with fused_calls(ffn) as calls, torch.no_grad():
                outs.append(ffn(x))
            assert calls["fused"] == (precision == "lean")
        assert outs[0].shape == outs[1].shape == (*shape[:-1], 128) and outs[0].dtype == outs[1].dtype
        assert _rel(outs[0].float(), outs[1].float()) < BF16_REL_TOL
    x = torch.randn(2, 5, 96, generator=g).bfloat16()
    for name, layer, kwargs in fallbacks:
        outs = []
        for precision in ("lean", "reference"):
            set_precision(layer, precision)
            with fused_calls(layer) as calls, torch.no_grad():
                outs.append(layer(x, **kwargs))
            assert calls["fused"] == 0, name
        assert torch.equal(*outs), name
    for name, switch in (("disabled", lambda: ffn.enable_adapters(False)), ("merged", ffn.merge)):
        set_precision(ffn, "lean")
        switch()
        with fused_calls(ffn) as calls, torch.no_grad():
            ffn(x)
        assert calls["fused"] == 0, name
        ffn.enable_adapters(True)
