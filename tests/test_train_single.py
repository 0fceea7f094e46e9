"""The trainer in this process (one rank, no DeepSpeed) on the tiny checkpoint: it learns, the base stays
bit-identical, non-finite steps are skipped and then abort, per-run step budgets stop and resume, and a changed
LoRA layout is refused on resume."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from mova_train.lora import load_adapters
from mova_train.models.checkpoint import load_mova
from mova_train.training import checkpoint as ckpt_io
from mova_train.training.objective import FlowMatchingObjective
from mova_train.training.synthetic import write_random_shards_for
from mova_train.training.trainer import NonFiniteTrainingError, Trainer, run, to_train_config, validate_config
from tests.train_utils import compose_train, read_metrics, reset_accelerate, tiny_overrides


@pytest.fixture(scope="module")
def one_clip(tiny_checkpoint, tmp_path_factory):
    return write_random_shards_for(tiny_checkpoint, tmp_path_factory.mktemp("one_clip"), num_clips=1)


pytestmark = pytest.mark.usefixtures("fresh_accelerate")  # tests/conftest.py


def make_trainer(tiny_checkpoint, shards, run_dir, *extra) -> Trainer:
    cfg = compose_train(tiny_overrides(tiny_checkpoint, shards, run_dir, *extra))
    trainer = Trainer(validate_config(to_train_config(cfg)))
    trainer.setup()
    return trainer


def test_overfitting_one_clip_lowers_the_loss_and_keeps_the_base_bit_identical(
    tiny_checkpoint, one_clip, tmp_path
):
    trainer = make_trainer(
        tiny_checkpoint,
        one_clip,
        tmp_path / "run",
        "trainer.max_steps=100",
        "trainer.save_every=1000",
        "objective.expert=only:video_dit_2",
        "lora=voice",
        "lora.targets.video_dit_2=[self_attn,text_cross_attn,ffn]",
        "lora.alpha=32",
        "optim.lr=1e-2",
        "optim.schedule=cosine",
    )
    result = trainer.train()
    assert result.step == 100 and not result.stopped_by_signal
    losses = [r["loss"] for r in read_metrics(tmp_path / "run")]
    assert len(losses) == 100 and all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-10:]) / 10
    assert last < 0.75 * first, f"loss went from {first:.3f} to {last:.3f}"
    # every frozen base tensor equals the checkpoint's, bit for bit
    fresh = load_mova(tiny_checkpoint, components=("video_dit_2", "audio_dit", "dual_tower_bridge"))
    trained = {
        n.replace("base_layer.", ""): p for n, p in trainer.model.named_parameters() if not p.requires_grad
    }
    reference = dict(fresh.named_parameters())
    assert set(trained) == set(reference)
    assert all(torch.equal(trained[n], reference[n]) for n in reference)
    # only the adapters were trainable, and they moved
    final = load_adapters(tmp_path / "run" / "checkpoints" / "step-00000100" / "adapter")[0]
    assert any("lora_B" in k and bool(v.abs().sum() > 0) for k, v in final.items())


def _poison(monkeypatch, bad_steps: set[int]) -> None:
    """Make the loss NaN on the given 1-based optimizer steps (one micro-step per step here)."""
    original = FlowMatchingObjective.loss
    calls = {"n": 0}

    def loss(self, pred_video, pred_audio, inputs):
        calls["n"] += 1
        total, lv, la = original(self, pred_video, pred_audio, inputs)
        if calls["n"] in bad_steps:
            total = total * float("nan")
        return total, lv, la

    monkeypatch.setattr(FlowMatchingObjective, "loss", loss)


def test_non_finite_steps_are_skipped_then_abort(tiny_checkpoint, one_clip, tmp_path, monkeypatch):
    _poison(monkeypatch, {3, 4})
    trainer = make_trainer(
        tiny_checkpoint,
        one_clip,
        tmp_path / "a",
        "trainer.max_steps=6",
        "trainer.save_every=1",
        "trainer.keep_last=0",
        "trainer.max_consecutive_skips=3",
    )
    trainer.train()
    rows = read_metrics(tmp_path / "a")
    assert [r["skipped"] for r in rows] == [False, False, True, True, False, False]
    ckpts = {s: load_adapters(p / "adapter")[0] for s, p in ckpt_io.list_checkpoints(tmp_path / "a")}
    for step in (3, 4):  # a skipped step changes nothing
        assert all(torch.equal(ckpts[step][k], ckpts[step - 1][k]) for k in ckpts[step])
    assert any(not torch.equal(ckpts[5][k], ckpts[4][k]) for k in ckpts[5])
    assert all(torch.isfinite(v).all() for state in ckpts.values() for v in state.values())

    reset_accelerate()
    _poison(monkeypatch, set(range(2, 100)))
    trainer = make_trainer(
        tiny_checkpoint,
        one_clip,
        tmp_path / "b",
        "trainer.max_steps=10",
        "trainer.save_every=1",
        "trainer.max_consecutive_skips=3",
    )
    with pytest.raises(NonFiniteTrainingError, match="3 optimizer steps in a row"):
        trainer.train()
    assert len(read_metrics(tmp_path / "b")) == 4


def test_step_budget_per_run_then_resume_and_refuse_a_changed_layout(tiny_checkpoint, one_clip, tmp_path):
    run_dir = tmp_path / "run"
    base = tiny_overrides(tiny_checkpoint, one_clip, run_dir, "trainer.max_steps=4", "trainer.save_every=100")
    first = run(compose_train([*base, "trainer.max_steps_per_run=2"]))
    assert first.step == 2 and first.last_checkpoint.name == "step-00000002"
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2]
    reset_accelerate()
    second = run(compose_train(base))  # the same command resumes
    assert second.step == 4
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4]
    assert (run_dir / "config.yaml").is_file() and (run_dir / "logs" / "rank0.log").is_file()
    assert '"package"' in (run_dir / "code_version.json").read_text()
    reset_accelerate()
    with pytest.raises(ckpt_io.ResumeError) as e:
        run(compose_train([*base, "trainer.max_steps=6", "lora.rank=8", "lora.alpha=8"]))
    assert "lora.rank: checkpoint has 4, this run has 8" in str(e.value)
    assert "lora.alpha" in str(e.value) and "world_size" not in str(e.value)


def test_evaluation_during_training_leaves_the_run_unchanged(tiny_checkpoint, one_clip, tmp_path):
    common = ["trainer.max_steps=4", "trainer.save_every=100"]
    plain = run(compose_train(tiny_overrides(tiny_checkpoint, one_clip, tmp_path / "plain", *common)))
    reset_accelerate()
    evaluated = run(compose_train(tiny_overrides(
        tiny_checkpoint, one_clip, tmp_path / "eval", *common, "eval.every=2", "eval.prompts=[a dog barks]",
        f"eval.heldout_shards={one_clip}", "eval.heldout_batches=1", "eval.num_frames=5", "eval.height=32",
        "eval.width=32", "eval.steps=2",
    )))  # fmt: skip
    assert plain.step == evaluated.step == 4
    assert [r["loss"] for r in read_metrics(tmp_path / "eval")] == [
        r["loss"] for r in read_metrics(tmp_path / "plain")
    ]
    rows = [json.loads(line) for line in (tmp_path / "eval" / "eval" / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]
    assert all(r["renders"] == 1 and math.isfinite(r["heldout_loss"]) for r in rows)
    assert len(list((tmp_path / "eval" / "eval").glob("step-*/*.mp4"))) == 2


def test_train_bench_prints_its_figures(tiny_checkpoint, capsys):
    import argparse

    from mova_train.bench.training import add_bench_args, run_gpu_bench, run_train_bench

    parser = argparse.ArgumentParser()
    add_bench_args(parser)
    args = parser.parse_args(
        ["--steps", "2", "--warmup", "1", "--checkpoint", str(tiny_checkpoint), "--cpu-only"]
    )
    assert run_train_bench(args) == 0
    out = capsys.readouterr().out
    assert re.search(r"\[tiny/cpu\] step [\d.]+ ms .* samples/s, .* tokens/s, peak memory [\d.]+ GiB", out)
    reset_accelerate()
    # the random-weights (GPU) path, smoke-checked on CPU with the tiny architecture and a tiny clip
    args = parser.parse_args(
        ["--steps", "1", "--warmup", "0", "--frames", "5", "--height", "32", "--width", "32"]
    )
    run_gpu_bench(args, device="cpu", config_name="tiny")
    assert "TFLOP/s" in capsys.readouterr().out
