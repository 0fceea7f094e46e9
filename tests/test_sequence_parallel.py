"""Sequence parallel (DeepSpeed-Ulysses) on CPU over gloo: the sharded attention equals full attention, the
sharded dual-tower step equals the single-process one (outputs and gradients), and training with
`parallel.sequence_parallel_size` reproduces the run without it (per-step losses, adapter, resume)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from mova_train.codecs.tiny import write_tiny_codecs
from mova_train.config import PROJECT_ROOT, required_components, to_train_config, validate_config
from mova_train.errors import ConfigValueError
from mova_train.lora import load_adapters
from mova_train.models import build_mova
from mova_train.models.checkpoint import save_mova
from mova_train.models.mova import set_sequence_shard
from mova_train.models.sequence import SequenceShard
from mova_train.training.checkpoint import ResumeError
from mova_train.training.checkpointer import Checkpointer
from mova_train.training.config import ParallelConfig
from mova_train.training.parallel import ParallelLayout, apply_sequence_parallel, build_layout
from mova_train.training.synthetic import write_random_shards_for
from mova_train.training.trainer import run
from tests.sequence_parallel_worker import sp_model_config, worker_units
from tests.train_utils import (
    compose_train,
    launch,
    launch_cmd,
    read_metrics,
    reset_accelerate,
    tiny_overrides,
)


def test_ulysses_attention_and_model_step_equal_single_process(tmp_path):
    world = 2
    mp.spawn(worker_units, args=(world, str(tmp_path / "store"), str(tmp_path / "report")), nprocs=world)
    for rank in range(world):
        r = json.loads((tmp_path / f"report.{rank}").read_text())
        assert r["attn_out"] < 1e-6 and r["attn_grad"] < 1e-6, r
        assert r["model_video"] < 1e-5 and r["model_audio"] < 1e-5, r
        assert r["model_grad"] < 1e-5 and r["num_grads"] > 1000, r
        assert r["eval_video"] < 1e-5 and r["recompute"] == 0.0, r


def test_layout_and_head_checks_name_the_numbers():
    with pytest.raises(ConfigValueError, match=r"sequence_parallel_size=3 does not divide the world size 4"):
        build_layout(3, rank=0, world_size=4)
    layout = build_layout(2, rank=3, world_size=4)
    assert (layout.dp_size, layout.dp_rank, layout.sp_rank) == (2, 1, 1)
    model = build_mova("tiny", device="meta")  # 3 video heads
    with pytest.raises(ValueError, match=r"sequence_parallel_size=2 does not divide .* num_heads=3"):
        set_sequence_shard(model, SequenceShard(0, 2))  # the interface alone: only the head check runs
    layout = apply_sequence_parallel(model, ParallelConfig(), 0, 1)  # sp = 1: nothing, no group
    assert model.sequence_shard is None and layout == ParallelLayout(rank=0, world_size=1, sp_size=1)
    assert SequenceShard(3, 5).span(40, "video tokens") == slice(24, 32)
    with pytest.raises(ValueError, match=r"video tokens: 48 tokens do not split evenly over the 5 ranks"):
        SequenceShard(0, 5).span(48, "video tokens")


def test_validation_checks_the_launchers_world_size(sp_checkpoint, sp_shards, tmp_path, monkeypatch):
    overrides = tiny_overrides(sp_checkpoint, sp_shards, tmp_path / "run", "parallel=sp2")
    cfg = to_train_config(compose_train(overrides))
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert validate_config(cfg).parallel.sequence_parallel_size == 2
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigValueError, match=r"sequence_parallel_size=2 does not divide the world size 3"):
        validate_config(cfg)
    assert not (tmp_path / "run").exists()  # before any run dir
    with pytest.raises(ConfigValueError, match=r"parallel.sequence_parallel_size=0 is not allowed"):
        ParallelConfig(sequence_parallel_size=0).validate()


# ---- training: the real train.py under accelerate launch (DeepSpeed ZeRO-2 or ZeRO-3 over gloo) against the same
# runs without sequence parallel, on a tiny checkpoint whose video tower has 4 heads

NUM_STEPS = 4


@pytest.fixture(scope="module")
def sp_checkpoint(tmp_path_factory) -> Path:
    """The released layout with `sp_model_config()` weights (seed 0) and the tiny codecs."""
    out = tmp_path_factory.mktemp("sp_mova") / "ckpt"
    out.mkdir()
    save_mova(build_mova(sp_model_config(), device="cpu", seed=0), out)
    write_tiny_codecs(out, 0)
    return out


@pytest.fixture(scope="module")
def sp_shards(sp_checkpoint, tmp_path_factory):
    # two clips in two shards; 5 frames at 32x32 -> 2 latent frames x 2 x 2 patches = 8 video tokens
    return write_random_shards_for(
        sp_checkpoint, tmp_path_factory.mktemp("sp_shards"), num_clips=2, num_shards=2
    )


def sp_launch(num_processes: int, checkpoint: Path, shards: Path, run_dir: Path, *extra: str, zero: int = 2):
    cmd = launch_cmd(
        checkpoint, shards, run_dir, f"deepspeed=zero{zero}", f"trainer.max_steps={NUM_STEPS}",
        "trainer.save_every=2", "tracking.mode=disabled", *extra,
    )  # fmt: skip
    cmd[cmd.index("--num_processes") + 1] = str(num_processes)
    return launch(cmd)


def sp_adapters(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_adapters(run_dir / "checkpoints" / f"step-{step:08d}" / "adapter")[0]


@pytest.fixture(scope="module")
def one_process_run(sp_checkpoint, sp_shards, tmp_path_factory):
    """The reference: one process, in this one (no launcher to start), without DeepSpeed (the same AdamW)."""
    run_dir = tmp_path_factory.mktemp("sp_ref") / "run"
    reset_accelerate()
    overrides = tiny_overrides(
        sp_checkpoint, sp_shards, run_dir, f"trainer.max_steps={NUM_STEPS}", "trainer.save_every=2"
    )
    try:
        run(compose_train([*overrides, "trainer.keep_last=0"]))
    finally:
        reset_accelerate()
    return run_dir


@pytest.fixture(scope="module")
def sp2_run(sp_checkpoint, sp_shards, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("sp2") / "run"
    sp_launch(2, sp_checkpoint, sp_shards, run_dir, "parallel=sp2")
    return run_dir


def test_two_process_sequence_parallel_trains_like_one_process(one_process_run, sp2_run):
    rows, reference = read_metrics(sp2_run), read_metrics(one_process_run)
    assert [r["step"] for r in rows] == list(range(1, NUM_STEPS + 1)) and not any(r["skipped"] for r in rows)
    # the same samples, noise and timesteps as the one process, and the global (not a per-rank) loss
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in reference], rel=1e-5)
    assert [r["grad_norm"] for r in rows] == pytest.approx([r["grad_norm"] for r in reference], rel=1e-5)
    assert [r["samples_seen"] for r in rows] == [r["samples_seen"] for r in reference]
    assert [r["timesteps"] for r in rows] == [r["timesteps"] for r in reference]  # one list per dp rank
    state = json.loads((sp2_run / "checkpoints" / f"step-{NUM_STEPS:08d}" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["fingerprint"]["sequence_parallel_size"] == 2
    assert state["fingerprint"]["global_batch"] == 1  # one data-parallel rank
    log = (sp2_run / "logs" / "rank1.log").read_text()
    assert "rank 1 is 1/2 of its group, data-parallel rank 0/1" in log
    final, want = sp_adapters(sp2_run, NUM_STEPS), sp_adapters(one_process_run, NUM_STEPS)
    assert final.keys() == want.keys()
    moved = max((want[k] - sp_adapters(one_process_run, 2)[k]).abs().max().item() for k in want)
    assert moved > 1e-4  # the adapters did train
    # Adam divides by the gradient's running RMS: last-bit gradient differences can move an element by a
    # fraction of lr; see tests/test_train_distributed.py::test_zero3_run_completes_and_agrees_with_zero2
    assert all(torch.allclose(final[k], want[k], rtol=1e-3, atol=2e-5) for k in want)


def test_sequence_parallel_resume_is_exact_and_refuses_another_layout(
    sp2_run, sp_checkpoint, sp_shards, tmp_path
):
    run_dir = tmp_path / "resumed"
    sp_launch(
        2,
        sp_checkpoint,
        sp_shards,
        run_dir,
        "parallel=sp2",
        f"trainer.resume={sp2_run}/checkpoints/step-00000002",
    )
    rows, reference = read_metrics(run_dir), read_metrics(sp2_run)
    assert [r["step"] for r in rows] == [3, 4]
    assert [r["loss"] for r in rows] == [r["loss"] for r in reference[2:]]
    final, want = sp_adapters(run_dir, NUM_STEPS), sp_adapters(sp2_run, NUM_STEPS)
    assert final.keys() == want.keys() and all(torch.equal(final[k], want[k]) for k in want)
    # the same checkpoint under another layout: refused before anything loads, naming what differs
    saved = f"{sp2_run}/checkpoints/step-00000002"
    for world, extra, message in (
        (1, (), "sequence_parallel_size: checkpoint has 2, this run has None"),
        (4, ("parallel=sp2",), "global_batch: checkpoint has 1, this run has 2"),  # two sequence groups
    ):
        overrides = tiny_overrides(
            sp_checkpoint, sp_shards, tmp_path / "other", f"trainer.resume={saved}", *extra
        )
        cfg = to_train_config(compose_train(overrides))
        checkpointer = Checkpointer(cfg, rank=0, world_size=world, is_main=True, device=torch.device("cpu"))
        checkpointer.fingerprint(components=required_components(cfg), mixed_precision="no")
        with pytest.raises(ResumeError, match=re.escape(message)):
            checkpointer.find_resume()


@pytest.fixture(scope="module")
def dp2_run(sp_checkpoint, sp_shards, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("dp2") / "run"
    sp_launch(2, sp_checkpoint, sp_shards, run_dir)
    return run_dir


def test_four_process_dp2_sp2_trains_like_two_process_dp2(dp2_run, sp_checkpoint, sp_shards, tmp_path):
    run_dir = tmp_path / "dp2sp2"
    # ZeRO-3 here, ZeRO-2 in the reference and the 2-process test
    sp_launch(4, sp_checkpoint, sp_shards, run_dir, "parallel=sp2", zero=3)
    rows, reference = read_metrics(run_dir), read_metrics(dp2_run)
    assert [r["step"] for r in rows] == list(range(1, NUM_STEPS + 1)) and not any(r["skipped"] for r in rows)
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in reference], rel=1e-5)
    assert [r["grad_norm"] for r in rows] == pytest.approx([r["grad_norm"] for r in reference], rel=1e-5)
    assert [r["samples_seen"] for r in rows] == [r["samples_seen"] for r in reference] == [2, 4, 6, 8]
    assert [r["timesteps"] for r in rows] == [r["timesteps"] for r in reference]
    logs = {r: (run_dir / "logs" / f"rank{r}.log").read_text() for r in range(4)}
    assert "rank 2 is 0/2 of its group, data-parallel rank 1/2" in logs[2]
    final, want = sp_adapters(run_dir, NUM_STEPS), sp_adapters(dp2_run, NUM_STEPS)
    assert final.keys() == want.keys()
    assert all(torch.allclose(final[k], want[k], rtol=1e-3, atol=2e-5) for k in want)
    # resume exact in the dp2 x sp2 layout too: 4 ranks from its step-2 checkpoint reproduce steps 3-4 bit for bit
    resumed = tmp_path / "dp2sp2_resumed"
    sp_launch(
        4, sp_checkpoint, sp_shards, resumed, "parallel=sp2", f"trainer.resume={run_dir}/checkpoints/step-00000002",
        zero=3,
    )  # fmt: skip
    again = read_metrics(resumed)
    assert [r["step"] for r in again] == [3, 4]
    assert [r["loss"] for r in again] == [r["loss"] for r in rows[2:]]
    assert [r["grad_norm"] for r in again] == [r["grad_norm"] for r in rows[2:]]
    final, want = sp_adapters(resumed, NUM_STEPS), sp_adapters(run_dir, NUM_STEPS)
    assert final.keys() == want.keys() and all(torch.equal(final[k], want[k]) for k in want)


def test_slurm_template_passes_sp_and_refuses_a_size_that_splits_a_node(tmp_path):
    """launch/slurm/train.sbatch with SP=: the override reaches train.py; SP must divide the GPUs per node."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/usr/bin/env bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    (bin_dir / "accelerate").write_text(f'#!/usr/bin/env bash\necho "$@" > {tmp_path / "args"}\n')
    for tool in ("srun", "accelerate"):
        (bin_dir / tool).chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "GPUS_PER_NODE": "8", "MASTER_ADDR": "127.0.0.1",
           "SLURM_NODEID": "0", "HOME": str(tmp_path)}  # fmt: skip
    script = PROJECT_ROOT / "launch" / "slurm" / "train.sbatch"

    def sbatch(sp: str | None) -> subprocess.CompletedProcess:
        extra = {} if sp is None else {"SP": sp}
        return subprocess.run(["bash", str(script), "trainer.max_steps=3"], cwd=PROJECT_ROOT, env={**env, **extra},
                              capture_output=True, text=True, timeout=60)  # fmt: skip

    assert sbatch("4").returncode == 0
    args = (tmp_path / "args").read_text().split()
    assert args[-2:] == ["parallel.sequence_parallel_size=4", "trainer.max_steps=3"]
    assert sbatch(None).returncode == 0
    assert not any(a.startswith("parallel.") for a in (tmp_path / "args").read_text().split())
    refused = sbatch("3")
    assert (
        refused.returncode == 2 and "SP=3 must be a positive divisor of the 8 GPUs per node" in refused.stderr
    )
