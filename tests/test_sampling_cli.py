"""`python -m mova_train.cli.sample` on the tiny checkpoint: mp4 frames/size/audio length, identical files for one
seed, the contact sheet, and clear one-line errors for bad input; and `python -m mova_train.bench sampling`."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from mova_train.bench import main as bench_main
from mova_train.cli.sample import main
from mova_train.media import read_mp4

FRAMES, HEIGHT, WIDTH = 17, 32, 64


@pytest.fixture(scope="module")
def reference_png(tmp_path_factory):
    path = tmp_path_factory.mktemp("ref") / "ref.png"
    y, x = np.mgrid[0:48, 0:80]
    array = np.stack([x * 3, y * 5, (x + y) * 2], axis=-1).clip(0, 255).astype(np.uint8)
    Image.fromarray(array).save(path)
    return path


def _args(checkpoint, out, image, *extra):
    return [
        "--checkpoint", str(checkpoint), "--prompt", "a drum hit in a dark room", "--image", str(image),
        "--frames", str(FRAMES), "--size", f"{HEIGHT}x{WIDTH}", "--steps", "3", "--seed", "5",
        "--out", str(out), "--quiet", *extra,
    ]  # fmt: skip


def test_cli_writes_a_decodable_mp4_with_the_clip_duration_of_audio(tiny_checkpoint, tmp_path, reference_png):
    import decord

    assert main(_args(tiny_checkpoint, tmp_path / "a", reference_png)) == 0
    summary = json.loads((tmp_path / "a" / "renders.json").read_text())
    (record,) = summary["renders"]
    reader = decord.VideoReader(record["mp4"], ctx=decord.cpu(0))
    assert len(reader) == FRAMES
    assert reader[0].shape == (HEIGHT, WIDTH, 3)
    assert reader.get_avg_fps() == pytest.approx(24.0)
    del reader
    _, _, audio, sample_rate = read_mp4(record["mp4"])
    assert sample_rate == 48000
    assert audio.shape[0] == math.floor(48000 * FRAMES / 24)  # exactly the clip's duration
    sheet = Image.open(record["contact_sheet"])
    assert sheet.format == "PNG" and sheet.size[0] > 600
    assert record["num_audio_samples"] == audio.shape[0] and record["seed"] == 5
    assert "av_offset_s" in record and 0.0 <= record["av_confidence"] <= 1.0


def test_same_seed_gives_identical_files_and_another_seed_does_not(tiny_checkpoint, tmp_path, reference_png):
    assert main(_args(tiny_checkpoint, tmp_path / "a", reference_png)) == 0
    assert main(_args(tiny_checkpoint, tmp_path / "b", reference_png)) == 0
    files_a = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files_a == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in files_a:
        if name.endswith((".mp4", ".png")):
            assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    args = _args(tiny_checkpoint, tmp_path / "c", reference_png)
    args[args.index("--seed") + 1] = "6"
    assert main(args) == 0
    (mp4_a,) = (tmp_path / "a").glob("*.mp4")
    (mp4_c,) = (tmp_path / "c").glob("*.mp4")
    assert mp4_a.read_bytes() != mp4_c.read_bytes()


def _expect_user_error(capsys, argv, match):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert match in err, err


def test_bad_input_exits_2_with_a_one_line_message(tiny_checkpoint, tmp_path, reference_png, capsys):
    out = tmp_path / "out"
    no_image = _args(tiny_checkpoint, out, reference_png)
    del no_image[no_image.index("--image") : no_image.index("--image") + 2]
    _expect_user_error(capsys, no_image, "--image")
    _expect_user_error(capsys, _args(tiny_checkpoint, out, tmp_path / "missing.png"), "not found")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"definitely not a png")
    _expect_user_error(capsys, _args(tiny_checkpoint, out, broken), "cannot read reference image")
    _expect_user_error(capsys, _args(tiny_checkpoint, out, reference_png, "--frames", "16"), "1 mod 4")
    _expect_user_error(
        capsys, _args(tiny_checkpoint, out, reference_png, "--size", "40x64"), "multiple of 16"
    )
    _expect_user_error(
        capsys, _args(tiny_checkpoint, out, reference_png, "--lora", str(tmp_path / "nope")), "nope"
    )
    assert not out.exists()


def test_grey_reference_is_an_explicit_choice(tiny_checkpoint, tmp_path, reference_png):
    args = _args(tiny_checkpoint, tmp_path / "g", reference_png, "--grey-reference", "--cfg", "1")
    del args[args.index("--image") : args.index("--image") + 2]
    assert main(args) == 0
    (record,) = json.loads((tmp_path / "g" / "renders.json").read_text())["renders"]
    assert record["image"] == "grey"


def test_sampling_bench_runs_both_modes_once(tiny_checkpoint, capsys):
    """Each mode runs in its own `python -m mova_train.bench sampling --worker` process; figures only."""
    size = ["--frames", "5", "--size", "16x32", "--steps", "1"]
    assert bench_main(["sampling", "--checkpoint", str(tiny_checkpoint), *size]) == 0
    out = capsys.readouterr().out
    assert "resident" in out and "expert loads 1" in out  # the offload mode loads one expert at a time
    assert "with --offload-experts" in out
