"""Building blocks shared by the MOVA towers and bridge: norms, timestep sinusoid, the two RoPE conventions, attention.

Layouts: B batch, L tokens, H heads, d head_dim, D = H*d model width.
RoPE tables are (cos, sin) pairs computed on first use for a given shape and device (never module buffers, so
nothing appears in the state dict and nothing is computed on `meta`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..names import ATTENTION_KERNELS, PRECISIONS
from . import kernels

# Optional kernels, each used only where installed: FA3 (flash-attention's Hopper build) and FA2.
try:
    from flash_attn_interface import flash_attn_func as _fa3_func
except ImportError:  # pragma: no cover - depends on the machine
    _fa3_func = None
try:
    from flash_attn import flash_attn_func as _fa2_func
except ImportError:  # pragma: no cover - depends on the machine
    _fa2_func = None

logger = logging.getLogger(__name__)
_attention_kernel: str | None = None  # runs on half-precision CUDA tensors; None: `auto`, on the first call
_logged_kernels: set[str] = set()


def available_attention_kernels(device: torch.device | str) -> list[str]:
    """The kernels that can run on `device`, fastest first (`auto` takes the first): FA3 (Hopper, with
    flash_attn_interface), cuDNN (torch SDPA's cuDNN backend, sm80+ with cuDNN 9), FA2 (flash_attn, else torch
    SDPA's flash backend, which is FA2's kernel; sm80+), and SDPA with torch's own choice (everywhere)."""
    device = torch.device(device)
    kernels = []
    if device.type == "cuda" and torch.cuda.is_available():
        major, _ = torch.cuda.get_device_capability(device)
        hopper = major == 9
        cudnn_ok = torch.backends.cudnn.is_available() and (torch.backends.cudnn.version() or 0) >= 90000
        if hopper and _fa3_func is not None:
            kernels.append("fa3")
        if major >= 8:  # the cuDNN and flash SDPA backends need Ampere or newer
            kernels += (["cudnn"] if cudnn_ok else []) + ["fa2"]
            if not hopper:  # before Hopper, FA2 is the faster of the two
                kernels.sort(key=["fa2", "cudnn"].index)
    return [*kernels, "sdpa"]


def set_attention_backend(name: str, device: torch.device | str = "cpu") -> str:
    """Choose the attention kernel for `device` (`model.attention`); returns the one that will run. An unknown
    name or a kernel this machine cannot run is a one-line ValueError."""
    global _attention_kernel
    if name not in ATTENTION_KERNELS:
        raise ValueError(f"model.attention={name!r} unknown; allowed: {', '.join(ATTENTION_KERNELS)}")
    usable, requested = available_attention_kernels(device), name
    if name == "auto":
        name = usable[0]
    elif name not in usable:
        raise ValueError(
            f"model.attention={name!r} cannot run on {torch.device(device)} here (usable: {', '.join(usable)}; "
            "fa3 needs a Hopper GPU and flash_attn_interface, fa2 and cudnn an sm80+ GPU)"
        )
    _attention_kernel = name
    _logged_kernels.clear()
    logger.info("model.attention=%s: %s on fp16/bf16 CUDA tensors, SDPA on others", requested, name)
    return name


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend=None) -> torch.Tensor:
    """torch SDPA on [B, L, H, d] tensors, restricted to one backend when given."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, L, d]
    if backend is None:
        out = F.scaled_dot_product_attention(q, k, v)
    else:
        with sdpa_kernel([backend]):
            out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2)  # [B, Lq, H, d]


def _log_kernel_once(kernel: str, why: str = "") -> None:
    if kernel not in _logged_kernels:
        _logged_kernels.add(kernel)
        logger.info("attention kernel: %s%s", kernel, why)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Full (unmasked) attention with scale 1/sqrt(d). q [B, Lq, H, d], k/v [B, Lk, H, d] -> [B, Lq, H*d].

    The chosen kernel runs on CUDA tensors of one half-precision dtype; anything else (CPU, fp32) runs SDPA."""
    global _attention_kernel
    b, lq, h, d = q.shape
    if _attention_kernel is None and q.is_cuda:  # no set_attention_backend call (sampling): `auto`
        _attention_kernel = available_attention_kernels(q.device)[0]
    kernel = _attention_kernel or "sdpa"
    half = q.dtype in (torch.float16, torch.bfloat16) and q.dtype == k.dtype == v.dtype
    why = ""
    if kernel != "sdpa" and not (q.is_cuda and half):
        kernel, why = "sdpa", f" ({kernel} needs fp16/bf16 CUDA tensors; got {q.dtype} on {q.device.type})"
    if not torch.compiler.is_compiling():  # logging inside a compiled block would break its graph
        _log_kernel_once(kernel, why)
    if kernel == "fa3":
        out = _fa3_func(q, k, v)
        out = out[0] if isinstance(out, tuple) else out  # older builds also return the log-sum-exp
    elif kernel == "fa2" and _fa2_func is not None:
        out = _fa2_func(q, k, v)  # [B, Lq, H, d]
    elif kernel == "fa2":
        out = _sdpa(q, k, v, SDPBackend.FLASH_ATTENTION)
    elif kernel == "cudnn":
        out = _sdpa(q, k, v, SDPBackend.CUDNN_ATTENTION)
    else:
        out = _sdpa(q, k, v)
    return out.reshape(b, lq, h * d)


