"""launch/slurm/train.sbatch under a fake `srun`/`scontrol` on this machine (2 local processes): the rendezvous
comes from the SLURM environment, and USR1 to the batch script (what `--signal=B:USR1@600` sends before the time
limit) leaves a complete checkpoint, requeues the job, and the requeued script resumes from that checkpoint."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mova_train.config import PROJECT_ROOT
from mova_train.training import checkpoint as ckpt_io
from mova_train.training.synthetic import write_random_shards_for
from tests.train_utils import read_metrics, subprocess_timeout

pytestmark = pytest.mark.distributed

FAKE_SRUN = """#!/usr/bin/env bash
# Fake srun: one task on this node. Like the real one, it forwards SIGTERM/SIGINT to the task it runs.
while [[ $# -gt 0 && $1 == --* ]]; do shift; done
export SLURM_NODEID=0 SLURM_PROCID=0 SLURM_LOCALID=0
"$@" &
child=$!
trap 'kill -TERM $child 2>/dev/null' TERM INT
status=0
while kill -0 $child 2>/dev/null; do wait $child; status=$?; done
exit $status
"""

FAKE_SCONTROL = """#!/usr/bin/env bash
# Fake scontrol: `show hostnames` gives this host; `requeue` is recorded in $FAKE_SLURM_LOG.
case "$1 $2" in
  "show hostnames") echo localhost ;;
  requeue*) echo "requeue $2" >> "$FAKE_SLURM_LOG" ;;
  *) echo "fake scontrol: unsupported $*" >&2; exit 1 ;;
esac
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _install(bin_dir: Path, name: str, text: str) -> None:
    path = bin_dir / name
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture(scope="module")
def slurm_env(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm")
    bin_dir = root / "bin"
    bin_dir.mkdir()
    _install(bin_dir, "srun", FAKE_SRUN)
    _install(bin_dir, "scontrol", FAKE_SCONTROL)
    shards = write_random_shards_for(tiny_checkpoint, root / "shards", num_clips=2, num_shards=2)
    env = {
        **os.environ,
        # accelerate and python of this environment first, then the fake SLURM tools
        "PATH": f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242",
        "SLURM_NNODES": "1",
        "SLURM_JOB_NODELIST": "localhost",
        "GPUS_PER_NODE": "2",
        "EXPERIMENT": "tiny_demo",
        "RUN_DIR": str(root / "run"),
        "ACCELERATE_CONFIG": "launch/accelerate/cpu_zero2.yaml",
        "MASTER_PORT": str(_free_port()),
        "FAKE_SLURM_LOG": str(root / "scontrol.log"),
        "OMP_NUM_THREADS": "1",
        "WANDB_SILENT": "true",
    }
    overrides = [
        f"model.checkpoint={tiny_checkpoint}",
        f"data.shards={shards}",
        "trainer.max_steps=200",
        "trainer.save_every=1000",
        "deepspeed=zero2",
        "tracking.mode=disabled",
        "tracking.progress_bar=false",
    ]
    return root, env, overrides


def _sbatch(env, overrides, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        ["bash", "launch/slurm/train.sbatch", *overrides],
        cwd=PROJECT_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


def test_usr1_checkpoints_requeues_and_the_requeued_job_resumes(slurm_env):
    root, env, overrides = slurm_env
    run_dir = root / "run"
    job = _sbatch(env, overrides)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and job.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    assert job.poll() is None, job.communicate()[0][-3000:]
    job.send_signal(signal.SIGUSR1)  # what SLURM sends the batch shell 10 minutes before the limit
    out, _ = job.communicate(timeout=subprocess_timeout(300))
    assert job.returncode == 0, out[-4000:]
    assert f"rendezvous localhost:{env['MASTER_PORT']}" in out
    assert "1 node(s) x 2 process(es)" in out
    assert "received USR1" in out

    saved = [step for step, _ in ckpt_io.list_checkpoints(run_dir)]
    assert saved, f"no complete checkpoint after USR1:\n{out[-4000:]}"
    stopped_at = saved[-1]
    assert 2 <= stopped_at < 200 and stopped_at == len(read_metrics(run_dir))
    assert (root / "scontrol.log").read_text().split() == ["requeue", "4242"]
    assert not list((run_dir / "checkpoints").glob(".tmp-*")), "a half-written checkpoint was left behind"

    # The requeued job runs the same script again; it resumes from the saved step (two more steps here).
    again = _sbatch(env, [*overrides, "trainer.max_steps_per_run=2"])
    out2, _ = again.communicate(timeout=subprocess_timeout(300))
    assert again.returncode == 0, out2[-4000:]
    steps = [m["step"] for m in read_metrics(run_dir)]
    assert steps == list(range(1, stopped_at + 3)), steps
