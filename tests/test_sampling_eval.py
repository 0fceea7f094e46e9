"""Evaluation during training: render_eval files and sync figures, W&B logging (offline), held-out loss."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mova_train.sampling import heldout_loss, log_renders_to_wandb, render_eval, sync_summary

SAMPLING = dict(num_frames=5, height=32, width=32, steps=2, cfg_scale=2.0)


@pytest.fixture(scope="module")
def model_and_codecs(tiny_checkpoint):
    from mova_train.codecs import load_codecs
    from mova_train.models import load_mova

    torch.set_num_threads(1)
    return load_mova(tiny_checkpoint), load_codecs(tiny_checkpoint)


PROMPTS = ["a door slams", {"prompt": "a dog barks", "seed": 9}]


@pytest.fixture(scope="module")
def eval_run(model_and_codecs, tmp_path_factory):
    """One render_eval call (2 prompts) from a model in training mode, with the RNG state around it."""
    model, codecs = model_and_codecs
    out = tmp_path_factory.mktemp("eval")
    model.train()
    before = torch.get_rng_state()
    records = render_eval(model, codecs, PROMPTS, out, step=120, **SAMPLING)
    return SimpleNamespace(out=out, records=records, rng_before=before, rng_after=torch.get_rng_state(),
                           training_after=model.training)  # fmt: skip


def test_render_eval_writes_renders_with_sync_figures_and_keeps_state(model_and_codecs, eval_run):
    model, codecs = model_and_codecs
    records = eval_run.records
    assert eval_run.training_after and torch.equal(eval_run.rng_before, eval_run.rng_after)  # run undisturbed
    assert [r["seed"] for r in records] == [0, 9]
    step_dir = eval_run.out / "step-000120"
    listed = json.loads((step_dir / "renders.json").read_text())
    assert listed["step"] == 120 and len(listed["renders"]) == 2
    for record in records:
        assert record["step"] == 120
        assert (step_dir / record["mp4"].split("/")[-1]).is_file()
        assert record["contact_sheet"].endswith(".png")
        assert record["av_offset_s"] is None or abs(record["av_offset_s"]) <= 5 / 24 / 2 + 1e-6
        assert 0.0 <= record["av_confidence"] <= 1.0
    # the same prompt and seed at a later step with unchanged weights renders the same file
    again = render_eval(model, codecs, PROMPTS[:1], eval_run.out, step=121, contact_sheet=False, **SAMPLING)
    with open(records[0]["mp4"], "rb") as a, open(again[0]["mp4"], "rb") as b:
        assert a.read() == b.read()


def test_sync_summary_ignores_unconfident_renders():
    records = [
        {"av_offset_s": 0.1, "av_confidence": 0.9},
        {"av_offset_s": -0.3, "av_confidence": 0.8},
        {"av_offset_s": 2.0, "av_confidence": 0.05},
        {"av_offset_s": None, "av_confidence": 0.0},
    ]
    summary = sync_summary(records)
    assert summary["av_offset_abs_mean_ms"] == pytest.approx(200.0)
    assert summary["av_confident_fraction"] == pytest.approx(0.5)
    assert math.isnan(sync_summary(records[2:])["av_offset_abs_mean_ms"])


def test_log_renders_to_wandb_offline_keeps_the_mp4_with_its_audio(eval_run, tmp_path, monkeypatch):
    import wandb

    records = eval_run.records[:1]
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = wandb.init(mode="offline", dir=str(tmp_path), project="mova-train-test")
    try:
        payload = log_renders_to_wandb(records, step=3, run=run)
    finally:
        run.finish()
    assert isinstance(payload["eval/00/video"], wandb.Video)
    assert isinstance(payload["eval/00/contact_sheet"], wandb.Image)
    assert "eval/av_confident_fraction" in payload
    logged = list((tmp_path / "wandb").glob("offline-run-*/files/media/videos/**/*.mp4"))
    assert len(logged) == 1
    assert logged[0].read_bytes() == Path(records[0]["mp4"]).read_bytes()  # audio track included, unchanged
    assert log_renders_to_wandb(records, step=4, run=None) == {}  # no active run: nothing to do


def _batches(model, seed: int, count: int = 2):
    cfg = model.config
    generator = torch.Generator().manual_seed(seed)
    return [
        SimpleNamespace(
            video=torch.randn(1, cfg.video_latent_dim, 2, 4, 4, generator=generator),
            first_frame=torch.randn(1, cfg.video_latent_dim, 2, 4, 4, generator=generator),
            audio=torch.randn(1, cfg.audio_latent_dim, 6, generator=generator),
            text=torch.randn(1, cfg.text_len, cfg.text_dim, generator=generator),
        )
        for _ in range(count)
    ]


def test_heldout_loss_is_a_fixed_figure_of_the_model(model_and_codecs):
    model, _ = model_and_codecs
    batches = _batches(model, seed=1)
    rng = torch.get_rng_state()
    first = heldout_loss(model, batches)
    assert torch.equal(torch.get_rng_state(), rng)
    assert first == heldout_loss(model, batches)  # fixed timesteps and noise: only the model moves it
    assert first["num_evaluations"] == 2 * 8
    assert first["loss"] == pytest.approx(first["loss_video"] + first["loss_audio"])
    assert set(first) >= {"loss_video_dit", "loss_video_dit_2"}  # both experts are scored
    assert all(math.isfinite(v) and v > 0 for v in first.values())
    param = model.audio_dit.blocks[0].ffn[0].weight
    with torch.no_grad():
        param.add_(0.5)
    try:
        assert heldout_loss(model, batches)["loss_audio"] != first["loss_audio"]
    finally:
        with torch.no_grad():
            param.sub_(0.5)
