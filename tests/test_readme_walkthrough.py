"""The README's "Your own videos on the tiny model" commands, run as written on real mp4 files (issue #16): each
succeeds, the long ones show progress off a terminal, and each leaves what the next one needs."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from tests.train_utils import subprocess_timeout

ROOT = Path(__file__).resolve().parents[1]
MARKER = "<!-- walkthrough: tiny"


def readme_commands() -> list[str]:
    """The commands of the fenced block after the walkthrough marker, line continuations joined."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index(MARKER)
    block = re.search(r"```bash\n(.*?)```", text[start:], re.S)
    assert block is not None, "no bash block after the walkthrough marker"
    joined = block.group(1).replace("\\\n", " ")
    return [" ".join(line.split()) for line in joined.splitlines() if line.strip()]


def test_the_readme_walkthrough_runs_as_written(tmp_path):
    commands = readme_commands()
    assert [c.split()[2] if c.startswith("python -m") else c.split()[1] for c in commands] == [
        "mova_train.cli.make_tiny",
        "data_tools",
        "data_tools",
        "train.py",
        "mova_train.cli.export",
        "mova_train.cli.sample",
    ]
    # "your own videos": real H.264/AAC mp4 files with captions, made by the bundled generator
    subprocess.run(
        [
            sys.executable,
            "-m",
            "data_tools",
            "synth",
            str(tmp_path / "my_videos"),
            "--clips",
            "2",
            "--seconds",
            "2",
        ],
        check=True,
        cwd=ROOT,
        capture_output=True,
        timeout=subprocess_timeout(300),
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT), MOVA_PROGRESS_EVERY_S="0", WANDB_MODE="offline")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    outputs = []
    for command in commands:
        argv = shlex.split(command)
        argv[0] = sys.executable
        if argv[1] == "train.py":
            argv[1] = str(ROOT / "train.py")
        done = subprocess.run(
            argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=subprocess_timeout(900)
        )
        assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
        outputs.append(done.stdout + done.stderr)
    prepare, train = outputs[1], outputs[3]
    # progress off a terminal: scan/encode and the training steps print their done/total lines
    assert re.search(r"encode\b.*\d+/\d+", prepare), prepare[-2000:]
    assert re.search(r"\b4/4\b", train), train[-2000:]
    assert (tmp_path / "data/tiny_shards/manifest.json").is_file()
    assert sorted(p.name for p in (tmp_path / "runs/tiny/checkpoints").iterdir())[-1] == "step-00000004"
    assert any((tmp_path / "runs/tiny/tensorboard").rglob("events.out.tfevents.*"))
    assert (tmp_path / "exports/tiny/adapters.safetensors").is_file()
    assert list((tmp_path / "renders/tiny").glob("*.mp4")) and list((tmp_path / "renders/tiny").glob("*.png"))
