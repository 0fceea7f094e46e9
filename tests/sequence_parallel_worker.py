"""The worker of tests/test_sequence_parallel.py's 2-rank gloo test, in a module of its own so that the spawned
processes import only this (the model and the sequence-parallel code), not the trainer and its test helpers."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.distributed as dist

from mova_train.models import build_mova, get_model_config, set_activation_checkpointing
from mova_train.models.layers import attention
from mova_train.models.mova import set_sequence_shard
from mova_train.training.parallel import UlyssesShard

# The tiny video tower has 3 heads (width 96); width 128 gives 4, which splits over 2 and 4 ranks.
SP_HEADS = 4


def sp_model_config():
    """The tiny config with a video head count the group divides (head_dim 32 as the bridge's; audio: 2 heads)."""
    cfg = get_model_config("tiny")
    width = 32 * SP_HEADS
    return dataclasses.replace(
        cfg,
        video_dit=dataclasses.replace(cfg.video_dit, dim=width, num_heads=SP_HEADS),
        dual_tower_bridge=dataclasses.replace(cfg.dual_tower_bridge, visual_hidden_dim=width),
    )


def _init(rank: int, world: int, store: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)


def _model_inputs(cfg, generator):
    b, t, h, w, la, n = 2, 3, 4, 8, 10, 5  # 3 x 2 x 4 = 24 video tokens
    return (
        torch.randn(b, cfg.video_latent_dim, t, h, w, generator=generator),
        torch.randn(b, cfg.video_cond_dim, t, h, w, generator=generator),
        torch.randn(b, cfg.audio_latent_dim, la, generator=generator),
        torch.randn(b, n, cfg.text_dim, generator=generator),
        torch.tensor([900.0, 300.0]),
        torch.tensor([500.0, 100.0]),
    )


def worker_units(rank: int, world: int, store: str, report_path: str) -> None:
    _init(rank, world, store)
    shard = UlyssesShard(dist.group.WORLD)
    report = {}

    # 1. Ulysses attention over the group == full attention, and its gradient (each rank back-propagates the same
    # full loss, so the group's gradient is `world` times the single-device one)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 8, 4, 6, generator=g) for _ in range(3))
    weight = torch.randn(2, 8, 24, generator=g)
    ref_q = q.clone().requires_grad_(True)
    ref = attention(ref_q, k, v)
    (ref * weight).sum().backward()
    part = shard.span(8, "test")
    local_q = q[:, part].clone().requires_grad_(True)
    out = shard.gather(shard.attention(local_q, k[:, part], v[:, part]))
    (out * weight).sum().backward()
    report["attn_out"] = (out - ref).abs().max().item()
    report["attn_grad"] = (local_q.grad / world - ref_q.grad[:, part]).abs().max().item()

    # 2. the dual-tower step: outputs and parameter gradients
    cfg = sp_model_config()
    model = build_mova(cfg, device="cpu", seed=0).train()
    inputs = _model_inputs(cfg, torch.Generator().manual_seed(1))
    wv = torch.randn(2, 16, 3, 4, 8, generator=torch.Generator().manual_seed(2))
    results = []
    for use_shard, recompute in ((False, False), (True, False), (True, True)):
        set_sequence_shard(model, shard if use_shard else None)
        set_activation_checkpointing(model, recompute)  # the recomputed blocks repeat their collectives
        model.zero_grad()
        pv, pa = model(*inputs, expert="video_dit", video_fps=24.0)
        ((pv * wv).sum() + pa.square().sum()).backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results.append((pv.detach(), pa.detach(), grads))
    (pv0, pa0, g0), (pv1, pa1, g1), (pv2, pa2, g2) = results
    for g in (g1, g2):
        dist.all_reduce(g)  # the engines reduce over the group this way (then divide by the world size)
    report["model_video"] = ((pv1 - pv0).abs().max() / pv0.abs().max()).item()
    report["model_audio"] = ((pa1 - pa0).abs().max() / pa0.abs().max()).item()
    report["model_grad"] = ((g1 / world - g0).abs().max() / g0.abs().max()).item()
    report["recompute"] = max((pv2 - pv1).abs().max().item(), (g2 - g1).abs().max().item())
    report["num_grads"] = g0.numel()
    # eval mode (renders on one rank) runs the whole sequence locally, without collectives
    set_activation_checkpointing(model, False)
    model.eval()
    with torch.no_grad():
        report["eval_video"] = (model(*inputs, expert="video_dit")[0] - pv0).abs().max().item()
    Path(f"{report_path}.{rank}").write_text(json.dumps(report))
    dist.destroy_process_group()
