"""Lean precision (`model.precision`): norms and RoPE that keep no fp32 copies for backward, LoRA inputs not re-cast
under autocast. fp32: bit-identical to `reference`; bf16 (the fused half-precision forms of `models/layers.py`):
within the README's stated tolerance of fp32 and of reference; the saved tensors of a video block under bf16
autocast hold no fp32 tensor of token size."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.utils.checkpoint

from mova_train.errors import ConfigValueError
from mova_train.lora import apply_lora, lora_parameters, randomize_lora, set_precision
from mova_train.lora.config import LoraConfig
from mova_train.models import build_mova, kernels
from mova_train.models import layers as L
from mova_train.training.config import ModelConfig

# README "Lean precision": bf16 base + fp32 adapters under bf16 autocast vs the fp32 model, one video block of the
# tiny model, max |diff| / max |fp32 value|. Measured 5.4e-3 (output) and 5.6e-3 (LoRA gradients).
BF16_BLOCK_REL_TOL = 1e-2

CPU = torch.device("cpu")
TARGETS = {
    "video_dit": ["self_attn", "text_cross_attn", "ffn"],
    "audio_dit": ["self_attn"],
    "dual_tower_bridge": ["bridge_a2v", "bridge_v2a"],
}


@pytest.fixture
def cuda_layer_norm(monkeypatch):
    """CUDA's autocast rule for layer_norm on CPU: fp32 in, fp32 out (CPU autocast leaves it in bf16), so that the
    lean/reference difference of a GPU shows here."""
    plain = torch.nn.functional.layer_norm

    def layer_norm(x, shape, weight=None, bias=None, eps=1e-5):
        if not torch.is_autocast_enabled("cpu"):
            return plain(x, shape, weight, bias, eps)
        with torch.autocast("cpu", enabled=False):
            return plain(x.float(), shape, *(None if t is None else t.float() for t in (weight, bias)), eps)

    monkeypatch.setattr(torch.nn.functional, "layer_norm", layer_norm)


def _lora_model(components, dtype=torch.float32):
    model = build_mova("tiny", components=components, device="cpu", seed=0)
    apply_lora(model, LoraConfig(rank=4, alpha=4.0, targets={c: TARGETS[c] for c in components}))
    randomize_lora(model, seed=1)  # B != 0, so the adapters change outputs and get gradients everywhere
    if dtype != torch.float32:  # the trainer's plain-backend setup: a bf16 base, fp32 adapters
        model = copy.deepcopy(model).to(dtype)
        for p in lora_parameters(model):
            p.data = p.data.float()
    return model


@pytest.fixture(scope="module")
def video_models():
    fp32 = _lora_model(("video_dit",))
    return fp32, _lora_model(("video_dit",), torch.bfloat16)


def _block_inputs(b=1, grid=(3, 4, 4), dim=96):
    g = torch.Generator().manual_seed(0)
    n = grid[0] * grid[1] * grid[2]
    return (
        torch.randn(b, n, dim, generator=g),  # x [B, L, D]
        torch.randn(b, 7, dim, generator=g),  # context [B, N, D]
        torch.randn(b, 6, dim, generator=g) * 0.1,  # t_mod [B, 6, D]
        L.video_rope(grid, 32, CPU),
        torch.randn(b, n, dim, generator=g),  # upstream gradient
    )


def _run_block(model, precision, dtype, autocast, pack=None, recompute=False):
    """Block 0 of the video tower, forward and backward -> (output, LoRA gradients of the block) in fp32."""
    set_precision(model, precision)
    model.zero_grad(set_to_none=True)
    x, ctx, t_mod, rope, grad = _block_inputs()
    x = x.to(dtype).requires_grad_()
    block = model.video_dit.blocks[0]
    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if pack else torch.enable_grad()
    with hooks, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        args = (x, ctx.to(dtype), t_mod.to(dtype), rope)
        y = (
            torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
            if recompute
            else block(*args)
        )
    y.float().backward(grad)
    return y.detach().float(), [p.grad.float() for p in lora_parameters(model) if p.grad is not None]


# ---- the functions on their own ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_functions_match_the_formula_bit_for_bit(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 10, 3, 32, generator=g).to(dtype)
    grad = torch.randn(2, 10, 3, 32, generator=g).to(dtype)
    for apply, formula, rope in (
        (L.apply_rope_interleaved, L._rope_interleaved, L.audio_rope(10, 32, CPU)),
        (L.apply_rope_rotate_half, L._rope_rotate_half, L._rotate_half_tables(10, 32, CPU)),
    ):
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya = apply(xa, rope)
        yb = formula(xb, *(t[None, :, None, :] for t in rope))
        ya.backward(grad)
        yb.backward(grad)
        assert ya.dtype == dtype and "_Rope" in ya.grad_fn.name()  # a Function, which keeps only the tables
        if dtype == torch.bfloat16 and apply is L.apply_rope_interleaved:
            # the complex product (tests/test_fused_half.py): fp32 inside like the formula, but its products and
            # sums may be fused differently by the CPU's vector code, so within one bf16 rounding
            for a, b in ((ya, yb), (xa.grad, xb.grad)):
                torch.testing.assert_close(a, b, rtol=0, atol=2**-8 * b.abs().max().item())
        else:
            assert torch.equal(ya, yb) and torch.equal(xa.grad, xb.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("autocast", [False, True])
def test_lean_norms_match_reference_bit_for_bit(dtype, autocast):
    """Outputs and gradients (input and affine parameters) of lean and reference norms are identical; on CPU autocast
    keeps layer_norm in bf16, so bf16 is identical too (on CUDA lean returns bf16 where reference returns fp32),
    except the bf16 RMSNorm's input gradient: lean's `mova::rms_norm` computes it by its own fp32 formula, within
    one bf16 rounding of autograd's."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 10, 96, generator=g).to(dtype)
    grad = torch.randn(2, 10, 96, generator=g)
    norms = [L.RMSNorm(96), L.LayerNorm(96, 1e-6, True), L.LayerNorm(96, 1e-6, False)]
    for norm in norms:
        norm.to(dtype)
        for p in norm.parameters():
            p.data.normal_(1.0, 0.1, generator=g)
        results = []
        for lean in (True, False):
            norm.lean = lean
            norm.zero_grad(set_to_none=True)
            xi = x.clone().requires_grad_()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                y = norm(xi)
            y.float().backward(grad)
            results.append([y, xi.grad, *(p.grad for p in norm.parameters())])
        for i, (a, b) in enumerate(zip(*results, strict=True)):
            if i == 1 and dtype == torch.bfloat16 and isinstance(norm, L.RMSNorm):
                torch.testing.assert_close(a, b, rtol=2**-7, atol=2**-7 * b.abs().max().item())
            else:
                assert torch.equal(a, b), type(norm).__name__
        assert results[0][0].dtype == dtype


