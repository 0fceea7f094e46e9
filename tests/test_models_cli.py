"""Command-line tools of the model area: cli.make_tiny, cli.inspect, and the bench dispatcher (run once, tiny, no timings)."""

import json
import math
import shutil
import subprocess
import sys

import pytest

from mova_train import bench
from mova_train.cli import inspect, make_tiny
from mova_train.models import COMPONENTS, build_mova


def test_make_tiny_refuses_a_non_empty_folder(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    assert make_tiny.main([str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "not an empty folder" in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp folder left behind


def test_make_tiny_codecs_only_writes_the_codec_folders(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")  # an existing folder is fine here; its other files stay
    assert make_tiny.main([str(tmp_path / "out"), "--codecs-only", "--seed", "1"]) == 0
    assert "wrote tiny codecs" in capsys.readouterr().out
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["audio_vae", "keep.txt", "text_encoder", "tokenizer", "video_vae"]


def test_make_tiny_help_runs_as_a_module():
    out = subprocess.run(
        [sys.executable, "-m", "mova_train.cli.make_tiny", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "--seed" in out and "OUT_DIR" in out.upper()


def test_inspect_config_json_lists_every_component(capsys):
    assert inspect.main(["--config", "tiny", "--json"]) == 0
    shapes = json.loads(capsys.readouterr().out)
    model = build_mova("tiny")
    for c in COMPONENTS:
        assert shapes[c] == {k: list(v.shape) for k, v in getattr(model, c).state_dict().items()}
    assert {"text_encoder", "video_vae", "audio_vae"} <= set(shapes)


def test_inspect_checkpoint_matches_its_config(tiny_checkpoint, capsys):
    """Shapes read from the safetensors headers of the tiny checkpoint equal the tiny config built on meta."""
    assert inspect.main(["--checkpoint", str(tiny_checkpoint), "--json"]) == 0
    from_files = json.loads(capsys.readouterr().out)
    assert inspect.main(["--config", "tiny", "--json"]) == 0
    from_config = json.loads(capsys.readouterr().out)
    for c in (*COMPONENTS, "video_vae", "audio_vae"):
        assert from_files[c] == from_config[c], c
    assert inspect.main(["--checkpoint", str(tiny_checkpoint)]) == 0
    text = capsys.readouterr().out
    n_expert = sum(math.prod(shape) for shape in from_files["video_dit"].values())
    assert f"{n_expert:,}" in text and "active per step" in text


def test_inspect_counts_released_config(capsys):
    assert inspect.main(["--config", "mova_720p"]) == 0
    text = capsys.readouterr().out
    assert "32,656,733,440" in text and "18,367,832,256" in text and "14,288,901,184" in text
    assert "2,659,737,600" in text and "1,419,193,472" in text


def test_inspect_bad_checkpoint_exits_2(tmp_path, capsys):
    assert inspect.main(["--checkpoint", str(tmp_path / "nope")]) == 2
    assert "not found" in capsys.readouterr().err


def test_bench_model_runs_once_on_tiny(capsys):
    assert bench.main(["model", "--steps", "1", "--warmup", "0", "--cpu-only"]) == 0
    out = capsys.readouterr().out
    assert "[tiny/cpu] forward+backward" in out and "tokens/s" in out and "peak process RSS" in out


@pytest.mark.parametrize("argv", [[], ["nonsense"]])
def test_bench_dispatcher_user_errors(argv, capsys):
    assert bench.main(argv) == 2
    assert "error" in capsys.readouterr().err


def test_inspect_checkpoint_lists_shapes_even_when_a_config_is_bad(tiny_checkpoint, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    cfg = json.loads((ckpt / "audio_dit" / "config.json").read_text())
    cfg["unknown_knob"] = 1
    (ckpt / "audio_dit" / "config.json").write_text(json.dumps(cfg))
    assert inspect.main(["--checkpoint", str(ckpt)]) == 0
    out = capsys.readouterr().out
    assert "audio_dit" in out and "note:" in out and "unknown_knob" in out
