"""The dual-tower bridge (`DualTowerConditionalBridge`): bidirectional audio<->video cross-attention per layer.

Layouts: B batch, Lv video tokens, La audio tokens, Dv/Da tower widths, d head_dim.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import BridgeConfig
from .dit import QKNormAttention
from .layers import LayerNorm, apply_rope_rotate_half, attention, bridge_rope, complex_rope, rope_pairs
from .sequence import SequenceShard

Rope = tuple[torch.Tensor, torch.Tensor]


class ConditionalCrossAttention(QKNormAttention):
    """`inner`: q from the primary stream, k/v from the (normed) condition stream, projected to the primary width.

    With `y_shard`, y is this rank's part of a sequence-parallel condition stream (and `rope_y` its rows): k and v
    are projected and rotated locally, then gathered, so every query sees the whole condition sequence.
    """

    def forward(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        rope_x: Rope | None,
        rope_y: Rope | None,
        y_shard: SequenceShard | None = None,
    ) -> torch.Tensor:
        q, k, v = self.project(x, y)
        if (
            rope_x is not None and complex_rope(q) and complex_rope(k)
        ):  # q and k in the same pair order: same scores
            q, k = rope_pairs(q, rope_x, halves=True), rope_pairs(k, rope_y, halves=True)
        elif rope_x is not None:
            q = apply_rope_rotate_half(q, rope_x)
            k = apply_rope_rotate_half(k, rope_y)
        if y_shard is not None:
            k, v = y_shard.gather(k), y_shard.gather(v)  # [B, Ly, H, d] from [B, Ly/n, H, d]
        return self.o(attention(q, k, v))


class BridgeConditioner(nn.Module):
    """One direction of one bridge layer: returns the update for x (the residual add is done by the caller).

    `activation_checkpointing` is read by MovaModel's block loop (see `set_activation_checkpointing`).
    """

    def __init__(self, dim: int, kv_dim: int, head_dim: int, eps: float):
        super().__init__()
        self.y_norm = LayerNorm(kv_dim, eps=eps, elementwise_affine=True)
        self.inner = ConditionalCrossAttention(dim, dim // head_dim, eps, kv_dim=kv_dim)
        self.activation_checkpointing = False

    def forward(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        rope_x: Rope | None,
        rope_y: Rope | None,
        y_shard: SequenceShard | None = None,
    ) -> torch.Tensor:
        """x [B, Lx, D] primary, y [B, Ly, Dkv] condition (this rank's part with `y_shard`) -> [B, Lx, D]."""
        return self.inner(x, self.y_norm(y.to(x.dtype)), rope_x, rope_y, y_shard)


class DualTowerBridge(nn.Module):
    """Keys `audio_to_video_conditioners.{i}.*` (a2v) and `video_to_audio_conditioners.{i}.*` (v2a)."""

    def __init__(self, cfg: BridgeConfig):
        super().__init__()
        self.config = cfg
        layers = cfg.interaction_layers
        dv, da, hd, eps = cfg.visual_hidden_dim, cfg.audio_hidden_dim, cfg.head_dim, cfg.EPS
        self.audio_to_video_conditioners = nn.ModuleDict(
            {str(i): BridgeConditioner(dv, da, hd, eps) for i in layers}
        )
        self.video_to_audio_conditioners = nn.ModuleDict(
            {str(i): BridgeConditioner(da, dv, hd, eps) for i in layers}
        )
        if cfg.trainable_condition_scale:
            # Kept so such checkpoints load strictly; the reference pipeline always passes an explicit scale of
            # 1.0, so the learned value never takes effect.
            self.condition_scale = nn.Parameter(torch.ones(1))

    def interacts(self, layer: int) -> bool:
        return str(layer) in self.audio_to_video_conditioners

    def rope(
        self, grid: tuple[int, int, int], num_audio_tokens: int, device: torch.device, video_fps: float
    ) -> tuple[Rope, Rope] | tuple[None, None]:
        """Aligned rotate-half tables (video, audio), or (None, None) when `apply_cross_rope` is off."""
        if not self.config.apply_cross_rope:
            return None, None
        return bridge_rope(
            tuple(grid),
            num_audio_tokens,
            self.config.head_dim,
            device,
            video_fps=video_fps,
            audio_fps=self.config.audio_fps,
            first_frame_bias=self.config.apply_first_frame_bias_in_rope,
        )
