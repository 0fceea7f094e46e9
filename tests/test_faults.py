"""Faults that used to lose or hide something (issue: "Nothing lost, nothing hidden"), each tried for real: rejected
samples counted over all ranks, one writer per run dir, resume=never beside older checkpoints, Ctrl-C, a stalled
peer, fatal errors in the rank logs."""

from __future__ import annotations

import ast
import contextlib
import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from data_tools.scan import scan
from data_tools.synth import synthesize
from mova_train import run_layout
from mova_train.codecs import codec_identity
from mova_train.config import PROJECT_ROOT, to_train_config, validate_config
from mova_train.data.config import DataConfig
from mova_train.data.errors import ShardReadError
from mova_train.data.loader import build_loader
from mova_train.data.shards import resolve_shards
from mova_train.data.synthetic import make_synthetic_sample, write_shard_set
from mova_train.models.checkpoint import read_mova_config
from mova_train.training import signals
from mova_train.training.checkpoint import ResumeError, verify_checkpoint
from mova_train.training.objective import FlowMatchingObjective
from mova_train.training.run_lock import RunDirLockedError, RunLock
from mova_train.training.synthetic import write_random_shards_for
from mova_train.training.trainer import NonFiniteTrainingError, Trainer, run
from tests.train_utils import (
    compose_train,
    launch_cmd,
    launch_env,
    launch_until_steps,
    read_metrics,
    reset_accelerate,
    subprocess_timeout,
    tiny_overrides,
)

pytestmark = pytest.mark.usefixtures("fresh_accelerate")  # tests/conftest.py


@pytest.fixture(scope="module")
def shards(tiny_checkpoint, tmp_path_factory):
    return write_random_shards_for(
        tiny_checkpoint, tmp_path_factory.mktemp("shards"), num_clips=2, num_shards=2
    )


def _shards_with_nan(checkpoint: Path, out: Path, *, per_shard: int, bad: set[tuple[int, int]]) -> Path:
    """Two shards of tiny-checkpoint-shaped samples; (shard, index) pairs in `bad` hold a NaN latent."""
    config, identity = read_mova_config(checkpoint), codec_identity(checkpoint)
    g = torch.Generator().manual_seed(0)
    shards = []
    for s in range(2):
        shard = []
        for k in range(per_shard):
            meta, tensors = make_synthetic_sample(
                f"clip_{s}_{k}", bucket="32x32", num_frames=5, num_audio_samples=10_000, num_tokens=7,
                text_dim=config.text_dim, audio_channels=config.audio_latent_dim, codec_identity=identity,
                generator=g,
            )  # fmt: skip
            if (s, k) in bad:
                tensors["video"][0, 0, 0, 0] = math.nan
            shard.append((meta, tensors))
        shards.append(shard)
    write_shard_set(out, shards, codec_identity=identity, checkpoint_identity="random")
    return out


def _data_stats(run_dir: Path, rank: int) -> dict:
    line = [
        x for x in (run_dir / "logs" / f"rank{rank}.log").read_text().splitlines() if "data on rank" in x
    ][-1]
    return ast.literal_eval(line.split(f"data on rank {rank}: ", 1)[1])