# ---- precision: norms and RoPE that keep no fp32 copy of their input for backward ------------------------------
# `lean` (the default) and `reference` give bit-identical results in fp32. In bf16 the norms differ in one way only:
# under autocast a lean LayerNorm returns the input's dtype instead of autocast's fp32. RMSNorm and RoPE compute the
# same values in both modes (they already returned the input's dtype); lean saves less for backward.


def autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for `device_type`; False for types autocast does not know (`meta`)."""
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def _autocast_state(device_type: str) -> tuple[str, bool, torch.dtype | None]:
    if not autocast_enabled(device_type):
        return device_type, False, None
    return device_type, True, torch.get_autocast_dtype(device_type)


def _recompute_grads(ctx, fn, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """Gradients of `fn(*saved inputs)` by re-running it under the forward's autocast state: the same ops as the
    reference graph, so the same bits, while only the (base-dtype) inputs were kept between forward and backward."""
    device_type, enabled, dtype = ctx.autocast
    inputs = [
        None if t is None else t.detach().requires_grad_(need)
        for t, need in zip(ctx.saved_tensors, ctx.needs_input_grad, strict=False)
    ]
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    autocast = torch.autocast(device_type, dtype=dtype) if enabled else contextlib.nullcontext()
    with torch.enable_grad(), autocast:
        out = fn(*inputs)
    grads = iter(torch.autograd.grad(out, wanted, grad_out) if wanted else ())
    return tuple(next(grads) if t is not None and t.requires_grad else None for t in inputs)


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """x in fp32, or in float64 if it is (so that gradcheck can check the formulas below)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The reference formula: statistics and scaling in fp32, rounded to x's dtype before the weight."""
    xf = _at_least_fp32(x)
    y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return y.to(x.dtype) * weight


class _LeanRMSNorm(torch.autograd.Function):
    """`_rms_norm` that saves only x (its own dtype) and the weight; backward recomputes the fp32 statistics."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        ctx.eps = eps
        ctx.autocast = _autocast_state(x.device.type)
        ctx.save_for_backward(x, weight)
        return _rms_norm(x, weight, eps)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        return (*_recompute_grads(ctx, lambda x, w: _rms_norm(x, w, ctx.eps), grad), None)


def _layer_norm(x, weight, bias, eps: float, lean: bool) -> torch.Tensor:
    """F.layer_norm as autocast runs it (fp32 under CUDA autocast); lean rounds the result to x's dtype."""
    y = F.layer_norm(x, x.shape[-1:], weight, bias, eps)
    return y.to(x.dtype) if lean else y


