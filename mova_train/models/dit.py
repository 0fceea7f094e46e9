"""The Wan-style DiT towers of MOVA: `WanVideoDiT` (both video experts) and `WanAudioDiT`, with checkpoint key names.

Layouts: B batch, L tokens, D width, N text tokens, Dt text width, H heads, d head_dim.
Video input [B, C_in, T, h, w] (noisy latent ‖ I2V conditioning), audio input [B, C, L_a] (DAC latents).
"""

from __future__ import annotations

import math

import torch
import torch.utils.checkpoint
from torch import nn

from .config import AudioDiTConfig, VideoDiTConfig
from .layers import (
    Fp32Linear,
    LayerNorm,
    RMSNorm,
    apply_rope_interleaved,
    attention,
    audio_rope,
    gated_add,
    modulate,
    sinusoidal_embedding,
    video_rope,
)
from .sequence import SequenceShard

Rope = tuple[torch.Tensor, torch.Tensor]


class QKNormAttention(nn.Module):
    """q/k/v/o projections with RMSNorm over the full width on q and k (keys `q k v o norm_q norm_k`)."""

    def __init__(self, dim: int, num_heads: int, eps: float, kv_dim: int | None = None):
        super().__init__()
        kv_dim = dim if kv_dim is None else kv_dim
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(kv_dim, dim)
        self.v = nn.Linear(kv_dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)
        self.lean = True  # half-precision fused forms (`layers.set_norm_precision`)

    def project(self, x: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x [B, Lq, D], context [B, Lk, Dkv] -> q [B, Lq, H, d], k, v [B, Lk, H, d]."""
        q = self.norm_q(self.q(x)).unflatten(-1, (self.num_heads, -1))
        k = self.norm_k(self.k(context)).unflatten(-1, (self.num_heads, -1))
        v = self.v(context).unflatten(-1, (self.num_heads, -1))
        return q, k, v


class SelfAttention(QKNormAttention):
    """Bidirectional self-attention with the tower's interleaved RoPE on q and k (after their RMSNorm).

    With a `shard`, x holds this rank's tokens and `rope` their rows of the table (global positions); the
    attention itself spans the whole sequence through the shard (Ulysses: all-to-all over heads).
    """

    def forward(self, x: torch.Tensor, rope: Rope, shard: SequenceShard | None = None) -> torch.Tensor:
        q, k, v = self.project(x, x)
        q, k = apply_rope_interleaved(q, rope, self.lean), apply_rope_interleaved(k, rope, self.lean)
        return self.o(attention(q, k, v) if shard is None else shard.attention(q, k, v))


class CrossAttention(QKNormAttention):
    """Text cross-attention: no RoPE, no mask (all text positions, padded ones included, are attended)."""

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q, k, v = self.project(x, context)
        return self.o(attention(q, k, v))


class DiTBlock(nn.Module):
    """One tower block (spec 3.4): modulated self-attn, ungated cross-attn after affine norm3, modulated FFN.

    `activation_checkpointing` is read by the block loop of the owner; set it with
    `mova_train.models.set_activation_checkpointing`.
    """

    def __init__(self, dim: int, ffn_dim: int, num_heads: int, eps: float):
        super().__init__()
        self.modulation = nn.Parameter(torch.empty(1, 6, dim))
        self.self_attn = SelfAttention(dim, num_heads, eps)
        self.cross_attn = CrossAttention(dim, num_heads, eps)
        self.norm1 = LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.norm2 = LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.norm3 = LayerNorm(dim, eps=eps, elementwise_affine=True)
        self.ffn = nn.Sequential(
            nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim)
        )
        self.activation_checkpointing = False
        self.lean = True  # half-precision fused forms (`layers.set_norm_precision`)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        t_mod: torch.Tensor,
        rope: Rope,
        shard: SequenceShard | None = None,
    ) -> torch.Tensor:
        """x [B, L, D], context [B, N, D], t_mod [B, 6, D] (per-sample modulation) -> [B, L, D].

        With a `shard`, x is this rank's part of the sequence: only self-attention needs the other parts (the
        text cross-attention and the per-token layers work on any subset of the queries).
        """
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (self.modulation + t_mod).chunk(
            6, dim=1
        )
        f = self.lean
        x = gated_add(
            x, gate_msa, self.self_attn(modulate(self.norm1(x), shift_msa, scale_msa, f), rope, shard), f
        )
        x = x + self.cross_attn(self.norm3(x), context)
        return gated_add(x, gate_mlp, self.ffn(modulate(self.norm2(x), shift_mlp, scale_mlp, f)), f)


class Head(nn.Module):
    """Output head: the same temb is added to both shift and scale (spec 3.2.6), per sample."""

    def __init__(self, dim: int, out_features: int, eps: float):
        super().__init__()
        self.modulation = nn.Parameter(torch.empty(1, 2, dim))
        self.norm = LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.head = nn.Linear(dim, out_features)
        self.lean = True  # half-precision fused forms (`layers.set_norm_precision`)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """x [B, L, D], temb [B, D] -> [B, L, out_features]."""
        shift, scale = (self.modulation + temb[:, None, :]).chunk(2, dim=1)  # [B, 1, D] each
        return self.head(modulate(self.norm(x), shift, scale, self.lean))


def run_block(block: nn.Module, *args):
    """Call `block`, through non-reentrant activation checkpointing when its flag is set and grads are on."""
    if getattr(block, "activation_checkpointing", False) and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
    return block(*args)


class _WanTower(nn.Module):
    """Parts shared by both towers; subclasses set `patch_embedding` and the patchify/unpatchify/RoPE methods."""

    def _build_common(self, cfg: VideoDiTConfig | AudioDiTConfig) -> None:
        self.config = cfg
        d = cfg.dim
        self.text_embedding = nn.Sequential(
            nn.Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"), nn.Linear(d, d)
        )
        self.time_embedding = nn.Sequential(Fp32Linear(cfg.freq_dim, d), nn.SiLU(), Fp32Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), Fp32Linear(d, 6 * d))
        self.blocks = nn.ModuleList(
            DiTBlock(d, cfg.ffn_dim, cfg.num_heads, cfg.eps) for _ in range(cfg.num_layers)
        )
        self.head = Head(d, cfg.out_dim * math.prod(cfg.patch_size), cfg.eps)

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    def embed_time(self, timestep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """timestep [B] in [0, 1000] -> (temb [B, D], t_mod [B, 6, D]), computed in fp32, returned in model dtype."""
        e = sinusoidal_embedding(timestep, self.config.freq_dim).float()  # [B, freq_dim]
        temb = self.time_embedding(e)
        t_mod = self.time_projection(temb).unflatten(1, (6, self.config.dim))
        return temb.to(self.dtype), t_mod.to(self.dtype)

    def embed_text(self, text: torch.Tensor) -> torch.Tensor:
        """text [B, N, Dt] (UMT5 output, padding zeroed) -> context [B, N, D]."""
        return self.text_embedding(text.to(self.dtype))

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """This tower alone, without the bridge (the dual-tower step lives in MovaModel)."""
        temb, t_mod = self.embed_time(timestep)
        context = self.embed_text(text)
        tokens, grid = self.patchify(x)
        rope = self.rope(grid, tokens.device)
        for block in self.blocks:
            tokens = run_block(block, tokens, context, t_mod, rope)
        return self.unpatchify(self.head(tokens, temb), grid)


class WanVideoDiT(_WanTower):
    """Video tower (`WanModel`), used for both experts `video_dit` (high noise) and `video_dit_2` (low noise)."""

    def __init__(self, cfg: VideoDiTConfig):
        super().__init__()
        self.patch_embedding = nn.Conv3d(
            cfg.in_dim, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size
        )
        self._build_common(cfg)

    def patchify(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """x [B, C_in, T, h, w] -> tokens [B, L, D] ordered (frame, row, col), col fastest, and the grid."""
        y = self.patch_embedding(x.to(self.dtype))  # [B, D, T', h', w']
        grid = tuple(y.shape[2:])
        return y.flatten(2).transpose(1, 2), grid

    def unpatchify(self, out: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """[B, L, pt*ph*pw*C] -> [B, C, T'*pt, h'*ph, w'*pw]; channel index ((i_t*ph + i_h)*pw + i_w)*C + c."""
        pt, ph, pw = self.config.patch_size
        nf, nh, nw = grid
        c = self.config.out_dim
        out = out.reshape(out.shape[0], nf, nh, nw, pt, ph, pw, c)
        out = out.permute(0, 7, 1, 4, 2, 5, 3, 6)  # [B, C, T', pt, h', ph, w', pw]
        return out.reshape(out.shape[0], c, nf * pt, nh * ph, nw * pw)

    def rope(self, grid: tuple[int, int, int], device: torch.device) -> Rope:
        return video_rope(tuple(grid), self.config.head_dim, device)


class WanAudioDiT(_WanTower):
    """Audio tower (`WanAudioModel`) over DAC latents: tokens are 50 Hz latent steps, 1D RoPE."""

    def __init__(self, cfg: AudioDiTConfig):
        super().__init__()
        self.patch_embedding = nn.Conv1d(cfg.in_dim, cfg.dim, kernel_size=1, stride=1)
        self._build_common(cfg)

    def patchify(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int]]:
        """x [B, C, L_a] -> tokens [B, L_a, D]."""
        y = self.patch_embedding(x.to(self.dtype))  # [B, D, L_a]
        return y.transpose(1, 2), (y.shape[2],)

    def unpatchify(self, out: torch.Tensor, grid: tuple[int]) -> torch.Tensor:
        """[B, L_a, C] -> [B, C, L_a]."""
        return out.transpose(1, 2)

    def rope(self, grid: tuple[int], device: torch.device) -> Rope:
        return audio_rope(grid[0], self.config.head_dim, device)
