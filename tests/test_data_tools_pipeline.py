"""End-to-end data_tools tests: prepare -> verify -> the trainer's loader, A/V alignment of the exported clips,
bad inputs in the report, byte-identical reruns, resume after a kill, and a 2-rank encode."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from data_tools.verify import verify

pytest.register_assert_rewrite("tests.fixtures_data")
from tests.fixtures_data import (  # noqa: E402
    AUDIO_OFFSETS_MS,
    BAD_INPUTS,
    FRAMES,
    prepare_args,
    run_data_tools,
    shard_files,
)
from tests.train_utils import subprocess_timeout  # noqa: E402

FPS = 24.0

# the session fixtures (data_input, prepared) live in one plugin module so every test file shares them
pytest_plugins = ["tests.fixtures_data"]


def _kept(plan_rows: list[dict]) -> list[dict]:
    return [r for r in plan_rows if r["status"] == "kept"]


def test_prepare_then_verify_and_trainer_loader_reads_every_sample(prepared):
    kept = _kept(prepared.plan())
    assert len(kept) >= 8  # 4 usable 2-s sources of ~2.8 clips each (minus cuts moved away from sound)
    result = verify(prepared.out, checkpoint=prepared.checkpoint)
    assert result.ok, result.format()
    assert result.num_samples == len(kept)
    proc = run_data_tools("verify", str(prepared.out), "--checkpoint", str(prepared.checkpoint))
    assert "verify: OK" in proc.stdout

    from mova_train.codecs import TEXT_LEN, codec_identity
    from mova_train.data.loader import build_loader

    loader = build_loader(
        {"shards": str(prepared.out), "batch_size": 1, "resample": False, "shuffle_buffer": 0},
        rank=0,
        world_size=1,
        seed=0,
        text_len=TEXT_LEN,
        expected_codec_identity=codec_identity(prepared.checkpoint),
    )
    keys = [key for batch in loader for key in batch.keys]
    assert sorted(keys) == sorted(r["clip_id"] for r in kept)
    stats = loader.stats
    assert stats["rejected_total"] == 0 and stats["accepted"] == len(kept), stats


def test_samples_hold_the_planned_clips(prepared):
    from data_tools.verify import _iter_samples
    from mova_train.data.contract import decode_sample

    plan = {r["clip_id"]: r for r in _kept(prepared.plan())}
    seen = 0
    for shard in sorted(prepared.out.glob("shard-*.tar")):
        for key, members in _iter_samples(shard):
            meta, tensors = decode_sample({"__key__": key, **members})
            row = plan[key]
            assert (meta["start_s"], meta["num_frames"], meta["bucket"]) == (
                row["start_s"],
                FRAMES,
                row["bucket"],
            )
            assert meta["caption"] == row["caption"]
            assert meta["num_audio_samples"] == int(48000 * FRAMES / FPS)
            # the residual offset is the sub-sample rounding of the shift: under one 48 kHz sample
            assert abs(meta["audio_offset_s"]) <= 0.5 / 48000 + 1e-9
            h, w = (int(x) for x in row["bucket"].split("x"))
            assert tuple(tensors["video"].shape) == (16, (FRAMES - 1) // 4 + 1, h // 8, w // 8)
            # text is unpadded: as many rows as the caption's tokens, no all-zero padding rows
            assert tensors["text"].abs().sum(dim=1).min() > 0
            seen += 1
    assert seen == len(plan)


def test_report_names_every_bad_input_and_loses_no_good_clip(prepared):
    report = prepared.report()
    by_source: dict[str, list[dict]] = {}
    for row in report:
        by_source.setdefault(row["source"], []).append(row)
    for name, words in BAD_INPUTS.items():
        rows = by_source.get(name)
        assert rows, f"{name} missing from the report"
        assert all(r["status"] == "skipped" for r in rows)
        assert any(words in r["reason"] for r in rows), (name, rows)
    # the readable, captioned sources with audio all kept clips, the 44.1 kHz stereo one included
    for name in ("synth_000.mp4", "synth_001.mp4", "synth_002.mp4", "hifi_000.mp4"):
        assert any(r["status"] == "kept" for r in by_source[name]), name
    hifi = next(s for s in prepared.sources() if s["relpath"] == "hifi_000.mp4")
    assert (hifi["audio_sample_rate"], hifi["audio_channels"]) == (44100, 2)
    assert any("resampled to 48000 Hz mono" in n for n in hifi["notes"])
    # every skip is printed with its file
    for name in BAD_INPUTS:
        assert name in prepared.stderr
    proc = run_data_tools("report", str(prepared.out))
    assert "notes.mp4" in proc.stdout and "kept" in proc.stdout


def _flashes_and_clicks(frames: np.ndarray, fps: float, audio: np.ndarray, sr: int) -> tuple[list, list]:
    """Flash onsets (s) from frame brightness and click onsets (s) from audio amplitude, measured independently."""
    luma = frames.astype(np.float32).mean(axis=(1, 2, 3))
    flashes = [i / fps for i in range(len(luma)) if luma[i] > 200 and (i == 0 or luma[i - 1] <= 200)]
    loud = np.nonzero(np.abs(audio) > 0.45)[0]  # clicks peak at 0.9; tone + voice stay below 0.3
    # a click is a run of loud samples; a new one starts after 50 ms of quiet
    starts = [int(i) for k, i in enumerate(loud) if k == 0 or i - loud[k - 1] > 0.05 * sr]
    return flashes, [c / sr for c in starts]


def test_exported_clips_put_every_click_within_one_frame_of_its_flash(prepared):
    from mova_train.media import read_mp4

    kept = _kept(prepared.plan())
    errors: dict[str, list[float]] = {}
    for row in kept:
        sidecar = prepared.input_dir / row["relpath"].replace(".mp4", ".events.json")
        events = json.loads(sidecar.read_text())["sync_events_s"]
        frames, fps, audio, sr = read_mp4(prepared.clips_dir / f"{row['clip_id']}.mp4")
        assert frames.shape[0] == FRAMES and fps == FPS and sr == 48000
        flashes, clicks = _flashes_and_clicks(frames, fps, audio, sr)
        # the flashes of the source that fall in this clip, at the frames they belong to
        inside = [e - row["start_s"] for e in events if row["start_s"] - 1e-6 <= e < row["end_s"] - 1e-6]
        assert np.allclose(flashes, inside, atol=1e-6), (row["clip_id"], flashes, inside)
        assert len(clicks) == len(flashes), (row["clip_id"], flashes, clicks)
        errors.setdefault(row["relpath"], []).extend(c - f for f, c in zip(flashes, clicks))
    offsets = {"synth_000.mp4": 0, "synth_001.mp4": 120, "synth_002.mp4": -80, "hifi_000.mp4": 60}
    assert set(offsets.values()) >= set(AUDIO_OFFSETS_MS)
    for name in offsets:
        assert errors.get(name), f"no sync event of {name} landed in a kept clip"
    every = np.abs(np.concatenate([np.array(e) for e in errors.values()]))
    assert every.max() <= 1.0 / FPS, errors  # the bound: one video frame
    assert np.median(every) <= 0.005, errors  # what timestamp-based alignment achieves (AAC, resampling)


def test_alignment_check_detects_an_uncorrected_stream_offset(prepared):
    """The measurement above can fail: reading the +120 ms source without honouring stream start times (frames and
    samples simply counted from 0) misplaces every click by about the offset."""
    from mova_train.media import read_mp4

    frames, fps, audio, sr = read_mp4(prepared.input_dir / "synth_001.mp4")
    flashes, clicks = _flashes_and_clicks(frames, fps, audio, sr)
    assert flashes and len(clicks) == len(flashes)
    lag = np.array(clicks) - np.array(flashes)
    assert np.all(np.abs(lag) > 1.0 / FPS), lag


def test_rerun_into_a_new_folder_gives_byte_identical_shards(prepared, tmp_path):
    out = tmp_path / "again"
    run_data_tools(*prepare_args(prepared.input_dir, prepared.checkpoint, out))
    assert shard_files(out) == shard_files(prepared.out)


def test_killed_run_resumes_to_the_same_shards(prepared, tmp_path):
    out = tmp_path / "resumed"
    args = prepare_args(prepared.input_dir, prepared.checkpoint, out)
    proc = run_data_tools(*args, env={"MOVA_DATA_TOOLS_KILL_AFTER_SAMPLES": "3"}, check=False)
    assert proc.returncode == -9, proc.stderr  # SIGKILL mid-run, like an OOM kill
    journal = [json.loads(x) for x in (out / "_progress" / "rank-000.jsonl").read_text().splitlines()]
    visible = sorted(p.name for p in out.glob("shard-*.tar"))
    # only finished shards are visible, each one listed in the journal; the unfinished one is a .tmp file
    assert visible == sorted(r["name"] for r in journal) and len(visible) >= 1
    assert list(out.glob("shard-*.tar.tmp")) and not (out / "manifest.json").exists()
    done = [c for r in journal for c in r["clip_ids"]]
    assert len(done) < 3

    proc = run_data_tools(*args)
    assert "resuming" in proc.stderr
    assert shard_files(out) == shard_files(prepared.out)
    assert not list(out.glob("*.tmp"))


def test_rerun_on_a_finished_folder_changes_nothing_and_other_options_are_refused(prepared, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(prepared.out, out)
    args = prepare_args(prepared.input_dir, prepared.checkpoint, out)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.tar")}
    run_data_tools(*args)
    assert shard_files(out) == shard_files(prepared.out)
    # no clip encoded twice: not one shard was rewritten
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.tar")} == before
    proc = run_data_tools(*args, "--latent-dtype", "float32", check=False)
    assert proc.returncode == 2
    assert (
        "different run" in proc.stderr and "--latent-dtype" in proc.stderr and "Traceback" not in proc.stderr
    )
    assert shard_files(out) == shard_files(prepared.out)


@pytest.mark.distributed
def test_two_rank_encode_splits_the_plan_deterministically(prepared, tmp_path):
    out = tmp_path / "two_ranks"
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "data_tools",
            "encode",
            "--plan",
            str(prepared.out / "plan.jsonl"),
            "--out",
            str(out),
            "--checkpoint",
            str(prepared.checkpoint),
            "--shard-size-mb",
            "0.06",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=subprocess_timeout(240),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = verify(out)
    assert result.ok, result.format()
    kept = [r["clip_id"] for r in _kept(prepared.plan())]
    journals = [
        [
            c
            for line in (out / "_progress" / f"rank-{r:03d}.jsonl").read_text().splitlines()
            for c in json.loads(line)["clip_ids"]
        ]
        for r in range(2)
    ]
    assert journals == [kept[0::2], kept[1::2]]
    assert {p.name[:9] for p in out.glob("shard-*.tar")} == {"shard-000", "shard-001"}

    from data_tools.verify import _iter_samples

    def samples(folder):
        found = {}
        for shard in folder.glob("shard-*.tar"):
            for key, members in _iter_samples(shard):
                found[key] = members
        return found

    one, two = samples(prepared.out), samples(out)
    assert one.keys() == two.keys()
    from safetensors.torch import load as st_load

    for key in one:
        assert one[key]["json"] == two[key]["json"]  # same decoded, aligned content (content_sha256 inside)
        a, b = st_load(one[key]["latents.safetensors"]), st_load(two[key]["latents.safetensors"])
        for name in a:
            torch.testing.assert_close(a[name].float(), b[name].float(), atol=0.05, rtol=0.02)