class _LeanLayerNorm(torch.autograd.Function):
    """`_layer_norm(lean=True)` that saves only x (its own dtype), weight and bias; backward recomputes."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        ctx.eps = eps
        ctx.autocast = _autocast_state(x.device.type)
        ctx.save_for_backward(x, weight, bias)
        return _layer_norm(x, weight, bias, eps, lean=True)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        return (*_recompute_grads(ctx, lambda x, w, b: _layer_norm(x, w, b, ctx.eps, lean=True), grad), None)


def _wants_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# ---- half precision: the same formulas in fewer kernels ----------------------------------------------------------
# In bf16/fp16 (the GPU's training dtypes) and lean precision (the default; each module using them has a `lean`
# flag, set by `set_norm_precision`) the norms, RoPE, modulation, gates and residual adds take fused forms: one
# kernel where the reference graph runs several, and no full-size fp32 temporaries. Each computes in fp32 inside
# and rounds where the reference rounds or fewer times, so results agree within the dtype's rounding (tests in
# tests/test_fused_half.py). fp32 and `reference` keep the reference graph exactly (golden file, parity with the
# reference code).
HALF_DTYPES = (torch.float16, torch.bfloat16)


def is_half(x: torch.Tensor) -> bool:
    return x.dtype in HALF_DTYPES


def complex_rope(x: torch.Tensor) -> bool:
    """Whether RoPE on x takes the complex product: half precision in eager mode (inside torch.compile the real
    formula is kept, which inductor fuses; it does not generate code for complex numbers)."""
    return is_half(x) and not torch.compiler.is_compiling()


def _no_autocast(device_type: str):
    """Autocast off for one call (CUDA autocast runs norms in fp32, which would add an fp32 round trip)."""
    if autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _rms_norm_half(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`_rms_norm` for a half-precision x: `mova::rms_norm` (torch's fused RMSNorm on CUDA, one kernel each way,
    statistics in fp32, x and the per-row rstd kept for backward), rounded to x's dtype before the weight as the
    reference does. Inside torch.compile, torch's own RMSNorm, which inductor fuses with its neighbours."""
    if torch.compiler.is_compiling():
        with _no_autocast(x.device.type):
            y = F.rms_norm(x, x.shape[-1:], eps=eps)
    else:
        y, _ = kernels.rms_norm(x, eps)
    return y * weight


def _layer_norm_half(x: torch.Tensor, weight, bias, eps: float) -> torch.Tensor:
    """Lean LayerNorm for a half-precision x: one kernel each way (fp32 inside), the result in x's dtype."""
    with _no_autocast(x.device.type):
        return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * w over the last dim (the full width D, not per head); fp32 inside.

    `lean` (see `set_norm_precision`): the same values, but only x is kept for backward, not its fp32 copy; for a
    bf16/fp16 x, `mova::rms_norm` (one fused kernel each way on CUDA).
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.lean = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lean and is_half(x):
            return _rms_norm_half(x, self.weight, self.eps)
        if self.lean and _wants_grad(x, self.weight):
            return _LeanRMSNorm.apply(x, self.weight, self.eps)
        return _rms_norm(x, self.weight, self.eps)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (same parameters and keys) over the last dim. `lean` (see `set_norm_precision`): the result is
    in x's dtype also under autocast (which computes it in fp32), and only x is kept for backward; a bf16/fp16 x
    takes torch's layer_norm in its own dtype (fp32 inside; one kernel each way)."""

    def __init__(self, dim: int, eps: float, elementwise_affine: bool):
        super().__init__(dim, eps=eps, elementwise_affine=elementwise_affine)
        self.lean = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.lean:
            return super().forward(x)
        if is_half(x):
            return _layer_norm_half(x, self.weight, self.bias, self.eps)
        if _wants_grad(x, self.weight, self.bias):
            return _LeanLayerNorm.apply(x, self.weight, self.bias, self.eps)
        return _layer_norm(x, self.weight, self.bias, self.eps, lean=True)