# ------------------------------------------------------------------------------------------------- item 3
def test_rejected_samples_are_summed_over_ranks(tiny_checkpoint, tmp_path):
    data = _shards_with_nan(tiny_checkpoint, tmp_path / "shards", per_shard=8, bad={(1, 2)})
    run_dir = tmp_path / "run"
    cmd = launch_cmd(
        tiny_checkpoint, data, run_dir, "deepspeed=zero2", "trainer.save_every=100", "tracking.mode=disabled",
        "data.max_rejected_fraction=0.5", "data.shuffle_buffer=0",
    )  # fmt: skip
    proc = subprocess.run(
        cmd,
        cwd=PROJECT_ROOT,
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=subprocess_timeout(300),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rank_totals = [_data_stats(run_dir, r).get("rejected_total", 0) for r in (0, 1)]
    assert rank_totals[0] == 0 and rank_totals[1] >= 1, rank_totals  # the bad sample sits in rank 1's shard
    assert read_metrics(run_dir)[-1]["rejected_samples"] == sum(rank_totals)


# ------------------------------------------------------------------------------------------------- item 6
def test_a_second_training_on_a_live_run_dir_is_refused(tiny_checkpoint, shards, tmp_path):
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(
        tiny_checkpoint, shards, run_dir, "trainer.max_steps=2", "trainer.save_every=1"
    )
    first = Trainer(validate_config(to_train_config(compose_train(overrides))))
    first.setup()  # holds the lock from here on
    in_progress = run_layout.in_progress_dir(run_dir, 1)
    in_progress.mkdir(parents=True)  # as if the first job were writing a checkpoint right now
    lock = json.loads((run_dir / run_layout.LOCK_FILE).read_text())
    assert lock["pid"] == os.getpid() and lock["host"] == socket.gethostname()
    with pytest.raises(RunDirLockedError, match=rf"in use by another training \(host .*, pid {os.getpid()}"):
        run(compose_train(overrides))
    assert in_progress.is_dir()  # the refused start deleted nothing of the live job's
    in_progress.rmdir()
    assert first.train().step == 2  # the holder is not disturbed
    assert not (run_dir / run_layout.LOCK_FILE).exists()  # released at the end
    reset_accelerate()
    assert run(compose_train([*overrides, "trainer.max_steps=3"])).step == 3  # free again


def test_stale_locks_are_taken_over_with_a_warning(tmp_path, caplog):
    path = tmp_path / run_layout.LOCK_FILE
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that no longer runs
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "heartbeat": time.time()}))
    lock = RunLock(tmp_path, stale_after=60)
    lock.acquire()
    assert f"its process {dead.pid} on this host is gone" in caplog.text
    assert json.loads(path.read_text())["token"] == lock.token
    lock.release()
    assert not path.exists()
    # another host: alive while its heartbeat is fresh, stale once older than stale_after
    path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "heartbeat": time.time()}))
    with pytest.raises(RunDirLockedError, match="host elsewhere, pid 1"):
        RunLock(tmp_path, stale_after=60).acquire()
    path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "heartbeat": time.time() - 61}))
    lock = RunLock(tmp_path, stale_after=60)
    lock.acquire()
    assert "heartbeat is 61 s old" in caplog.text
    lock.release()


# ------------------------------------------------------------------------------------------------- item 7
def test_resume_never_moves_older_checkpoints_aside_and_keeps_its_own(tiny_checkpoint, shards, tmp_path):
    run_dir = tmp_path / "run"
    base = tiny_overrides(tiny_checkpoint, shards, run_dir, "trainer.save_every=2", "trainer.keep_last=2")
    run(compose_train([*base, "trainer.max_steps=8"]))
    assert [s for s, _ in run_layout.list_checkpoints(run_dir)] == [6, 8]
    reset_accelerate()
    run(compose_train([*base, "trainer.max_steps=4", "trainer.resume=never"]))
    assert [s for s, _ in run_layout.list_checkpoints(run_dir)] == [2, 4]  # the new run's, none pruned
    (aside,) = run_dir.glob("checkpoints.replaced-*")
    assert sorted(p.name for p in aside.iterdir()) == ["step-00000006", "step-00000008"]


# ------------------------------------------------------------------------------------------------ item 10
def test_sigint_stops_like_sigterm_and_a_later_second_one_aborts(monkeypatch):
    flag = signals.StopFlag()
    flag.install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert flag.signal == signal.SIGINT  # no KeyboardInterrupt: the run saves and stops
        os.kill(os.getpid(), signal.SIGINT)  # the launcher's forwarded copy, at once: ignored
        monkeypatch.setattr(signals, "SIGINT_REPEAT_WINDOW_S", 0.0)
        time.sleep(0.01)
        with pytest.raises(KeyboardInterrupt, match="second Ctrl-C"):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)
    finally:
        flag.restore()


