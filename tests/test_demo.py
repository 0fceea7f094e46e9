"""`make demo`'s driver end to end (fewer steps): every stage runs as the user's command and leaves a playable mp4
with audio, exported adapters and a loss-curve PNG."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mova_train.config import PROJECT_ROOT
from mova_train.media import read_mp4
from tests.train_utils import subprocess_timeout

pytestmark = pytest.mark.distributed


@pytest.mark.timeout(3600)
def test_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "mova_train.cli.demo", "--out", str(out), "--steps", "6", "--clips", "2"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=subprocess_timeout(600),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "=== mova-train demo finished ===" in proc.stdout
    # issue 16: progress shows although stderr is a pipe; the known third-party banners do not
    output = proc.stdout + proc.stderr
    assert "train: done 6/6 step" in output and "encode[0]: done " in output
    assert "contact sheets  : " in proc.stdout and (out / "timings.json").is_file()
    for banner in (
        "Setting accelerator to CPU", "untested optimizer", "Setting OMP_NUM_THREADS",
        "Matplotlib is building the font cache", "deepspeed_shm_comm",
    ):  # fmt: skip
        assert banner not in output, banner

    (mp4,) = sorted((out / "renders").glob("*.mp4"))
    frames, fps, audio, sr = read_mp4(mp4)
    assert frames.shape == (17, 64, 112, 3) and fps == pytest.approx(24.0)
    assert sr == 48000 and len(audio) == 48000 * 17 // 24

    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    steps = [json.loads(line)["step"] for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))
    assert (out / "adapters" / "mova" / "adapters.safetensors").is_file()
    assert {p.name for p in (out / "adapters" / "peft").iterdir()} >= {"audio_dit", "dual_tower_bridge"}
