"""Helpers for the trainer and config tests: compose the real Hydra configs, read a run's metrics."""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import subprocess
import sys
import time
from pathlib import Path

from mova_train.config import PROJECT_ROOT, compose_config

CONFIG_DIR = PROJECT_ROOT / "configs"
LOCK_FILE = PROJECT_ROOT / "requirements" / "lock.txt"

# The golden-loss runs use CPU kernels that give the same bits on any x86-64 CPU with AVX2, not the fastest ones
# this CPU has: MKL's conditional numerical reproducibility, and ATen / oneDNN capped at AVX2. Without these the
# same code and packages give ~1e-7 different losses on another CPU model (MKL picks other code paths).
REFERENCE_NUMERICS_ENV = {
    "MKL_CBWR": "COMPATIBLE",
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "OMP_NUM_THREADS": "1",
}


def lock_sha256() -> str:
    return hashlib.sha256(LOCK_FILE.read_bytes()).hexdigest()


def subprocess_timeout(seconds: float) -> int:
    """A subprocess limit that holds on a loaded machine: the base figure (what a quiet 2-core machine needs, with
    room) times 2, and times the load per core beyond that. A limit only catches hangs, so generous is right."""
    load_per_core = os.getloadavg()[0] / (os.cpu_count() or 1)
    return int(seconds * 2 * max(1.0, load_per_core))


def compose_train(overrides: list[str], config_dir: Path = CONFIG_DIR):
    """The composed `train` config (an OmegaConf DictConfig), exactly as train.py would see it."""
    return compose_config(overrides, config_dir=config_dir)


def tiny_overrides(checkpoint: Path, shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        "+experiment=tiny_demo",
        f"model.checkpoint={checkpoint}",
        f"data.shards={shards}",
        f"trainer.run_dir={run_dir}",
        "tracking.mode=disabled",
        "tracking.progress_bar=false",
        *extra,
    ]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def reset_accelerate() -> None:
    """accelerate keeps process-wide state; in-process runs in one pytest process start from scratch."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


# `accelerate launch` of the real entry point, as the distributed and fault tests run it
NUM_STEPS = 6


def launch_cmd(checkpoint: Path, shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
        "train.py", "+experiment=tiny_demo", f"model.checkpoint={checkpoint}", f"data.shards={shards}",
        f"trainer.run_dir={run_dir}", f"trainer.max_steps={NUM_STEPS}", "tracking.progress_bar=false",
        "trainer.keep_last=0", *extra,
    ]  # fmt: skip


def launch_env() -> dict:
    return {**os.environ, **REFERENCE_NUMERICS_ENV, "TOKENIZERS_PARALLELISM": "false", "WANDB_SILENT": "true"}


def launch(cmd: list[str], timeout: int = 400) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        cmd,
        cwd=PROJECT_ROOT,
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=subprocess_timeout(timeout),
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def launch_until_steps(
    cmd: list[str], run_dir: Path, *, steps: int = 2, new_session: bool = False
) -> tuple[subprocess.Popen, int]:
    """Start a 2-rank launch and wait until it logged `steps` optimizer steps; (the launcher, rank 1's pid).
    `new_session`: the launcher leads its own process group (for a Ctrl-C to the whole group)."""
    proc = subprocess.Popen(
        cmd, cwd=PROJECT_ROOT, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=new_session,
    )  # fmt: skip
    metrics, log1 = Path(run_dir) / "metrics.jsonl", Path(run_dir) / "logs" / "rank1.log"
    deadline = time.time() + subprocess_timeout(300)
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= steps and log1.is_file():
            break
        time.sleep(0.02)
    return proc, int(re.search(r"rank 1/2 pid (\d+)", log1.read_text()).group(1))


def wandb_offline_records(path: Path) -> list:
    """The records of a W&B offline run file (`run-*.wandb`; LevelDB log format: 32 KiB blocks of
    crc/length/type chunks), parsed as wandb's own protobuf `Record`s."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, raws, pending = Path(path).read_bytes(), 7, 32768, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            raws.append(pending + chunk)
            pending = b""
        elif kind in (2, 3):
            pending += chunk
    records = []
    for raw in raws:
        record = pb.Record()
        record.ParseFromString(raw)
        records.append(record)
    return records