def test_ctrl_c_on_the_launcher_saves_a_checkpoint(tiny_checkpoint, shards, tmp_path):
    run_dir = tmp_path / "run"
    cmd = launch_cmd(
        tiny_checkpoint, shards, run_dir, "deepspeed=zero2", "trainer.max_steps=100000", "trainer.save_every=100000",
        "tracking.mode=disabled",
    )  # fmt: skip
    proc, _ = launch_until_steps(cmd, run_dir, new_session=True)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal does: the whole process group
    proc.communicate(timeout=subprocess_timeout(300))
    steps = [s for s, _ in run_layout.list_checkpoints(run_dir)]
    assert steps and steps[-1] == len(read_metrics(run_dir)) >= 2, steps
    for rank in (0, 1):
        assert "stopped by signal 2" in (run_dir / "logs" / f"rank{rank}.log").read_text()


# ------------------------------------------------------------------------------------------------- item 9
def test_a_stalled_peer_ends_the_run_naming_it(tiny_checkpoint, shards, tmp_path):
    run_dir = tmp_path / "run"
    cmd = launch_cmd(
        tiny_checkpoint, shards, run_dir, "deepspeed=zero2", "trainer.max_steps=100000", "trainer.save_every=100000",
        "tracking.mode=disabled", "trainer.collective_timeout_min=0.2",
    )  # fmt: skip
    proc, pid = launch_until_steps(cmd, run_dir, new_session=True)
    os.kill(pid, signal.SIGSTOP)
    stalled_at = time.time()
    try:
        out, _ = proc.communicate(timeout=subprocess_timeout(120))
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert proc.returncode != 0
    log0 = (run_dir / "logs" / "rank0.log").read_text()
    assert "CollectiveTimeoutError" in log0 and "stopped answering: rank 1 (silent for" in log0, log0[-3000:]
    assert time.time() - stalled_at < subprocess_timeout(120)


# ------------------------------------------------------------------------------------------------ item 11
def test_fatal_errors_reach_the_rank_log(tiny_checkpoint, tmp_path):
    data = _shards_with_nan(
        tiny_checkpoint,
        tmp_path / "shards",
        per_shard=4,
        bad={(s, k) for s in (0, 1) for k in range(4)} - {(1, 0)},
    )
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(tiny_checkpoint, data, run_dir, "trainer.max_steps=4", "data.resample=false")
    with pytest.raises(ValueError, match="samples rejected") as err:
        run(compose_train(overrides))
    log = (run_dir / "logs" / "rank0.log").read_text()
    assert "training stopped by TooManyRejectedError" in log and str(err.value).splitlines()[0] in log


