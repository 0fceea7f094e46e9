"""Trainer building blocks without a training run: objective (routing, timesteps, noise, loss), optimizer masking,
LR schedule, checkpoint folders, fingerprints, RNG/optimizer state round trips, DeepSpeed config resolution."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch

from mova_train import run_layout
from mova_train.config import EXPERTS, TrainConfig
from mova_train.models import EXPERTS as MODEL_EXPERTS
from mova_train.models import FlowMatchScheduler, expert_for_timestep
from mova_train.training import checkpoint as ckpt_io
from mova_train.training.config import ObjectiveConfig, OptimConfig
from mova_train.training.distributed import build_deepspeed_config
from mova_train.training.objective import (
    ExpertChooser,
    FlowMatchingObjective,
    TimestepSampler,
    build_i2v_condition,
)
from mova_train.training.optim import GroupMaskedAdamW, lr_factor, set_step_hyperparams

BOUNDARY = 900.0


def spec_table() -> torch.Tensor:
    """The 1000-entry training table of spec §12 in the reference's float32 recipe, recomputed with numpy
    independently of the scheduler (tests/test_models_scheduler.py)."""
    from tests.test_models_scheduler import _numpy_float32_recipe

    return torch.from_numpy(_numpy_float32_recipe(1000)[1])


def test_expert_names_match_the_model():
    assert EXPERTS == MODEL_EXPERTS


@pytest.mark.parametrize("sampling", ["uniform", "logit_normal"])
def test_every_drawn_timestep_routes_to_its_expert(sampling):
    sched = FlowMatchScheduler()
    table = spec_table()
    sampler = TimestepSampler(sched, BOUNDARY, sampling, logit_mean=0.0, logit_std=2.0)
    g = torch.Generator().manual_seed(0)
    for expert in EXPERTS:
        t = sampler.sample(expert, 4000, g)
        for value in t.tolist():  # one router call per timestep, as the sampler would make it
            assert expert_for_timestep(value, BOUNDARY) == expert
        # drawn on the table, in t units: every value is a table entry on the expert's side of 900
        assert torch.isin(t, table).all()
        side = table >= BOUNDARY if expert == "video_dit" else table < BOUNDARY
        allowed = set(table[side].tolist())
        assert set(t.tolist()) <= allowed
        if (
            sampling == "uniform"
        ):  # the whole range is reachable (spec §7: [900.08, 1000] and [19.64, 899.69])
            assert math.isclose(max(t.tolist()), max(allowed)) and math.isclose(min(t.tolist()), min(allowed))
            assert len(set(t.tolist())) > 0.9 * len(allowed)


def test_uniform_range_matches_the_reference_index_boundary():
    # spec §7: 359 table entries are >= 900 with extra_one_step (index boundary 0.359)
    sampler = TimestepSampler(FlowMatchScheduler(), BOUNDARY)
    assert sampler.index_range("video_dit") == (0, 359)
    assert sampler.index_range("video_dit_2") == (359, 1000)
    assert sampler.index_range(None) == (0, 1000)


def test_logit_normal_concentrates_in_the_middle_of_the_range():
    sampler = TimestepSampler(FlowMatchScheduler(), BOUNDARY, "logit_normal", 0.0, 1.0)
    t = sampler.sample("video_dit_2", 20000, torch.Generator().manual_seed(1))
    table = spec_table()
    lo, hi = 359, 1000
    idx = torch.tensor([int((table - v).abs().argmin()) for v in t[:2000].tolist()])
    pos = (idx - lo).float() / (hi - lo)
    # sigmoid(N(0,1)) has median 0.5 and ~68% of its mass in [sigmoid(-1), sigmoid(1)] = [0.27, 0.73]
    assert abs(float(pos.median()) - 0.5) < 0.03
    inside = ((pos > 0.269) & (pos < 0.731)).float().mean()
    assert 0.63 < float(inside) < 0.73


def test_expert_choice_modes():
    alt = ExpertChooser(ObjectiveConfig(expert="alternate"), seed=3)
    assert [alt.expert(i) for i in range(4)] == ["video_dit", "video_dit_2", "video_dit", "video_dit_2"]
    only = ExpertChooser(ObjectiveConfig(expert="only:video_dit_2"), seed=3)
    assert {only.expert(i) for i in range(10)} == {"video_dit_2"}
    ratio = ExpertChooser(ObjectiveConfig(expert="ratio", high_noise_ratio=0.25), seed=3)
    picks = [ratio.expert(i) for i in range(4000)]
    assert abs(picks.count("video_dit") / 4000 - 0.25) < 0.03
    # the same on every rank and after a restart: a function of (seed, micro-step) only
    again = ExpertChooser(ObjectiveConfig(expert="ratio", high_noise_ratio=0.25), seed=3)
    assert [again.expert(i) for i in range(4000)] == picks


def test_i2v_condition_is_mask_then_first_frame():
    first = torch.randn(2, 16, 3, 4, 6)
    y = build_i2v_condition(first)
    assert y.shape == (2, 20, 3, 4, 6)
    assert torch.equal(y[:, :4, 0], torch.ones(2, 4, 4, 6))
    assert torch.equal(y[:, :4, 1:], torch.zeros(2, 4, 2, 4, 6))
    assert torch.equal(y[:, 4:], first)


@pytest.mark.parametrize("independent", [False, True])
def test_prepare_noises_both_modalities_independently(independent):
    cfg = ObjectiveConfig(
        expert="alternate",
        independent_audio_timestep=independent,
        loss_weight_video=0.5,
        loss_weight_audio=2.0,
    )
    sched = FlowMatchScheduler()
    obj = FlowMatchingObjective(cfg, sched, BOUNDARY, seed=0)
    video, audio = torch.randn(3, 16, 2, 4, 4), torch.randn(3, 128, 11)
    inp = obj.prepare(
        video,
        torch.randn(3, 16, 2, 4, 4),
        audio,
        torch.randn(3, 512, 32),
        micro_step=1,
        generator=torch.Generator().manual_seed(5),
    )
    assert inp.expert == "video_dit_2"
    assert all(expert_for_timestep(t, BOUNDARY) == "video_dit_2" for t in inp.timestep_video.tolist())
    if independent:
        assert not torch.equal(inp.timestep_audio, inp.timestep_video)
    else:
        assert torch.equal(inp.timestep_audio, inp.timestep_video)
    # x_t = (1 - s) x0 + s eps and target = eps - x0 (spec §12), recovered from the outputs
    table = spec_table().double() / 1000.0
    for b in range(3):
        s_v = float(table[(spec_table() - inp.timestep_video[b]).abs().argmin()])
        s_a = float(table[(spec_table() - inp.timestep_audio[b]).abs().argmin()])
        eps_v = inp.target_video[b] + video[b]
        eps_a = inp.target_audio[b] + audio[b]
        assert torch.allclose(inp.noisy_video[b], (1 - s_v) * video[b] + s_v * eps_v, atol=1e-5)
        assert torch.allclose(inp.noisy_audio[b], (1 - s_a) * audio[b] + s_a * eps_a, atol=1e-5)
    eps_v, eps_a = inp.target_video + video, inp.target_audio + audio
    # independent noise: the audio noise is not a reshaped piece of the video noise
    assert abs(float(torch.corrcoef(torch.stack([eps_v.flatten()[:300], eps_a.flatten()[:300]]))[0, 1])) < 0.3
    pv, pa = torch.randn_like(video), torch.randn_like(audio)
    total, lv, la = obj.loss(pv, pa, inp)
    want_v = ((pv - (eps_v - video)) ** 2).mean()
    want_a = ((pa - (eps_a - audio)) ** 2).mean()
    assert torch.allclose(lv, want_v, rtol=1e-5) and torch.allclose(la, want_a, rtol=1e-5)
    assert torch.allclose(total, 0.5 * want_v + 2.0 * want_a, rtol=1e-5)


def test_masked_adamw_leaves_an_inactive_group_untouched():
    a, b = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(4))
    opt = GroupMaskedAdamW(
        [
            {"params": [a], "component": "video_dit", "lr_scale": 1.0},
            {"params": [b], "component": "audio_dit", "lr_scale": 1.0},
        ],
        lr=0.1,
        weight_decay=0.1,
    )
    for _ in range(3):
        a.grad, b.grad = torch.ones(4), torch.ones(4)
        opt.step()
    b_before, state_before = b.detach().clone(), {k: v.clone() for k, v in opt.state[b].items()}
    a_before = a.detach().clone()
    set_step_hyperparams(
        opt, OptimConfig(warmup_steps=0, schedule="constant", lr=0.1), 3, 10, active={"video_dit"}
    )
    a.grad, b.grad = torch.ones(4), torch.zeros(4)  # a ZeRO-style zero gradient for the idle group
    opt.step()
    assert torch.equal(b, b_before)
    assert all(torch.equal(opt.state[b][k], state_before[k]) for k in state_before)
    assert not torch.equal(a, a_before)


def test_lr_schedule_follows_the_formula():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert lr_factor(cfg, 0, 110) == pytest.approx(0.1)
    assert lr_factor(cfg, 9, 110) == pytest.approx(1.0)
    for step in (10, 35, 60, 109):
        progress = (step - 10) / 100
        assert lr_factor(cfg, step, 110) == pytest.approx(
            0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
        )
    lin = OptimConfig(lr=1.0, warmup_steps=0, schedule="linear")
    assert lr_factor(lin, 50, 100) == pytest.approx(0.5)
    assert lr_factor(OptimConfig(warmup_steps=0, schedule="constant"), 77, 100) == 1.0


def test_checkpoint_folders_are_atomic_and_pruned(tmp_path):
    for step in (5, 10, 15):
        tmp = ckpt_io.begin_checkpoint(tmp_path, step)
        assert run_layout.latest_checkpoint(tmp_path) is None or f"{step:08d}" not in str(
            run_layout.latest_checkpoint(tmp_path)
        )  # an in-progress folder is never "latest"
        ckpt_io.write_trainer_state(tmp, {"step": step})
        ckpt_io.commit_checkpoint(tmp, keep_last=2)
    assert [s for s, _ in ckpt_io.list_checkpoints(tmp_path)] == [10, 15]
    # a crash mid-save leaves a dot-folder: ignored, then removed at the next start
    stale = ckpt_io.begin_checkpoint(tmp_path, 20)
    (stale / "half.bin").write_bytes(b"x")
    assert run_layout.latest_checkpoint(tmp_path).name == "step-00000015"
    ckpt_io.remove_stale_tmp(tmp_path)
    assert not stale.exists()
    assert ckpt_io.resolve_resume("auto", tmp_path).name == "step-00000015"
    assert ckpt_io.resolve_resume("never", tmp_path) is None
    assert ckpt_io.resolve_resume(str(tmp_path), tmp_path / "other").name == "step-00000015"
    with pytest.raises(ckpt_io.ResumeError, match="trainer.resume"):
        ckpt_io.resolve_resume(str(tmp_path / "nothing"), tmp_path)


def test_fingerprint_mismatch_names_every_differing_field():
    saved = {"world_size": 2, "lora.rank": 16, "lora.targets.audio_dit": ["self_attn"], "seed": 0}
    now = {"world_size": 4, "lora.rank": 8, "lora.targets.audio_dit": ["self_attn"], "seed": 0}
    with pytest.raises(ckpt_io.ResumeError) as e:
        ckpt_io.check_fingerprint(saved, now, where="ckpt")
    msg = str(e.value)
    assert "world_size: checkpoint has 2, this run has 4" in msg
    assert "lora.rank: checkpoint has 16, this run has 8" in msg
    assert "audio_dit" not in msg and "seed" not in msg
    ckpt_io.check_fingerprint(saved, dict(saved), where="ckpt")


def test_rank_state_round_trip_restores_every_stream(tmp_path):
    gen = torch.Generator().manual_seed(7)
    torch.manual_seed(1), random.seed(2), np.random.seed(3)
    torch.randn(3, generator=gen)
    ckpt_io.save_rank_state(tmp_path, 1, gen, {"position": 42})
    expected = (torch.randn(5), random.random(), np.random.rand(), torch.randn(5, generator=gen))
    torch.manual_seed(99), random.seed(99), np.random.seed(99)
    gen2 = torch.Generator().manual_seed(123)
    loader_state = ckpt_io.load_rank_state(tmp_path, 1, gen2)
    got = (torch.randn(5), random.random(), np.random.rand(), torch.randn(5, generator=gen2))
    assert loader_state == {"position": 42}
    assert torch.equal(got[0], expected[0]) and got[1] == expected[1] and got[2] == expected[2]
    assert torch.equal(got[3], expected[3])
    with pytest.raises(ckpt_io.ResumeError, match="rank 3"):
        ckpt_io.load_rank_state(tmp_path, 3, gen2)
    assert json.loads((tmp_path / "rank1" / "state.json").read_text())["loader"] == {"position": 42}


def test_optimizer_state_round_trip_without_pickle(tmp_path):
    def make():
        torch.manual_seed(0)
        p1, p2 = torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(5))
        opt = GroupMaskedAdamW(
            [
                {"params": [p1], "names": ["video_dit.x"], "component": "video_dit"},
                {"params": [p2], "names": ["audio_dit.y"], "component": "audio_dit"},
            ],
            lr=0.01,
            weight_decay=0.01,
        )
        return (p1, p2), opt

    (p1, p2), opt = make()
    for _ in range(3):
        p1.grad, p2.grad = torch.randn(3, 2), torch.randn(5)
        opt.step()
    ckpt_io.save_optimizer_state(tmp_path, opt)
    (q1, q2), opt2 = make()
    with torch.no_grad():
        q1.copy_(p1), q2.copy_(p2)
    ckpt_io.load_optimizer_state(tmp_path, opt2)
    g1, g2 = torch.randn(3, 2), torch.randn(5)
    p1.grad, p2.grad, q1.grad, q2.grad = g1, g2, g1.clone(), g2.clone()
    opt.step(), opt2.step()
    assert torch.equal(p1, q1) and torch.equal(p2, q2)
    assert not (tmp_path / "optimizer.pt").exists()
    header = (tmp_path / "optimizer.safetensors").read_bytes()[:8]
    assert len(header) == 8  # a safetensors file, not a pickle


def _cfg(**trainer) -> TrainConfig:
    cfg = TrainConfig()
    cfg.data.batch_size = 2
    for k, v in trainer.items():
        setattr(cfg.trainer, k, v)
    return cfg


def test_deepspeed_config_fills_auto_values_and_refuses_conflicts(tmp_path, monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    assert build_deepspeed_config(_cfg(), "no") is None
    cfg = _cfg(gradient_accumulation_steps=3)
    cfg.deepspeed.config = "launch/deepspeed/zero3.json"
    ds = build_deepspeed_config(cfg, "bf16")
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 3
    assert (
        ds["gradient_clipping"] == 1.0
        and ds["bf16"]["enabled"] is True
        and ds["zero_optimization"]["stage"] == 3
    )
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"gradient_accumulation_steps": 4, "zero_optimization": {"stage": 2}}))
    cfg.deepspeed.config = str(bad)
    with pytest.raises(
        ValueError, match="gradient_accumulation_steps=4.*trainer.gradient_accumulation_steps=3"
    ):
        build_deepspeed_config(cfg, "no")
    bad.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    with pytest.raises(ValueError, match=r"zero_optimization.stage=1 .*allowed: \(2, 3\)"):
        build_deepspeed_config(cfg, "no")
    # `accelerate launch --use_deepspeed --zero_stage 3` without a Hydra deepspeed config
    cfg.deepspeed.config = None
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", raising=False)
    assert build_deepspeed_config(cfg, "no")["zero_optimization"]["stage"] == 3
