"""`data_tools prepare` for a user's own clips: a plan that keeps nothing explains why and which --frames fits; a
run that would mix options or input in a folder with shards is refused before anything is written; planning
leftovers are counted apart from skipped files; --trigger-word reaches every encoded caption."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from data_tools.__main__ import main
from data_tools.plan import plan
from data_tools.prepare import check_trigger_word, explain_plan, with_trigger_word
from data_tools.scan import scan

pytest.register_assert_rewrite("tests.fixtures_data")
from tests.fixtures_data import BAD_INPUTS, BUCKETS, FRAMES, prepare_args  # noqa: E402

pytest_plugins = ["tests.fixtures_data"]

FPS = 24.0
# the user's clips: shorter than the frame count asked first (33 frames = 1.375 s)
SOURCE_SECONDS = (0.75, 1.0, 1.25)
TOO_LONG = 33


def _write_clip(path: Path, seconds: float, seed: int, *, audio: bool = True) -> None:
    from data_tools.synth import render_frames, write_media

    n = int(round(seconds * FPS))
    t = np.arange(int(seconds * 48000)) / 48000
    tone = (0.2 * np.sin(2 * np.pi * 330 * t)).astype(np.float32) if audio else None
    write_media(path, render_frames(np.random.default_rng(seed), n, 48, 48, []), FPS, tone)
    path.with_suffix(".txt").write_text(f"a shape bounces, take {seed}", encoding="utf-8")


@pytest.fixture
def short_clips(tmp_path) -> Path:
    root = tmp_path / "videos"
    root.mkdir()
    for i, seconds in enumerate(SOURCE_SECONDS):
        _write_clip(root / f"clip{i}.mp4", seconds, i)
    _write_clip(root / "mute.mp4", 1.0, 9, audio=False)
    return root


def _tree(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path (a new or removed file shows too)."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _prepare(capsys, *args: str) -> tuple[int, str]:
    code = main(["prepare", *args])
    return code, capsys.readouterr().err


def _keeps_every_file(sources: list[dict], num_frames: int) -> bool:
    rows = plan(sources, num_frames=num_frames, fps=FPS, buckets=BUCKETS)
    usable = {s["relpath"] for s in sources if s["status"] == "ok"}
    return {r["relpath"] for r in rows if r["status"] == "kept"} == usable


def test_a_plan_that_keeps_nothing_explains_why_and_the_hinted_frames_fit(
    short_clips, tiny_checkpoint, tmp_path, capsys
):
    out = tmp_path / "shards"
    common = [str(short_clips), "--checkpoint", str(tiny_checkpoint), "--out", str(out), "--buckets", BUCKETS]
    code, err = _prepare(capsys, *common, "--frames", str(TOO_LONG))
    assert code == 2, err
    last = err.strip().splitlines()[-1]
    assert (
        last.startswith("data_tools prepare: error: the clip plan keeps no clip") and "Traceback" not in err
    )
    assert f"python -m data_tools report {out}" in last
    hinted = int(re.search(r"try --frames (\d+)", last).group(1))
    # the reasons by kind, with example files, before the error
    assert "files skipped, shorter than one clip: 3 (e.g. clip0.mp4, clip1.mp4, clip2.mp4)" in err
    assert "files skipped, no audio track: 1 (e.g. mute.mp4)" in err
    assert "4k + 1" in err

    # the hint is the planner's own answer: the largest 4k + 1 that keeps a clip of every usable file
    sources = scan(short_clips)
    assert (hinted - 1) % 4 == 0 and hinted < TOO_LONG
    assert _keeps_every_file(sources, hinted) and not _keeps_every_file(sources, hinted + 4)
    half = int(re.search(r"--frames (\d+) \([\d.]+ s\) from at least half", err).group(1))
    kept_by_half = {
        r["relpath"]
        for r in plan(sources, num_frames=half, fps=FPS, buckets=BUCKETS)
        if r["status"] == "kept"
    }
    assert hinted < half and len(kept_by_half) >= 2

    # a plan that keeps some clips but under half the usable footage is explained too (and goes on)
    partial = hinted + 8
    rows = plan(sources, num_frames=partial, fps=FPS, buckets=BUCKETS)
    kept_s = sum(r["end_s"] - r["start_s"] for r in rows if r["status"] == "kept")
    assert 0 < kept_s < 0.5 * sum(s["duration_s"] for s in sources if s["status"] == "ok")
    text = explain_plan(sources, rows, out, num_frames=partial, fps=FPS)
    short = sum(
        1 for r in rows if "shorter than one clip (" in r["reason"] and r["reason"].startswith("source has")
    )
    assert f"files skipped, shorter than one clip: {short} (e.g. clip0.mp4" in text
    assert f"--frames {hinted} " in text and f"python -m data_tools report {out}" in text
    assert (
        explain_plan(
            sources,
            plan(sources, num_frames=hinted, fps=FPS, buckets=BUCKETS),
            out,
            num_frames=hinted,
            fps=FPS,
        )
        is None
    )

    # the report command it names works on the tables it left
    assert main(["report", str(out)]) == 0
    assert capsys.readouterr().out.splitlines()[0] == (
        "kept 0 clips from 0 files; skipped 4 files (shorter than one clip: 3, no audio track: 1)"
    )

    # the same command with the hinted --frames into the same folder (only tables there: not refused)
    code, err = _prepare(capsys, *common, "--frames", str(hinted), "--trigger-word", "sks")
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["options"]["trigger_word"] == "sks" and manifest["num_frames"] == hinted
    from data_tools.verify import _iter_samples
    from mova_train.data.contract import decode_sample

    captions = {}
    for shard in sorted(out.glob("shard-*.tar")):
        for key, members in _iter_samples(shard):
            meta, _ = decode_sample({"__key__": key, **members})
            captions[meta["source"]] = meta["caption"]
    assert sorted(captions) == ["clip0.mp4", "clip1.mp4", "clip2.mp4"]
    for name, caption in captions.items():
        assert caption == f"sks, a shape bounces, take {name[4]}"

    # another trigger word on these shards: refused, naming it, and nothing written
    before = _tree(out)
    code, err = _prepare(capsys, *common, "--frames", str(hinted), "--trigger-word", "other")
    assert code == 2
    assert "--trigger-word: 'sks' (existing) vs 'other' (now)" in err and "--frames:" not in err
    assert _tree(out) == before

    # new input with the same options: refused after planning, naming the new file, nothing written
    _write_clip(short_clips / "late.mp4", 1.0, 5)
    code, err = _prepare(capsys, *common, "--frames", str(hinted), "--trigger-word", "sks")
    assert code == 2
    assert "the input changed" in err and "late.mp4" in err and "--overwrite" in err
    assert _tree(out) == before


def test_a_refused_prepare_names_the_changed_options_and_leaves_the_folder_byte_identical(
    prepared, tmp_path, capsys
):
    out = tmp_path / "copy"
    shutil.copytree(prepared.out, out)
    before = _tree(out)
    assert any(name.startswith("_progress/") for name in before)
    other = FRAMES + 4
    code = main(
        prepare_args(prepared.input_dir, prepared.checkpoint, out, "--frames", str(other), "--skip-silent")
    )
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"--frames: {FRAMES} (existing) vs {other} (now)" in err
    assert "--skip-silent: False (existing) vs True (now)" in err
    assert "new --out folder" in err and "--overwrite" in err
    assert _tree(out) == before


def test_the_report_counts_leftovers_apart_from_skipped_files(prepared):
    plan_rows = prepared.plan()
    leftovers = [
        r
        for r in plan_rows
        if r["reason"].startswith(("tail of", "left out so that clips do not cut inside sound"))
    ]
    kept = [r for r in plan_rows if r["status"] == "kept"]
    assert leftovers, "the fixture's 2-s sources leave tails"
    head = (prepared.out / "report.txt").read_text(encoding="utf-8").splitlines()[0]
    kept_files = len({r["relpath"] for r in kept})
    assert head.startswith(f"kept {len(kept)} clips from {kept_files} files; {len(leftovers)} leftovers (")
    assert f"; skipped {len(BAD_INPUTS)} files (" in head
    # the same line ends the CLI run and heads `report`; each leftover is listed as one, not as a skip
    assert head in prepared.stderr
    lines = (prepared.out / "report.txt").read_text(encoding="utf-8").splitlines()
    assert sum(1 for x in lines if x.startswith("  leftover (plan) ")) == len(leftovers)
    assert sum(1 for x in lines if x.startswith("  skipped ")) == len(BAD_INPUTS)


def test_trigger_word_format():
    assert with_trigger_word("a dog runs", "sks") == "sks, a dog runs"
    assert with_trigger_word("sks, a dog runs", "sks") == "sks, a dog runs"
    assert with_trigger_word("sks dog runs", "sks") == "sks dog runs"
    assert with_trigger_word("sksdog runs", "sks") == "sks, sksdog runs"
    assert with_trigger_word("a dog runs", None) == "a dog runs"
    for bad in ("", " sks", "two\nlines"):
        with pytest.raises(ValueError, match="--trigger-word"):
            check_trigger_word(bad)


def test_options_are_compared_by_their_effect(tmp_path):
    from data_tools.__main__ import build_parser
    from data_tools.common import DataToolsError
    from data_tools.prepare import PREPARE_NAME, check_same_options, prepare_options

    parser = build_parser("prepare")

    def options(*extra: str) -> dict:
        args = parser.parse_args(["prepare", "in", "--checkpoint", "ckpt", "--out", "out", *extra])
        return prepare_options(args, world_size=1)

    out = tmp_path / "out"
    out.mkdir()
    (out / PREPARE_NAME).write_text(json.dumps({"options": options("--frames", "17")}), encoding="utf-8")
    check_same_options(
        out, options("--frames", "21")
    )  # only tables in the folder: planned again, not refused
    (out / "_progress").mkdir()
    # the default spelled out is the same run
    check_same_options(out, options("--frames", "17", "--stride", "17", "--min-frames", "17"))
    with pytest.raises(DataToolsError) as caught:
        check_same_options(out, options("--frames", "21", "--stride", "17"))
    message = str(caught.value)
    # --stride 17 is what the default stride was: only --frames changed
    assert "--frames: 17 (existing) vs 21 (now)" in message and "--stride" not in message
    (out / PREPARE_NAME).write_text(json.dumps({"options": options("--buckets", "32x64")}), encoding="utf-8")
    with pytest.raises(DataToolsError, match=r"--buckets: '32x64' \(existing\) vs '64x32' \(now\)"):
        check_same_options(out, options("--buckets", "64x32"))