def test_custom_functions_pass_gradcheck_in_float64():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 2, 8, dtype=torch.float64, generator=g, requires_grad=True)  # [B, L, H, d]
    w = torch.randn(16, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(16, dtype=torch.float64, generator=g, requires_grad=True)
    tokens = x.detach().flatten(-2).requires_grad_()  # [B, L, D] for the norms
    interleaved = tuple(t[None, :, None, :].double() for t in L.audio_rope(3, 8, CPU))
    rotate_half = tuple(t[None, :, None, :].double() for t in L._rotate_half_tables(3, 8, CPU))
    checks = [
        (lambda x: L._RopeInterleaved.apply(x, *interleaved), (x,)),
        (lambda x: L._RopeRotateHalf.apply(x, *rotate_half), (x,)),
        (lambda x, w: L._LeanRMSNorm.apply(x, w, 1e-6), (tokens, w)),
        (lambda x, w, b: L._LeanLayerNorm.apply(x, w, b, 1e-6), (tokens, w, b)),
        (lambda x: L._LeanLayerNorm.apply(x, None, None, 1e-6), (tokens,)),
        (lambda x: L.rope_pairs(x, L.audio_rope(3, 8, CPU), halves=False), (x,)),
        (lambda x: L.rope_pairs(x, L._rotate_half_tables(3, 8, CPU), halves=True), (x,)),
        (lambda x: kernels.rms_norm(x, 1e-6)[0], (tokens,)),
    ]
    for fn, inputs in checks:
        assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


# ---- the model ------------------------------------------------------------------------------------------------


def test_fp32_model_lean_equals_reference_bit_for_bit():
    """The golden-loss path: fp32 base, no autocast; the dual-tower step with LoRA on towers and bridge."""
    model = _lora_model(("video_dit", "audio_dit", "dual_tower_bridge"))
    g = torch.Generator().manual_seed(0)
    inputs = dict(
        video_latents=torch.randn(1, 16, 2, 4, 6, generator=g),
        video_cond=torch.randn(1, 20, 2, 4, 6, generator=g),
        audio_latents=torch.randn(1, 128, 9, generator=g),
        text=torch.randn(1, 7, 32, generator=g),
        timestep_video=torch.tensor([950.0]),
    )

    def run(precision):
        set_precision(model, precision)
        model.zero_grad(set_to_none=True)
        pv, pa = model(**inputs, expert="video_dit")
        (pv.square().mean() + pa.square().mean()).backward()
        return [pv.detach(), pa.detach(), *(p.grad for p in lora_parameters(model))]

    reference, lean = run("reference"), run("lean")
    assert all(g is not None for g in reference[2:]) and len(reference) > 100
    for a, b in zip(reference, lean, strict=True):
        assert torch.equal(a, b)


def test_block_lean_recomputed_equals_plain(video_models):
    """Under activation checkpointing the lean Functions run again in the recomputation (under the forward's
    autocast state) with the same bits: fp32 against reference, bf16 autocast against lean without recomputation."""
    fp32, bf16 = video_models
    for model, dtype, against in ((fp32, torch.float32, "reference"), (bf16, torch.bfloat16, "lean")):
        plain = _run_block(model, against, dtype, autocast=dtype != torch.float32)
        recomputed = _run_block(model, "lean", dtype, autocast=dtype != torch.float32, recompute=True)
        assert len(plain[1]) == 2 * 10  # A and B of q/k/v/o of both attentions and of the two FFN linears
        assert torch.equal(plain[0], recomputed[0])
        assert all(torch.equal(a, b) for a, b in zip(plain[1], recomputed[1], strict=True))


def test_lean_block_runs_on_meta():
    """Shape-only runs (full-size inspection and planning on `meta`) go through the Functions and LoRA hook."""
    model = build_mova("tiny", components=("video_dit",), device="meta")
    apply_lora(model, LoraConfig(rank=4, alpha=4.0, targets={"video_dit": ["self_attn"]}))
    x = torch.empty(1, 48, 96, device="meta", requires_grad=True)
    rope = tuple(t.to("meta") for t in L.video_rope((3, 4, 4), 32, CPU))
    y = model.video_dit.blocks[0](
        x, torch.empty(1, 7, 96, device="meta"), torch.empty(1, 6, 96, device="meta"), rope
    )
    y.sum().backward()
    assert x.grad.shape == x.shape and x.grad.device.type == "meta"


@pytest.mark.parametrize("gpu_rule", [False, True])
def test_bf16_lean_block_within_tolerance_of_fp32(video_models, gpu_rule, request):
    if gpu_rule:
        request.getfixturevalue("cuda_layer_norm")
    fp32, bf16 = video_models
    exact = _run_block(fp32, "lean", torch.float32, autocast=False)
    lean = _run_block(bf16, "lean", torch.bfloat16, autocast=True)
    reference = _run_block(bf16, "reference", torch.bfloat16, autocast=True)

    def rel(a, b):
        a, b = (torch.cat([t.flatten() for t in v]) if isinstance(v, list) else v for v in (a, b))
        return ((a - b).abs().max() / b.abs().max()).item()

    for a, b in zip(lean, exact, strict=True):
        assert 0 < rel(a, b) < BF16_BLOCK_REL_TOL  # bf16 does differ, by less than stated
    for a, b in zip(lean, reference, strict=True):
        # lean takes the fused half-precision forms (one rounding where reference rounds twice), and under the GPU
        # rule reference modulates the fp32 LayerNorm output, lean its bf16 rounding
        assert rel(a, b) < BF16_BLOCK_REL_TOL


@pytest.mark.parametrize("gpu_rule", [False, True])
def test_video_block_saves_no_fp32_token_tensor_under_bf16_autocast(video_models, gpu_rule, request):
    if gpu_rule:
        request.getfixturevalue("cuda_layer_norm")
    _, bf16 = video_models
    params = {p.untyped_storage().data_ptr() for p in bf16.parameters()}
    x = _block_inputs()[0]
    token_numel = x.numel()  # B * L * D

    def saved_storages(precision):
        saved: dict[int, tuple[torch.dtype, int]] = {}  # storage -> (dtype, bytes); views counted once

        def pack(t):
            if t.untyped_storage().data_ptr() not in params:
                saved[t.untyped_storage().data_ptr()] = (t.dtype, t.untyped_storage().nbytes())
            return t

        _run_block(bf16, precision, torch.bfloat16, autocast=True, pack=pack)
        return saved

    lean, reference = saved_storages("lean"), saved_storages("reference")
    fp32_tokens = {p: n for p, (dt, n) in reference.items() if dt == torch.float32 and n >= 4 * token_numel}
    # reference: the fp32 copies of the RMSNorms' inputs (q, k, cross-attention q), and under the GPU rule of the
    # three LayerNorms' inputs too (the test can fail)
    assert len(fp32_tokens) == (6 if gpu_rule else 3)
    assert not [n for dt, n in lean.values() if dt == torch.float32 and n >= 4 * token_numel]
    lean_bytes, reference_bytes = (sum(n for _, n in s.values()) for s in (lean, reference))
    assert lean_bytes <= reference_bytes - sum(fp32_tokens.values()) // 2


# ---- LoRA casts and configuration ---------------------------------------------------------------------------


def test_lora_layers_skip_peft_input_cast_only_under_autocast(video_models):
    _, bf16 = video_models
    x, ctx, t_mod, rope, _ = _block_inputs()
    block = bf16.video_dit.blocks[0]
    layer = block.self_attn.q
    for precision, autocast, casts in (
        ("lean", True, False),
        ("lean", False, True),  # a bf16 base with fp32 adapters needs PEFT's cast without autocast
        ("reference", True, True),
    ):
        set_precision(bf16, precision)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = block(x.bfloat16(), ctx.bfloat16(), t_mod.bfloat16(), rope)
        assert layer.cast_input_dtype_enabled is casts and torch.isfinite(y).all()
    set_precision(bf16, "lean")


def test_dora_layers_keep_the_input_cast():
    model = build_mova("tiny", components=("audio_dit",), device="cpu", seed=0)
    apply_lora(model, LoraConfig(rank=4, alpha=4.0, use_dora=True, targets={"audio_dit": ["self_attn"]}))
    layer = model.audio_dit.blocks[0].self_attn.q
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(torch.randn(1, 5, 64))
    assert layer.cast_input_dtype_enabled is True


def test_precision_setting_is_validated():
    with pytest.raises(ConfigValueError, match="model.precision"):
        ModelConfig(checkpoint="ckpt", precision="fast").validate()
    ModelConfig(checkpoint="ckpt", precision="reference").validate()
    assert ModelConfig.precision == "lean"
    with pytest.raises(ValueError, match="allowed: lean, reference"):
        set_precision(torch.nn.Linear(2, 2), "fast")


def test_reference_precision_keeps_the_original_bf16_graph(video_models):
    """The half-precision fused forms (`mova::rms_norm`, RoPE as a complex product, addcmul for modulation and
    gates, addmm for LoRA's scale-and-add) run in lean precision only: reference computes the original graph."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.add(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    fused = {"mova.rms_norm", "mova.rms_norm_backward", "aten.view_as_complex", "aten.addcmul", "aten.addmm"}
    _, bf16 = video_models
    for precision in ("lean", "reference"):
        with Ops() as ops:
            _run_block(bf16, precision, torch.bfloat16, autocast=False)
        # addmm: the LoRA B GEMM with the accumulator (the reference's linears run as mm: no bias on lora_B)
        assert (fused <= ops.seen) if precision == "lean" else not (fused - {"aten.addmm"}) & ops.seen, (
            precision
        )