# ------------------------------------------------------------------------------------------------- item 5
def test_a_damaged_newest_checkpoint_is_named_and_the_previous_one_resumed(
    tiny_checkpoint, shards, tmp_path, caplog
):
    base = ["trainer.save_every=1", "trainer.keep_last=0"]
    run(
        compose_train(tiny_overrides(tiny_checkpoint, shards, tmp_path / "ref", *base, "trainer.max_steps=6"))
    )
    reference = [r["loss"] for r in read_metrics(tmp_path / "ref")]
    reset_accelerate()
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(tiny_checkpoint, shards, run_dir, *base)
    run(compose_train([*overrides, "trainer.max_steps=4"]))
    step4 = run_layout.checkpoints_dir(run_dir) / run_layout.checkpoint_name(4)
    damaged = step4 / "adapter" / "adapters.safetensors"
    damaged.write_bytes(
        damaged.read_bytes()[: damaged.stat().st_size // 2]
    )  # cut in half, as a crash of the disk
    reset_accelerate()
    with pytest.raises(ResumeError, match=rf"{re.escape(str(damaged))} has \d+ bytes, \d+ were written"):
        run(compose_train([*overrides, "trainer.max_steps=6", f"trainer.resume={step4}"]))
    reset_accelerate()
    run(compose_train([*overrides, "trainer.max_steps=6"]))
    assert f"{damaged} has" in caplog.text and "newest intact checkpoint" in caplog.text
    info = json.loads((run_dir / run_layout.RUN_INFO_FILE).read_text())
    assert info["resumed_from"].endswith(run_layout.checkpoint_name(3))
    assert [
        r["loss"] for r in read_metrics(run_dir)
    ] == reference  # steps 4-6 again, exactly as uninterrupted
    for step, path in run_layout.list_checkpoints(run_dir):
        assert verify_checkpoint(path) is None, step


# ------------------------------------------------------------------------------------------------- item 8
def test_disk_full_during_a_save_names_the_directory_and_loses_nothing(tiny_checkpoint, shards, tmp_path):
    if shutil.which("unshare") is None:
        pytest.fail("this test needs util-linux's `unshare` (a private tmpfs stands in for a full disk)")
    small = tmp_path / "small"
    small.mkdir()
    run_dir = small / "run"
    train = [
        sys.executable, "train.py", *tiny_overrides(tiny_checkpoint, shards, run_dir),
        "trainer.save_every=1", "trainer.keep_last=0", "trainer.max_steps=40",
    ]  # fmt: skip
    check = [
        sys.executable, "-c",
        "import json, sys; from pathlib import Path; from mova_train import run_layout as L; "
        "from mova_train.training.checkpoint import verify_checkpoint; r = Path(sys.argv[1]); "
        "print('RESULT', json.dumps({'complete': [[s, verify_checkpoint(p)] for s, p in L.list_checkpoints(r)], "
        "'leftovers': [p.name for p in L.checkpoints_dir(r).iterdir() if L.is_leftover(p.name)]}))",
        str(run_dir),
    ]  # fmt: skip
    script = (
        f"mount -t tmpfs -o size=1800k tmpfs {shlex.quote(str(small))} && "
        f"{shlex.join(train)}; echo TRAIN_RC=$?; {shlex.join(check)}"
    )
    proc = subprocess.run(
        ["unshare", "--map-root-user", "--mount", "sh", "-c", script], cwd=PROJECT_ROOT, env=launch_env(),
        capture_output=True, text=True, timeout=subprocess_timeout(300),
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert "TRAIN_RC=1" in out or "TRAIN_RC=2" in out, out[-3000:]
    assert re.search(rf"no space left on the device of {re.escape(str(run_dir))}/checkpoints while writing the "
                     r"checkpoint of step \d+: it needs about [\d,]+ bytes and [\d,]+ are free", out), out[-3000:]  # fmt: skip
    result = json.loads(out.split("RESULT ", 1)[1].splitlines()[0])
    assert result["complete"] and all(
        problem is None for _, problem in result["complete"]
    )  # earlier ones intact
    assert result["leftovers"] == []  # the partial checkpoint was removed
    assert f"the last complete one is {run_dir}/checkpoints/step-{result['complete'][-1][0]:08d}" in out


# ----------------------------------------------------------------------------------------------- items 1, 2
def _flip_one_latent_bit(shard: Path) -> str:
    """Flip one bit inside the first sample's latent tensor data, keeping the size; returns that sample's key."""
    with tarfile.open(shard) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("latents.safetensors"))
    data = bytearray(shard.read_bytes())
    data[member.offset_data + member.size - 8] ^= (
        0x01  # the tensor bytes sit at the end of a safetensors file
    )
    shard.write_bytes(bytes(data))
    return member.name.split(".", 1)[0]


def test_other_shard_content_under_the_same_names_is_refused_on_resume(tiny_checkpoint, tmp_path):
    first = write_random_shards_for(tiny_checkpoint, tmp_path / "a", num_clips=2, num_shards=2, seed=0)
    other = write_random_shards_for(tiny_checkpoint, tmp_path / "b", num_clips=2, num_shards=2, seed=1)
    a, b = resolve_shards(str(first)), resolve_shards(str(other))
    assert a.names == b.names and a.num_samples == b.num_samples and a.fingerprint() != b.fingerprint()
    run_dir = tmp_path / "run"
    run(compose_train(tiny_overrides(tiny_checkpoint, first, run_dir, "trainer.max_steps=2")))
    reset_accelerate()
    with pytest.raises(ResumeError, match=r"data_shards: checkpoint has '\w+', this run has '\w+'"):
        run(compose_train(tiny_overrides(tiny_checkpoint, other, run_dir, "trainer.max_steps=4")))


def test_a_flipped_bit_in_a_shard_quarantines_it_by_name(tiny_checkpoint, tmp_path, caplog):
    folder = write_random_shards_for(tiny_checkpoint, tmp_path / "shards", num_clips=4, num_shards=2)
    shard = folder / resolve_shards(str(folder)).names[0]
    size = shard.stat().st_size
    bad_key = _flip_one_latent_bit(shard)
    assert shard.stat().st_size == size
    text_len = read_mova_config(tiny_checkpoint).text_len

    def keys(**kw):
        cfg = DataConfig(shards=str(folder), batch_size=1, shuffle_buffer=0, **kw)
        loader = build_loader(
            cfg, rank=0, world_size=1, seed=0, text_len=text_len, expected_codec_identity=None
        )
        return [k for _, batch in zip(range(8), loader) for k in batch.keys], loader

    with pytest.raises(ShardReadError, match=rf"shard {re.escape(str(shard))}: .* quarantined"):
        keys(resample=False)
    seen, loader = keys(resample=True)  # the stream goes on without it, its samples counted as rejected
    assert seen and bad_key not in seen and all(k.endswith(("1", "3")) for k in seen), seen
    assert f"{shard}" in caplog.text and loader.stats["rejected"].get("corrupt_shard", 0) >= 2
    seen, _ = keys(
        resample=False, verify_checksums=False
    )  # what the loader did before: trains on the flipped bit
    assert bad_key in seen


# ------------------------------------------------------------------------------------------------- item 4
_PLANT = """
import pickle, sys
class Boom:
    def __reduce__(self):
        return (open, (sys.argv[2], "w"))
with open(sys.argv[1], "wb") as f:
    pickle.dump({"module": Boom()}, f)
"""


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def test_checkpoints_hold_no_pickle_and_load_bit_exactly_under_any_zero_stage(
    tiny_checkpoint, shards, tmp_path
):
    run_dir = tmp_path / "run"
    first = [sys.executable, "train.py", *tiny_overrides(tiny_checkpoint, shards, run_dir, "deepspeed=zero2",
             "trainer.max_steps=3", "trainer.save_every=3", "objective.expert=alternate")]  # fmt: skip
    proc = subprocess.run(first, cwd=PROJECT_ROOT, env=launch_env(), capture_output=True, text=True,
                          timeout=subprocess_timeout(300))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    source = run_layout.latest_checkpoint(run_dir)
    files = sorted(p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file())
    assert all(f.endswith((".safetensors", ".json")) for f in files), files  # safetensors and JSON only
    saved_opt = _tensors(source / "optimizer.safetensors")
    assert {k.split("::")[1] for k in saved_opt} == {"exp_avg", "exp_avg_sq", "step"}
    # a pickle planted where DeepSpeed used to keep its files is never read
    planted, marker = source / "deepspeed" / "state" / "mp_rank_00_model_states.pt", tmp_path / "pickle-ran"
    planted.parent.mkdir(parents=True)
    subprocess.run([sys.executable, "-c", _PLANT, str(planted), str(marker)], check=True)
    for stage in ("zero2", "zero3", "none"):
        out = tmp_path / f"resaved-{stage}"
        proc = subprocess.run(
            [sys.executable, "tests/resave_checkpoint.py", str(tiny_checkpoint), str(shards), str(source), str(out),
             f"deepspeed={stage}"],
            cwd=PROJECT_ROOT, env=launch_env(), capture_output=True, text=True, timeout=subprocess_timeout(300),
        )  # fmt: skip
        assert proc.returncode == 0, (stage, proc.stderr[-3000:])
        again = run_layout.latest_checkpoint(out)
        assert again.name == source.name
        for name in ("optimizer.safetensors", "adapter/adapters.safetensors"):
            before, after = _tensors(source / name), _tensors(again / name)
            assert before.keys() == after.keys(), (stage, name)
            for key in before:  # every adapter weight and Adam moment, bit for bit
                assert torch.equal(before[key], after[key]), (stage, name, key)
    assert not marker.exists()


# ------------------------------------------------------------------------------------- non-finite abort advice
def test_the_non_finite_abort_names_a_checkpoint_from_before_the_bad_weights(
    tiny_checkpoint, shards, tmp_path, monkeypatch
):
    original = FlowMatchingObjective.loss
    calls = {"n": 0}

    def loss(self, pred_video, pred_audio, inputs):  # from step 4 on, as after an exploding update at step 3
        calls["n"] += 1
        total, lv, la = original(self, pred_video, pred_audio, inputs)
        return (total * float("nan") if calls["n"] >= 4 else total), lv, la

    monkeypatch.setattr(FlowMatchingObjective, "loss", loss)
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(
        tiny_checkpoint, shards, run_dir, "trainer.max_steps=20", "trainer.save_every=1", "trainer.keep_last=0",
        "trainer.max_consecutive_skips=3",
    )  # fmt: skip
    with pytest.raises(NonFiniteTrainingError) as err:
        run(compose_train(overrides))
    message = str(err.value)
    assert "steps 4-6" in message and "from step 3 on hold the weights" in message
    assert f"resume from {run_layout.checkpoints_dir(run_dir) / run_layout.checkpoint_name(2)} " in message


# ---------------------------------------------------------------------------------------------- elastic resume
def test_two_ranks_then_one_then_two_continue_the_epoch_and_the_optimizer_exactly(tiny_checkpoint, tmp_path):
    data = write_random_shards_for(tiny_checkpoint, tmp_path / "shards", num_clips=12, num_shards=4)
    run_dir = tmp_path / "run"
    common = (
        "deepspeed=zero2", "data.resample=false", "data.shuffle_buffer=3", "data.batch_size=1",
        "trainer.save_every=2", "trainer.keep_last=0", "tracking.mode=disabled",
    )  # fmt: skip

    def leg(processes: int, max_steps: int) -> None:
        overrides = [*common, f"trainer.max_steps={max_steps}"]
        if processes == 1:
            cmd = [sys.executable, "train.py", *tiny_overrides(tiny_checkpoint, data, run_dir, *overrides)]
        else:
            cmd = launch_cmd(tiny_checkpoint, data, run_dir, *overrides)
        proc = subprocess.run(cmd, cwd=PROJECT_ROOT, env=launch_env(), capture_output=True, text=True,
                              timeout=subprocess_timeout(300))  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-4000:]

    leg(2, 2)  # 2 ranks x batch 1: global batch 2, 4 samples
    two_rank = run_layout.latest_checkpoint(run_dir)
    # the adapter and every Adam moment load bit for bit on 1 rank (load, then save at once)
    out = tmp_path / "resaved"
    proc = subprocess.run(
        [sys.executable, "tests/resave_checkpoint.py", str(tiny_checkpoint), str(data), str(two_rank), str(out),
         *common],
        cwd=PROJECT_ROOT, env=launch_env(), capture_output=True, text=True, timeout=subprocess_timeout(300),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    for name in ("optimizer.safetensors", "adapter/adapters.safetensors"):
        before, after = _tensors(two_rank / name), _tensors(run_layout.latest_checkpoint(out) / name)
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before), name
    leg(1, 4)  # 1 rank: gradient accumulation 2 keeps the global batch of 2
    log = (run_dir / "logs" / "rank0.log").read_text()
    assert (
        "continued by 1 with trainer.gradient_accumulation_steps=2, which keeps the global batch of 2" in log
    )
    assert "remaining samples were shared out anew" in log
    leg(2, 6)  # back to 2 ranks: the last 4 samples of the epoch
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6] and rows[-1]["samples_seen"] == 12
    keys = []
    for rank in (0, 1):
        for line in run_layout.samples_file(run_dir, rank).read_text().splitlines():
            keys += json.loads(line)["keys"]
    assert sorted(keys) == sorted(f"clip{i:05d}" for i in range(12))  # each sample of the epoch exactly once


# ------------------------------------------------------------------------------------------ data_tools: links
def test_symlink_loops_and_dangling_links_are_reported_as_skipped(tmp_path):
    raw = tmp_path / "raw"
    synthesize(raw, num_clips=1, seconds=1.0)
    (raw / "loop.mp4").symlink_to("loop.mp4")  # points at itself
    (raw / "gone.mp4").symlink_to(tmp_path / "deleted.mp4")
    rows = {r["relpath"]: r for r in scan(raw)}
    assert rows["loop.mp4"]["status"] == "skipped" and "symbolic link loop" in rows["loop.mp4"]["reason"]
    assert rows["gone.mp4"]["status"] == "skipped" and "missing file" in rows["gone.mp4"]["reason"]
    assert sum(r["status"] == "ok" for r in rows.values()) == 1
