"""`lora.init_from` and `tracking.backend=tensorboard`, with the trainer in this process on the tiny checkpoint.

One short run (TensorBoard, with an evaluation) is exported; new runs start from the export: their step-0
adapters are the export's, their first loss is the one a run holding those weights gives, a mismatched LoRA is
refused before the model loads, a resume keeps its own adapters, and another starting adapter is refused on resume.
The TensorBoard event files hold the same scalars as metrics.jsonl, and the evaluation's renders.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mova_train.errors import ConfigValueError
from mova_train.lora import (
    LoraError,
    load_adapters,
    load_lora_state_dict,
    lora_state_dict,
    read_init_adapter,
    save_adapters,
)
from mova_train.lora.export import export_adapter
from mova_train.training import checkpoint as ckpt_io
from mova_train.training.synthetic import write_random_shards_for
from mova_train.training.trainer import Trainer, run, to_train_config, validate_config
from tests.train_utils import compose_train, read_metrics, reset_accelerate, tiny_overrides

STEPS = 3


@pytest.fixture(scope="module")
def shards(tiny_checkpoint, tmp_path_factory):
    return write_random_shards_for(tiny_checkpoint, tmp_path_factory.mktemp("clips"), num_clips=2)


def make_trainer(tiny_checkpoint, shards, run_dir, *extra) -> Trainer:
    reset_accelerate()
    cfg = compose_train(tiny_overrides(tiny_checkpoint, shards, run_dir, *extra))
    trainer = Trainer(validate_config(to_train_config(cfg)))
    trainer.setup()
    return trainer


@pytest.fixture(scope="module")
def first_run(tiny_checkpoint, shards, tmp_path_factory):
    """STEPS steps with TensorBoard and an evaluation at the last step, then exports in the mova and peft formats."""
    root = tmp_path_factory.mktemp("first")
    trainer = make_trainer(
        tiny_checkpoint, shards, root / "run", f"trainer.max_steps={STEPS}", "tracking.backend=tensorboard",
        f"eval.every={STEPS}", "eval.prompts=[a dog barks]", "eval.num_frames=5", "eval.height=32",
        "eval.width=32", "eval.steps=2",
    )  # fmt: skip
    assert trainer.train().step == STEPS
    reset_accelerate()
    export_adapter(root / "run", root / "mova", "mova")
    export_adapter(root / "run", root / "peft", "peft")
    return root


def test_tensorboard_events_hold_the_metrics_and_the_renders(first_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(first_run / "run" / "tensorboard"), size_guidance={"images": 0, "audio": 0})
    events.Reload()
    rows = read_metrics(first_run / "run")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for name in (
        "loss",
        "loss_video",
        "loss_audio",
        "lr",
        "grad_norm",
        "samples_per_s",
        "tokens_per_s",
        "mem_gb",
    ):
        scalars = events.Scalars(f"train/{name}")
        assert [s.step for s in scalars] == [r["step"] for r in rows], name
        # event files store float32: the values are metrics.jsonl's, rounded to float32
        assert [s.value for s in scalars] == [float(np.float32(r[name])) for r in rows], name
    for expert in {r["expert"] for r in rows}:
        per_expert = {s.step: s.value for s in events.Scalars(f"train/loss_{expert}")}
        assert per_expert == {r["step"]: float(np.float32(r["loss"])) for r in rows if r["expert"] == expert}
    tags = events.Tags()
    assert "eval/00/contact_sheet" in tags["images"] and "eval/00/audio" in tags["audio"]
    (audio,) = events.Audio("eval/00/audio")
    assert audio.step == STEPS and audio.sample_rate > 0 and audio.length_frames > 0
    assert [s.step for s in events.Scalars("eval/renders")] == [STEPS]


def test_every_export_format_and_the_checkpoint_are_the_same_init_adapter(first_run):
    checkpoint = first_run / "run" / "checkpoints" / f"step-{STEPS:08d}"
    reads = [
        read_init_adapter(p)
        for p in (
            first_run / "mova",
            first_run / "peft",
            checkpoint,
            checkpoint / "adapter",
            first_run / "run",
        )
    ]
    assert len({r.sha256 for r in reads}) == 1
    trained = load_adapters(checkpoint / "adapter")[0]
    for r in reads:
        assert set(r.state) == set(trained) and all(torch.equal(r.state[k], trained[k]) for k in trained)


def test_a_new_run_starts_from_the_export(tiny_checkpoint, shards, first_run, tmp_path):
    export = first_run / "mova"
    exported = load_adapters(export)[0]
    started = make_trainer(
        tiny_checkpoint, shards, tmp_path / "init", "trainer.max_steps=1", f"lora.init_from={export}"
    )
    at_step0 = lora_state_dict(started.model)
    assert set(at_step0) == set(exported) and all(torch.equal(at_step0[k], exported[k]) for k in exported)
    started.train()
    # the same run with those weights put in by hand after setup: the same first loss
    by_hand = make_trainer(tiny_checkpoint, shards, tmp_path / "by_hand", "trainer.max_steps=1")
    load_lora_state_dict(by_hand.model, exported)
    by_hand.train()
    first_loss = read_metrics(tmp_path / "init")[0]["loss"]
    assert first_loss == read_metrics(tmp_path / "by_hand")[0]["loss"]
    assert first_loss != read_metrics(first_run / "run")[0]["loss"]  # not what the default init gives

    # resume: the run's own checkpoint (step 1) wins over lora.init_from
    resumed = make_trainer(
        tiny_checkpoint, shards, tmp_path / "init", "trainer.max_steps=2", f"lora.init_from={export}"
    )
    saved = load_adapters(tmp_path / "init" / "checkpoints" / "step-00000001" / "adapter")[0]
    now = lora_state_dict(resumed.model)
    assert resumed.counters.step == 1 and all(torch.equal(now[k], saved[k]) for k in saved)
    assert not all(torch.equal(now[k], exported[k]) for k in exported)
    resumed.finish()

    # another starting adapter: the resume is refused, naming the field
    other = tmp_path / "other"
    cfg = load_adapters(export)[1]
    save_adapters(other, None, cfg, metadata={}, state_dict={k: v * 2 for k, v in exported.items()})
    reset_accelerate()
    with pytest.raises(ckpt_io.ResumeError, match="lora_init_from_sha256"):
        run(compose_train(tiny_overrides(
            tiny_checkpoint, shards, tmp_path / "init", "trainer.max_steps=2", f"lora.init_from={other}"
        )))  # fmt: skip


def test_a_mismatched_or_missing_init_adapter_is_refused_before_the_model_loads(
    tiny_checkpoint, shards, first_run, tmp_path
):
    def validate(*extra):
        return validate_config(
            to_train_config(compose_train(tiny_overrides(tiny_checkpoint, shards, tmp_path, *extra)))
        )

    with pytest.raises(LoraError) as e:
        validate(f"lora.init_from={first_run / 'peft'}", "lora.rank=8")
    assert "lora.rank: the adapter has 4, this run has 8" in str(e.value)
    assert "lora.alpha" not in str(e.value)
    with pytest.raises(LoraError, match="lora.targets: the adapter has"):
        validate(f"lora.init_from={first_run / 'mova'}", "lora.targets.audio_dit=[self_attn,ffn]")
    with pytest.raises(ConfigValueError, match="lora.init_from='.*nowhere': not found"):
        validate(f"lora.init_from={tmp_path / 'nowhere'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoraError, match="holds no adapter"):
        validate(f"lora.init_from={tmp_path / 'empty'}")


def test_tracking_backend_choices_and_the_old_mode_spelling(tmp_path):
    """(W&B itself, offline, is tested with the distributed runs.)"""
    from mova_train.training.config import TrackingConfig
    from mova_train.training.tracking import TensorBoardTracker, Tracker, build_tracker

    with pytest.raises(ConfigValueError, match="tracking.backend.*wandb, tensorboard, none"):
        TrackingConfig(backend="mlflow").validate()
    for groups, kind in ((["tracking=disabled"], Tracker), (["tracking.mode=disabled"], Tracker),
                         (["tracking=tensorboard"], TensorBoardTracker),
                         (["tracking=offline", "tracking.backend=none"], Tracker)):  # fmt: skip
        cfg = to_train_config(compose_train(["+experiment=tiny_demo", *groups])).tracking
        cfg.validate()
        tracker = build_tracker(cfg, tmp_path, "t", {}, None)
        try:
            assert type(tracker) is kind, groups
            assert (tracker.run is None) == (kind is Tracker)
        finally:
            tracker.finish()
