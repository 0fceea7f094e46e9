"""Building blocks shared by the MOVA towers and bridge: norms, timestep sinusoid, the two RoPE conventions, attention.

Layouts: B batch, L tokens, H heads, d head_dim, D = H*d model width.
RoPE tables are (cos, sin) pairs computed on first use for a given shape and device (never module buffers, so
nothing appears in the state dict and nothing is computed on `meta`).
"""

from __future__ import annotations

import functools
import logging
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..names import ATTENTION_KERNELS

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


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * w over the last dim (the full width D, not per head); fp32 inside."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return y.to(x.dtype) * self.weight


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


def apply_rope_interleaved(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate pairs (x[2j], x[2j+1]) as complex numbers. x [B, L, H, d], cos/sin [L, d/2]. Computed in fp32."""
    cos, sin = rope
    cos = cos[None, :, None, :]
    sin = sin[None, :, None, :]
    xf = x.float().unflatten(-1, (-1, 2))  # [B, L, H, d/2, 2]
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.flatten(-2).to(x.dtype)


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


def apply_rope_rotate_half(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """x*cos + R(x)*sin with R(x) = [-x2, x1] (halves). x [B, L, H, d], cos/sin [L, d]. Computed in fp32."""
    cos, sin = rope
    cos = cos[None, :, None, :]
    sin = sin[None, :, None, :]
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


def init_linear_(module: nn.Module, generator: torch.Generator | None) -> None:
    """Uniform(+-1/sqrt(fan_in)) for weight and bias, PyTorch's default bound, drawn from `generator`."""
    weight = module.weight
    fan_in = weight[0].numel() if weight.dim() > 1 else weight.numel()
    bound = 1.0 / math.sqrt(max(fan_in, 1))
    with torch.no_grad():
        weight.uniform_(-bound, bound, generator=generator)
        if getattr(module, "bias", None) is not None:
            module.bias.uniform_(-bound, bound, generator=generator)
