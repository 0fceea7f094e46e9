"""Analytic FLOP count of one dual-tower step (one expert + audio tower + bridge), for benchmarks.

A multiply-add is 2 FLOPs. Only matmuls and attention products are counted (norms, RoPE, activations and the
timestep MLP on B vectors are negligible). Linear and attention FLOPs are kept apart because their backward costs
differ when the base weights are frozen (LoRA): linear layers then need only the input gradient (1x forward),
attention always needs dQ, dK, dV (2x forward).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import MovaConfig


@dataclass
class StepFlops:
    linear: float  # forward FLOPs in Linear/Conv layers
    attention: float  # forward FLOPs in QK^T and PV

    @property
    def forward(self) -> float:
        return self.linear + self.attention

    def train_step(self, *, weight_grads: bool, recompute: bool) -> tuple[float, float]:
        """(model FLOPs, hardware FLOPs) of forward + backward. Model FLOPs exclude activation recompute."""
        backward = self.linear * (2.0 if weight_grads else 1.0) + 2.0 * self.attention
        model = self.forward + backward
        return model, model + (self.forward if recompute else 0.0)


def _tower(
    dim: int, ffn: int, layers: int, tokens: int, text: int, text_dim: int, in_feats: int, out_feats: int
):
    linear = 2 * tokens * in_feats * dim  # patch embedding
    linear += 2 * text * (text_dim * dim + dim * dim)  # text embedding
    per_block = 2 * tokens * (4 * dim * dim + 2 * dim * dim + 2 * dim * ffn) + 2 * text * 2 * dim * dim
    linear += layers * per_block
    linear += 2 * tokens * dim * out_feats  # head
    attention = layers * (4 * tokens * tokens * dim + 4 * tokens * text * dim)
    return linear, attention


def step_flops(
    config: MovaConfig, *, video_tokens: int, audio_tokens: int, text_tokens: int = 512, batch: int = 1
) -> StepFlops:
    """Forward FLOPs of `MovaModel.forward` for the given token counts."""
    v, a, b = config.video_dit, config.audio_dit, config.dual_tower_bridge
    patch = math.prod(v.patch_size)
    lv, la, n = video_tokens, audio_tokens, text_tokens
    vl, va = _tower(v.dim, v.ffn_dim, v.num_layers, lv, n, v.text_dim, v.in_dim * patch, v.out_dim * patch)
    al, aa = _tower(a.dim, a.ffn_dim, a.num_layers, la, n, a.text_dim, a.in_dim, a.out_dim)
    dv, da = b.visual_hidden_dim, b.audio_hidden_dim
    pairs = len(b.interaction_layers)
    a2v_linear = 2 * lv * 2 * dv * dv + 2 * la * 2 * da * dv
    v2a_linear = 2 * la * 2 * da * da + 2 * lv * 2 * dv * da
    bridge_attention = 4 * lv * la * dv + 4 * la * lv * da
    linear = vl + al + pairs * (a2v_linear + v2a_linear)
    attention = va + aa + pairs * bridge_attention
    return StepFlops(linear=float(batch * linear), attention=float(batch * attention))