def set_norm_precision(model: nn.Module, precision: str) -> int:
    """Set every RMSNorm and LayerNorm of `model`, and every module that takes the half-precision fused forms (a
    `lean` attribute: blocks, attentions, heads, the dual-tower model), to `lean` or `reference` precision; returns
    how many norms."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} unknown; allowed: {', '.join(PRECISIONS)}")
    count = 0
    for m in model.modules():
        if isinstance(m, (RMSNorm, LayerNorm)):
            count += 1
        if isinstance(m, (RMSNorm, LayerNorm)) or isinstance(getattr(m, "lean", None), bool):
            m.lean = precision == "lean"
    return count


class Fp32Linear(nn.Linear):
    """Linear evaluated in fp32 whatever the parameter dtype or autocast state.

    The reference computes the timestep embedding and projection in fp32 and casts afterwards; doing it in the
    module's own forward keeps ZeRO-3 parameter gathering and PEFT wrapping working.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            bias = None if self.bias is None else self.bias.float()
            return F.linear(x.float(), self.weight.float(), bias)


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """[cos(t*w_k) | sin(t*w_k)], w_k = 10000^(-k/(dim/2)), k < dim/2, in float64 (cos first). t [B] -> [B, dim]."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = torch.outer(t.to(torch.float64), freqs)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


# ---- tower RoPE: interleaved complex pairs (x[2j], x[2j+1]) -------------------------------------------------


def _axis_angles(positions: torch.Tensor, part_dim: int) -> torch.Tensor:
    """Angles pos * 10000^(-2j/part_dim) for the part_dim//2 pairs of one RoPE part, float64. -> [P, part_dim//2]."""
    j = torch.arange(0, part_dim, 2, dtype=torch.float64, device=positions.device)[: part_dim // 2]
    return torch.outer(positions.to(torch.float64), torch.pow(10000.0, -j / part_dim))


@functools.lru_cache(maxsize=16)
def video_rope(
    grid: tuple[int, int, int], head_dim: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """3D RoPE of the video tower for a (frames, rows, cols) token grid -> (cos, sin), each [F*R*C, head_dim/2].

    head_dim is split frame | height | width into d - 2*(d//3), d//3, d//3 real dims (44/42/42 for 128), each
    part with its own frequency normalisation; tokens are ordered frame, row, col (col fastest).
    """
    nf, nh, nw = grid
    third = head_dim // 3
    parts = (head_dim - 2 * third, third, third)
    af = _axis_angles(torch.arange(nf, device=device), parts[0])  # [F, pf]
    ah = _axis_angles(torch.arange(nh, device=device), parts[1])  # [R, ph]
    aw = _axis_angles(torch.arange(nw, device=device), parts[2])  # [C, pw]
    angles = torch.cat(
        [
            af[:, None, None, :].expand(nf, nh, nw, -1),
            ah[None, :, None, :].expand(nf, nh, nw, -1),
            aw[None, None, :, :].expand(nf, nh, nw, -1),
        ],
        dim=-1,
    ).reshape(nf * nh * nw, -1)  # [L, d/2]
    assert angles.shape[1] == head_dim // 2, "RoPE split does not cover head_dim"
    return torch.cos(angles).float(), torch.sin(angles).float()


@functools.lru_cache(maxsize=16)
def audio_rope(length: int, head_dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain 1D RoPE over the full head_dim (pair j rotates by pos * 10000^(-2j/d)) -> (cos, sin) [L, d/2]."""
    angles = _axis_angles(torch.arange(length, device=device), head_dim)
    return torch.cos(angles).float(), torch.sin(angles).float()


def _rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    xf = _at_least_fp32(x).unflatten(-1, (-1, 2))  # [B, L, H, d/2, 2]
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.flatten(-2).to(x.dtype)


class _RopeInterleaved(torch.autograd.Function):
    """Saves only the (cached) tables; backward rotates the gradient back, by the same products and sums as
    autograd through `_rope_interleaved`, so the gradient has the same bits."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rope_interleaved(x, cos, sin)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        g = _at_least_fp32(grad).unflatten(-1, (-1, 2))  # [B, L, H, d/2, 2]
        g0, g1 = g[..., 0], g[..., 1]
        gx = torch.stack([g0 * cos + g1 * sin, g1 * cos - g0 * sin], dim=-1)
        return gx.flatten(-2).to(grad.dtype), None, None


def apply_rope_interleaved(
    x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], fused: bool = True
) -> torch.Tensor:
    """Rotate pairs (x[2j], x[2j+1]) as complex numbers. x [B, L, H, d], cos/sin [L, d/2]. Computed in fp32,
    returned in x's dtype; nothing but the tables is kept for backward. `fused` (lean precision): a half-precision
    x takes the complex product (`rope_pairs`)."""
    if fused and complex_rope(x):
        return rope_pairs(x, rope, halves=False)
    cos, sin = (t[None, :, None, :] for t in rope)
    if _wants_grad(x):
        return _RopeInterleaved.apply(x, cos, sin)
    return _rope_interleaved(x, cos, sin)


# ---- bridge RoPE: rotate-half convention over positions in audio-latent steps ---------------------------------


def bridge_video_positions(
    num_frames: int,
    tokens_per_frame: int,
    *,
    video_fps: float,
    audio_fps: float,
    temporal_stride: int = 4,
    first_frame_bias: bool = False,
) -> torch.Tensor:
    """Position of each video token on the audio time axis (spec 5.4), float64 [num_frames * tokens_per_frame].

    Latent frame f covers pixel frames from 4f, so pos_f = f * audio_fps / (video_fps / 4); all tokens of a frame
    share it. With `first_frame_bias` the causal first latent frame is one pixel frame long instead of four.
    """
    f = torch.arange(num_frames, dtype=torch.float64)
    if first_frame_bias:
        start_s = torch.where(
            f == 0, torch.zeros_like(f), 1.0 / video_fps + (f - 1) * temporal_stride / video_fps
        )
        pos = start_s * audio_fps
    else:
        pos = f * audio_fps / (video_fps / temporal_stride)
    return pos.repeat_interleave(tokens_per_frame)


@functools.lru_cache(maxsize=16)
def _rotate_half_tables(
    positions: tuple[float, ...] | int, head_dim: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(positions, int):
        pos = torch.arange(positions, dtype=torch.float32, device=device)
    else:
        pos = torch.tensor(positions, dtype=torch.float32, device=device)
    inv_freq = 1.0 / (
        10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    )
    freqs = torch.outer(pos, inv_freq)  # [L, d/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [L, d]
    return emb.cos(), emb.sin()


def bridge_rope(
    grid: tuple[int, int, int],
    num_audio_tokens: int,
    head_dim: int,
    device: torch.device,
    *,
    video_fps: float,
    audio_fps: float,
    temporal_stride: int = 4,
    first_frame_bias: bool = False,
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Aligned cross-modal rotate-half tables: ((cos, sin) [Lv, d] for video tokens, (cos, sin) [La, d] for audio)."""
    nf, nh, nw = grid
    frame_pos = bridge_video_positions(
        nf,
        1,
        video_fps=video_fps,
        audio_fps=audio_fps,
        temporal_stride=temporal_stride,
        first_frame_bias=first_frame_bias,
    )
    cos_f, sin_f = _rotate_half_tables(tuple(frame_pos.tolist()), head_dim, device)  # [F, d]
    per_frame = nh * nw
    video = (cos_f.repeat_interleave(per_frame, dim=0), sin_f.repeat_interleave(per_frame, dim=0))
    return video, _rotate_half_tables(num_audio_tokens, head_dim, device)


def _rope_rotate_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    xf = _at_least_fp32(x)
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


class _RopeRotateHalf(torch.autograd.Function):
    """Saves only the (cached) tables; backward applies the inverse rotation with autograd's products and sums."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rope_rotate_half(x, cos, sin)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        g = _at_least_fp32(grad)
        gs1, gs2 = (g * sin).chunk(2, dim=-1)
        return (g * cos + torch.cat([gs2, -gs1], dim=-1)).to(grad.dtype), None, None


def apply_rope_rotate_half(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """x*cos + R(x)*sin with R(x) = [-x2, x1] (halves). x [B, L, H, d], cos/sin [L, d]. Computed in fp32,
    returned in x's dtype; nothing but the tables is kept for backward."""
    cos, sin = (t[None, :, None, :] for t in rope)
    if _wants_grad(x):
        return _RopeRotateHalf.apply(x, cos, sin)
    return _rope_rotate_half(x, cos, sin)


# ---- half precision: RoPE as one complex product ---------------------------------------------------------------


def _complex_tables(
    rope: tuple[torch.Tensor, torch.Tensor], halves: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos + i sin, its conjugate) over the d/2 pairs, complex64 [1, L, 1, d/2]; made once per pair of tables (they
    are memoised, or sliced once per forward under sequence parallelism) and kept on the cos table."""
    cos, sin = rope
    cached = getattr(cos, "_mova_complex", None)
    if cached is not None and cached[0] is halves:
        return cached[1]
    if halves:  # rotate-half tables repeat their d/2 frequencies over both halves
        cos, sin = cos[..., : cos.shape[-1] // 2], sin[..., : sin.shape[-1] // 2]
    table = torch.complex(cos.float(), sin.float())[None, :, None, :]
    tables = (table, table.conj().resolve_conj())
    if not torch.compiler.is_compiling():
        rope[0]._mova_complex = (halves, tables)
    return tables


def _as_pairs(x: torch.Tensor, halves: bool) -> torch.Tensor:
    """x [..., d] -> complex [..., d/2] (at least fp32 parts): pairs (x[2j], x[2j+1]), or (x[j], x[j+d/2]) with `halves`."""
    pairs = x.unflatten(-1, (2, -1)).transpose(-1, -2) if halves else x.unflatten(-1, (-1, 2))
    pairs = pairs.to(torch.promote_types(x.dtype, torch.float32), memory_format=torch.contiguous_format)
    return torch.view_as_complex(pairs.contiguous())  # a no-op after a cast; a copy for an uncast fp32 view


def _rotate(
    x: torch.Tensor, table: torch.Tensor, halves: bool, dtype: torch.dtype, back: bool
) -> torch.Tensor:
    """x * table over the pairs, rounded to `dtype`: 3 kernels (cast, complex product, cast). The result is in pair
    order (x[j], x[j+d/2] adjacent) for `halves`, unless `back` (the gradient) restores the half layout."""
    out = torch.view_as_real(_as_pairs(x, halves and not back) * table)  # [..., d/2, 2]
    if halves and back:
        return out.transpose(-1, -2).to(dtype, memory_format=torch.contiguous_format).flatten(-2)
    return out.to(dtype).flatten(-2)


class _RopePairs(torch.autograd.Function):
    """The rotation as a complex product; saves only the tables, backward multiplies by the conjugate."""

    @staticmethod
    def forward(ctx, x, table, conj, halves):
        ctx.save_for_backward(conj)
        ctx.halves = halves
        return _rotate(x, table, halves, x.dtype, back=False)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (conj,) = ctx.saved_tensors
        return _rotate(grad, conj, ctx.halves, grad.dtype, back=True), None, None, None


def rope_pairs(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], *, halves: bool) -> torch.Tensor:
    """RoPE on a half-precision x [B, L, H, d] as one complex product per element in fp32, rounded once (the
    reference rounds once too): interleaved pairs, or with `halves` the rotate-half convention (cos/sin [L, d]),
    whose result comes back with each pair's two channels adjacent: (x[0], x[d/2], x[1], x[d/2+1], ...). That
    order is the same for q and k, so q.k and the attention are those of the rotate-half layout; use it only where
    the result feeds attention scores."""
    table, conj = _complex_tables(rope, halves)
    if _wants_grad(x):
        return _RopePairs.apply(x, table, conj, halves)
    return _rotate(x, table, halves, x.dtype, back=False)


# ---- half precision: modulation, gates and residual adds as single fused multiply-adds ---------------------------


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, fused: bool = True) -> torch.Tensor:
    """x * (1 + scale) + shift; one fused multiply-add for half-precision x when `fused` (lean precision)."""
    if fused and is_half(x):
        return torch.addcmul(shift, x, 1 + scale)
    return x * (1 + scale) + shift


def gated_add(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, fused: bool = True) -> torch.Tensor:
    """x + gate * y (the gated residual); one fused multiply-add for half-precision x when `fused`."""
    if fused and is_half(x):
        return torch.addcmul(x, gate, y)
    return x + gate * y


def scaled_add(x: torch.Tensor, y: torch.Tensor, scale: float, fused: bool = True) -> torch.Tensor:
    """x + scale * y for a number `scale`; one kernel for half-precision x when `fused`."""
    if fused and is_half(x):
        return torch.add(x, y, alpha=scale)
    return x + scale * y


def init_linear_(module: nn.Module, generator: torch.Generator | None) -> None:
    """Uniform(+-1/sqrt(fan_in)) for weight and bias, PyTorch's default bound, drawn from `generator`."""
    weight = module.weight
    fan_in = weight[0].numel() if weight.dim() > 1 else weight.numel()
    bound = 1.0 / math.sqrt(max(fan_in, 1))
    with torch.no_grad():
        weight.uniform_(-bound, bound, generator=generator)
        if getattr(module, "bias", None) is not None:
            module.bias.uniform_(-bound, bound, generator=generator)
