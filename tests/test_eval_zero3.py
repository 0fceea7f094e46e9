"""Evaluation under DeepSpeed ZeRO-3 (issue 12): the real entry point under `accelerate launch --num_processes 2` on
CPU (gloo), with every parameter partitioned (stage3_param_persistence_threshold 0: each module's forward gathers
its weights from both ranks). The step-0 baseline, the renders every 2 steps and the held-out loss run on both ranks;
rank 0 alone writes the files and logs to W&B (offline), once per evaluation. The renders and held-out losses equal
those of a single process with the same adapters, and the training losses and adapters equal those of the same run
without evaluation. A stop signal on one rank stops both at the same denoising step (two gloo ranks).

The two launches (with and without evaluation) run side by side, and each is made once and shared by the tests.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from mova_train.data.config import DataConfig
from mova_train.data.loader import build_loader
from mova_train.media import read_audio
from mova_train.models import load_mova
from mova_train.sampling import (
    MovaPipeline,
    RenderInterrupted,
    SamplingError,
    generate,
    heldout_loss,
    load_pipeline,
    render_eval,
)
from mova_train.training.distributed import broadcast_object
from mova_train.training.evaluator import any_rank
from mova_train.training.signals import StopFlag
from mova_train.training.synthetic import write_random_shards_for
from tests.train_utils import (
    PROJECT_ROOT,
    launch_cmd,
    launch_env,
    read_metrics,
    subprocess_timeout,
    wandb_offline_records,
)

pytestmark = pytest.mark.distributed

STEPS = 3
PROMPT = "a dog barks"
SIZES = {"num_frames": 5, "height": 32, "width": 32, "steps": 2, "cfg_scale": 1.0}
EVAL = [
    "eval.at_start=true", "eval.every=2", f"eval.prompts=[{PROMPT}]", "eval.heldout_batches=1",
    *(f"eval.{k}={v}" for k, v in SIZES.items()),
]  # fmt: skip
EVAL_STEPS = [0, 2]


@pytest.fixture(scope="module")
def runs(tiny_checkpoint, tmp_path_factory):
    """({with eval, without eval} run dirs, the shards): the same 2-rank ZeRO-3 run of STEPS steps, a checkpoint at
    each evaluation step, launched side by side."""
    root = tmp_path_factory.mktemp("eval_zero3")
    shards = write_random_shards_for(tiny_checkpoint, root / "shards", num_clips=2, num_shards=2)
    ds = json.loads((PROJECT_ROOT / "launch" / "deepspeed" / "zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # no parameter stays whole on a rank
    (root / "zero3.json").write_text(json.dumps(ds))
    common = [f"deepspeed.config={root / 'zero3.json'}", f"trainer.max_steps={STEPS}", "trainer.save_every=2"]
    cmds = {
        "eval": launch_cmd(tiny_checkpoint, shards, root / "eval", *common, "tracking.mode=offline", *EVAL,
                           f"eval.heldout_shards={shards}"),
        "plain": launch_cmd(tiny_checkpoint, shards, root / "plain", *common, "tracking.mode=disabled"),
    }  # fmt: skip
    procs = {}
    for name, cmd in cmds.items():  # output to files: a full pipe would stall a launch while the other runs
        with open(root / f"{name}.out", "w") as out:
            procs[name] = subprocess.Popen(
                cmd, cwd=PROJECT_ROOT, env=launch_env(), stdout=out, stderr=subprocess.STDOUT
            )
    codes = {name: proc.wait(timeout=subprocess_timeout(400)) for name, proc in procs.items()}
    for name, code in codes.items():
        assert code == 0, f"{name}: exit {code}\n{(root / f'{name}.out').read_text()[-6000:]}"
    return root / "eval", root / "plain", shards


def _eval_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "eval" / "eval.jsonl").read_text().splitlines()]


def _wandb_history(run_dir: Path) -> list[dict]:
    """The history rows of the run's one W&B offline file, each as {key: value}."""
    (path,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    return [
        {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
        for record in wandb_offline_records(path)
        if record.WhichOneof("record_type") == "history"
    ]


def test_both_ranks_evaluate_and_rank_0_writes_and_logs_each_render_once(runs):
    run_dir, _, _ = runs
    rows = _eval_rows(run_dir)
    assert [r["step"] for r in rows] == EVAL_STEPS  # the step-0 baseline, then every 2 steps
    for row in rows:
        assert row["renders"] == 1 and "interrupted" not in row, row
        assert math.isfinite(row["heldout_loss"]) and row["heldout_num_evaluations"] == 8
    eval_files = sorted(
        str(p.relative_to(run_dir / "eval")) for p in (run_dir / "eval").rglob("*") if p.is_file()
    )
    stem = "000-a-dog-barks-s0"
    assert eval_files == ["eval.jsonl"] + [
        f"step-{s:06d}/{name}" for s in EVAL_STEPS for name in (f"{stem}.mp4", f"{stem}.png", "renders.json")
    ]
    # rank 1 ran every render (its forwards gather rank 0's partitions and the other way round), with the inputs
    # rank 0 prepared: only rank 0 loaded the codecs, once
    for rank in (0, 1):
        log = (run_dir / "logs" / f"rank{rank}.log").read_text()
        assert [s for s in EVAL_STEPS if f"eval render 1/1 at step {s} " in log] == EVAL_STEPS, rank
        assert log.count("eval: loading the codecs") == (1 if rank == 0 else 0), rank
    # one W&B run (rank 0's), each render and each eval figure logged once, at its step
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1
    history = _wandb_history(run_dir)
    logged = [(h["_step"], h["eval/00/video/path"]) for h in history if "eval/00/video/path" in h]
    assert [step for step, _ in logged] == EVAL_STEPS
    assert [h["_step"] for h in history if "eval/heldout_loss" in h] == EVAL_STEPS
    assert [h["eval/heldout_loss"] for h in history if "eval/heldout_loss" in h] == [
        r["heldout_loss"] for r in rows
    ]
    assert [h["_step"] for h in history if "train/loss" in h] == list(range(1, STEPS + 1))
    videos = sorted((run_dir / "wandb").glob("offline-run-*/files/media/videos/**/*.mp4"))
    assert sorted(v.relative_to(v.parents[4]).as_posix() for v in videos) == sorted(p for _, p in logged)


def _frames(path) -> np.ndarray:
    import decord

    reader = decord.VideoReader(str(path), ctx=decord.cpu(0))
    frames = reader.get_batch(list(range(len(reader)))).asnumpy()  # uint8 [N, H, W, 3]
    del reader
    return frames


def test_zero3_renders_and_heldout_losses_equal_a_single_process_with_the_same_adapters(
    runs, tiny_checkpoint, tmp_path
):
    """The renders come from the live PEFT model gathered module by module; a single process merges the same
    adapters into whole weights (load_pipeline): equal up to float rounding. The adapters make a difference (the
    step-2 figures move away from the step-0 baseline), so an evaluation that left them out would fail."""
    run_dir, _, shards = runs
    rows = {r["step"]: r for r in _eval_rows(run_dir)}
    renders, sounds, codecs = {}, {}, None
    for step in EVAL_STEPS:
        loras = [str(run_dir / "checkpoints" / f"step-{step:08d}")] if step else []  # step 0: the base alone
        pipeline = load_pipeline(tiny_checkpoint, loras=loras, codecs=codecs)
        codecs = pipeline.codecs
        data = DataConfig(
            shards=str(shards),
            batch_size=1,
            num_workers=0,
            shuffle_buffer=0,
            shuffle_shards=False,
            resample=False,
        )
        loader = build_loader(
            data,
            rank=0,
            world_size=1,
            seed=0,
            text_len=pipeline.model.config.text_len,
            expected_codec_identity=None,
        )
        single = heldout_loss(pipeline.model, iter(loader), max_batches=1)
        assert single["loss"] == pytest.approx(rows[step]["heldout_loss"], rel=1e-6, abs=0), step
        (record,) = render_eval(pipeline, None, [PROMPT], tmp_path / "single", step=step, seed=0, **SIZES)
        zero3 = run_dir / "eval" / f"step-{step:06d}" / Path(record["mp4"]).name
        renders[step] = _frames(zero3)
        # equal up to float rounding: the ranks compute with weights gathered from partitions read rank-locally, the
        # single process with merged whole weights; last-bit differences can flip an H.264 block decision, so a few
        # pixels move (measured: mean 0.05 levels, 0.5% of pixels by more than 4), while the adapters move the
        # render by a mean of ~3.5 levels (28% of pixels by more than 4)
        diff = np.abs(renders[step].astype(int) - _frames(record["mp4"]).astype(int))
        assert diff.mean() < 0.5 and (diff > 4).mean() < 0.02, (step, diff.mean(), (diff > 4).mean())
        # AAC is lossy: last-bit differences before encoding may move a quantisation step (~1e-3 of the signal);
        # the adapters of step 2 move the sound by ~1.5e-2 of it
        audio, single_audio = read_audio(zero3)[0], read_audio(record["mp4"])[0]
        assert audio.shape == single_audio.shape and _rms(audio - single_audio) < 3e-3 * _rms(audio), step
        sounds[step] = audio
    first, last = (rows[s]["heldout_loss"] for s in EVAL_STEPS)
    assert abs(first - last) > 1e-4 * first
    assert np.abs(renders[0].astype(int) - renders[2].astype(int)).mean() > 1.0
    assert _rms(sounds[0] - sounds[2]) > 6e-3 * _rms(sounds[0])


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


def test_training_after_the_evaluations_equals_the_run_without_them(runs):
    """No RNG stream, weight or optimizer state is touched by an evaluation: the same losses, bit for bit, and the
    same adapters."""
    from mova_train.lora import load_adapters  # here: PEFT is slow to import in the spawned ranks below

    run_dir, plain_dir, _ = runs
    losses = [r["loss"] for r in read_metrics(run_dir)]
    assert len(losses) == STEPS and losses == [r["loss"] for r in read_metrics(plain_dir)]
    ckpt = Path("checkpoints") / "step-00000003" / "adapter"
    final, want = load_adapters(run_dir / ckpt)[0], load_adapters(plain_dir / ckpt)[0]
    assert final.keys() == want.keys() and all(final[k].equal(want[k]) for k in want)


def _render_until_rank_1_is_signalled(rank: int, init_file: str, checkpoint: str, out_dir: str) -> None:
    """One of two gloo ranks rendering the same clip as the Evaluator does under ZeRO-3 (rank 0 prepares the
    inputs with its codecs and shares them, rank 1 has none); rank 1 gets a real SIGTERM in its second forward."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    pipeline = (
        load_pipeline(checkpoint) if rank == 0 else MovaPipeline.from_model(load_mova(checkpoint), None)
    )
    flag = StopFlag()
    flag.install()
    forwards = []

    def count(module, args, output):
        forwards.append(len(forwards))
        if rank == 1 and len(forwards) == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    pipeline.model.register_forward_hook(count)
    stopping = any_rank(lambda: flag.signal is not None, torch.device("cpu"))
    try:
        generate(
            pipeline, None, [PROMPT], **{**SIZES, "steps": 6}, progress=False, should_stop=stopping,
            share=broadcast_object,
        )  # fmt: skip
        result = "finished"
    except RenderInterrupted as e:
        result = e.steps_done
    Path(out_dir, f"rank{rank}.json").write_text(
        json.dumps({"result": result, "signal": flag.signal, "forwards": len(forwards)})
    )
    dist.destroy_process_group()


def test_a_stop_signal_on_one_rank_stops_every_rank_at_the_same_denoising_step(tiny_checkpoint, tmp_path):
    """The evaluator's collective stop check (`any_rank`): rank 0, which got no signal, abandons the render at the
    same step as rank 1, so neither waits for the other in a gather that never comes."""
    torch.multiprocessing.start_processes(
        _render_until_rank_1_is_signalled, args=(str(tmp_path / "init"), str(tiny_checkpoint), str(tmp_path)),
        nprocs=2, start_method="spawn",
    )  # fmt: skip
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert results == [
        {"result": 2, "signal": None, "forwards": 2},
        {"result": 2, "signal": int(signal.SIGTERM), "forwards": 2},
    ]


def test_a_render_without_codecs_is_refused_unless_it_is_shared(tiny_checkpoint):
    bare = MovaPipeline.from_model(load_mova(tiny_checkpoint), None)
    with pytest.raises(SamplingError, match="the pipeline has no codecs"):
        generate(bare, None, [PROMPT], **SIZES, progress=False)
    # a shared render whose main rank has no codecs either: nobody can prepare the inputs
    with pytest.raises(SamplingError, match="main rank of a shared render has no codecs"):
        generate(bare, None, [PROMPT], **SIZES, progress=False, share=lambda sent: sent)
