"""data_tools stage tests: CLI errors, captions, buckets and cropping, variable frame rate, the clip planner,
deterministic atomic shard writing, the progress journal, verify catching damage, synth determinism, bench."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from data_tools.__main__ import main
from data_tools.common import Bucket, DataToolsError, choose_bucket, parse_buckets

pytest.register_assert_rewrite("tests.fixtures_data")
from tests.fixtures_data import (  # noqa: E402
    BUCKETS,
    run_data_tools,
)

# the session fixtures (data_input, prepared) live in one plugin module so every test file shares them
pytest_plugins = ["tests.fixtures_data"]


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # one line, no traceback
    return err[0]


def test_cli_rejects_bad_frames_and_buckets_with_one_line(tmp_path, capsys):
    sources = tmp_path / "sources.jsonl"
    sources.write_text("")
    assert (
        main(["plan", "--sources", str(sources), "--out", str(tmp_path / "p.jsonl"), "--frames", "16"]) == 2
    )
    assert "4k + 1" in _error_line(capsys)
    assert (
        main(["plan", "--sources", str(sources), "--out", str(tmp_path / "p.jsonl"), "--buckets", "360x640"])
        == 2
    )
    assert "multiples of 16" in _error_line(capsys)
    assert (
        main(["plan", "--sources", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "p.jsonl")]) == 2
    )
    assert "missing.jsonl" in _error_line(capsys)
    with pytest.raises(SystemExit) as e:
        main(["prepare", "--help"])
    assert e.value.code == 0
    assert "--export-clips" in capsys.readouterr().out


def test_unwritable_output_fails_before_any_work(data_input, tiny_checkpoint, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    out = blocker / "shards"
    code = main(
        [
            "prepare",
            str(data_input),
            "--checkpoint",
            str(tiny_checkpoint),
            "--out",
            str(out),
            "--frames",
            "17",
        ]
    )
    assert code == 2
    line = _error_line(capsys)
    assert str(out) in line and "not writable" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_bucket_choice_and_parsing():
    buckets = parse_buckets("352x640,640x352,480x480")
    assert choose_bucket(1920, 1080, buckets) == Bucket(352, 640)
    assert choose_bucket(1080, 1920, buckets) == Bucket(640, 352)
    assert choose_bucket(1000, 1000, buckets) == Bucket(480, 480)
    assert choose_bucket(1200, 1000, buckets) == Bucket(
        480, 480
    )  # 1.2 is closer to 1 than to 1.82 in log ratio
    with pytest.raises(DataToolsError, match="listed twice"):
        parse_buckets("64x64,64x64")


def test_resize_cover_crops_the_centre():
    from data_tools.align import resize_cover

    frame = np.zeros((1, 128, 224, 3), np.uint8)
    frame[..., 1] = 200  # green where the crop keeps
    # 128x224 -> cover 64x64 scales by 1/2 to 64x112 and keeps source columns 48..175
    frame[:, :, :48] = (255, 0, 0)
    frame[:, :, 176:] = (0, 0, 255)
    out = resize_cover(frame, 64, 64)
    assert out.shape == (1, 64, 64, 3)
    inner = out[:, :, 1:-1].astype(int)
    assert np.abs(inner - np.array([0, 200, 0])).max() <= 2


def test_caption_sources_and_bad_caption_table(tmp_path):
    from data_tools.scan import find_caption, load_caption_tables

    root = tmp_path / "in"
    root.mkdir()
    (root / "a.txt").write_text("  sidecar   caption \n", encoding="utf-8")
    (root / "b.json").write_text(json.dumps({"caption": "json caption"}), encoding="utf-8")
    (root / "captions.csv").write_text('file,caption\nc.mp4,"table, caption"\n', encoding="utf-8")
    tables = load_caption_tables(root, [])
    assert find_caption(root / "a.mp4", root, tables) == ("sidecar caption", "a.txt")
    assert find_caption(root / "b.mp4", root, tables) == ("json caption", "b.json")
    assert find_caption(root / "c.mp4", root, tables) == ("table, caption", "captions.csv")
    (root / "captions.csv").write_bytes('file,caption\nd.mp4,"café"\n'.encode("latin-1"))
    with pytest.raises(DataToolsError, match=r"captions\.csv is not UTF-8"):
        load_caption_tables(root, [])
    (root / "captions.csv").write_text("video_name,words\nd.mp4,x\n", encoding="utf-8")
    with pytest.raises(DataToolsError, match="needs one of"):
        load_caption_tables(root, [])


def test_variable_frame_rate_is_skipped_or_sampled_by_timestamp(tmp_path):
    from data_tools.align import load_clip
    from data_tools.plan import plan
    from data_tools.scan import scan
    from data_tools.synth import write_media

    root = tmp_path / "vfr"
    root.mkdir()
    levels = 16 + 4 * np.arange(
        48
    )  # frame j is a flat grey of level 16 + 4j: its index is readable after decoding
    frames = np.repeat(levels.astype(np.uint8)[:, None, None, None], 64 * 64 * 3).reshape(48, 64, 64, 3)
    times = np.cumsum([0.0] + [0.03 if i % 2 else 0.055 for i in range(47)])
    tone = (0.2 * np.sin(2 * np.pi * 300 * np.arange(int(2.3 * 48000)) / 48000)).astype(np.float32)
    write_media(root / "v.mp4", frames, 24.0, tone, frame_times_s=times)
    (root / "v.txt").write_text("grey ramp", encoding="utf-8")

    (row,) = scan(root)
    assert row["status"] == "skipped" and "variable frame rate" in row["reason"] and row["vfr"]
    (row,) = scan(root, allow_vfr=True)
    assert row["status"] == "ok"
    clips = [
        r
        for r in plan([row], num_frames=17, fps=24.0, buckets="64x64", max_shift_s=0)
        if r["status"] == "kept"
    ]
    assert clips
    for clip_row in clips:
        clip = load_clip(clip_row)
        got = np.round((clip.frames.reshape(17, -1).mean(axis=1) - 16) / 4).astype(int)
        wanted_t = clip_row["start_s"] + np.arange(17) / 24.0
        # the frame on screen at each wanted time: the last one that started at or before it
        want = np.searchsorted(times, wanted_t + 1e-6, side="right") - 1
        assert np.array_equal(got, want), (got, want)


def test_plan_moves_cuts_out_of_speech_and_clicks(tmp_path):
    from data_tools.plan import plan
    from data_tools.scan import scan
    from data_tools.synth import synthesize

    root = tmp_path / "speech"
    synthesize(root, num_clips=3, seconds=4.0, seed=11)
    sources = scan(root)

    def cuts_in_sound(rows):
        count = 0
        for r in rows:
            if r["status"] != "kept":
                continue
            side = json.loads((root / r["relpath"].replace(".mp4", ".events.json")).read_text())
            for t in (r["start_s"], r["end_s"]):
                in_speech = any(a + 0.03 < t < b - 0.03 for a, b in side["speech_spans_s"])
                on_click = any(abs(t - e) < 0.01 for e in side["sync_events_s"])
                count += in_speech or on_click
        return count

    fixed = plan(sources, num_frames=17, fps=24.0, buckets=BUCKETS, max_shift_s=0.0)
    moved = plan(sources, num_frames=17, fps=24.0, buckets=BUCKETS, max_shift_s=0.3)
    assert cuts_in_sound(fixed) > 0  # the fixed grid does cut through words here
    assert cuts_in_sound(moved) == 0
    kept = [r for r in moved if r["status"] == "kept"]
    for a, b in zip(kept, kept[1:]):
        assert a["source_id"] != b["source_id"] or b["start_s"] >= a["end_s"] - 1e-6  # no overlap
    gaps = [r for r in moved if r["status"] == "rejected" and "cut inside sound" in r["reason"]]
    assert gaps  # what was left out is listed with its reason


def test_plan_skips_silent_and_frozen_clips_and_keeps_tails_on_request(tmp_path):
    from data_tools.plan import plan
    from data_tools.scan import scan
    from data_tools.synth import synthesize, write_media

    root = tmp_path / "still"
    synthesize(root, num_clips=1, seconds=2.0, seed=5)
    still = np.full((48, 64, 64, 3), 90, np.uint8)
    write_media(root / "still.mp4", still, 24.0, np.zeros(96000, np.float32))
    (root / "still.txt").write_text("nothing happens", encoding="utf-8")
    sources = scan(root)
    rows = plan(sources, num_frames=17, fps=24.0, buckets=BUCKETS, skip_silent=True, skip_frozen=True)
    still_rows = [
        r for r in rows if r["relpath"] == "still.mp4" and "start_s" in r and r["clip_id"][-4:].isdigit()
    ]
    assert still_rows and all(
        r["status"] == "rejected" and r["reason"].startswith("silent") for r in still_rows
    )
    rows = plan(sources, num_frames=17, fps=24.0, buckets=BUCKETS, skip_frozen=True)
    still_rows = [r for r in rows if r["relpath"] == "still.mp4" and r["clip_id"][-4:].isdigit()]
    assert still_rows and all(r["reason"].startswith("frozen picture") for r in still_rows)
    moving = [r for r in rows if r["relpath"] == "synth_000.mp4" and r["clip_id"][-4:].isdigit()]
    assert moving and all(r["status"] == "kept" for r in moving)
    # 2 s = 48 frames: two 17-frame clips and a 14-frame tail; --min-frames 9 keeps the tail as an overlapping clip
    no_tail = [
        r
        for r in plan(sources[1:], num_frames=17, fps=24.0, buckets=BUCKETS, max_shift_s=0)
        if r["status"] == "kept"
    ]
    tail = [
        r
        for r in plan(sources[1:], num_frames=17, fps=24.0, buckets=BUCKETS, max_shift_s=0, min_frames=9)
        if r["status"] == "kept"
    ]
    assert len(tail) == len(no_tail) + 1
    assert tail[-1]["end_s"] == pytest.approx(2.0, abs=1e-6)


def _random_sample(key: str, seed: int) -> tuple[dict, dict]:
    from mova_train.data.contract import SCHEMA_VERSION

    g = torch.Generator().manual_seed(seed)
    meta = {
        "clip_id": key,
        "source": "x.mp4",
        "start_s": 0.0,
        "end_s": 0.708333,
        "fps": 24.0,
        "num_frames": 17,
        "height": 32,
        "width": 64,
        "bucket": "32x64",
        "audio_sample_rate": 48000,
        "num_audio_samples": 34000,
        "audio_offset_s": 0.0,
        "caption": "c",
        "content_sha256": "0" * 64,
        "codec_identity": "id",
        "data_tools_version": "0.1.0",
        "schema_version": SCHEMA_VERSION,
    }
    tensors = {
        "video": torch.randn(16, 5, 4, 8, generator=g),
        "first_frame": torch.randn(16, 5, 4, 8, generator=g),
        "audio": torch.randn(128, 36, generator=g),
        "text": torch.randn(7, 32, generator=g),
    }
    return meta, tensors


def test_shard_writer_is_deterministic_atomic_and_journaled(tmp_path):
    from data_tools.shards import ShardWriter, journal_path, read_journal
    from mova_train.data.contract import decode_sample, encode_sample

    def write(folder: Path, stop_before_close: bool = False) -> ShardWriter:
        writer = ShardWriter(folder, 0, start_index=0, target_bytes=60_000)
        for i in range(5):
            meta, tensors = _random_sample(f"clip-{i}", i)
            writer.write(encode_sample(meta, tensors), {"bucket": "32x64"})
            if stop_before_close and i == 2:
                return writer
        writer.close()
        return writer

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    partial = write(a, stop_before_close=True)
    # the shard being filled is invisible under its final name
    assert sorted(p.name for p in a.iterdir() if p.suffix == ".tar") == [r.name for r in partial.finished]
    assert list(a.glob("*.tar.tmp"))
    partial.abort()
    assert not list(a.glob("*.tmp"))
    for p in a.glob("*.tar"):
        p.unlink()
    journal_path(a, 0).unlink()
    write(a)
    write(b)
    names = sorted(p.name for p in a.glob("*.tar"))
    assert len(names) >= 2 and names == sorted(p.name for p in b.glob("*.tar"))
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes()
    records = read_journal(journal_path(a, 0))
    assert [c for r in records for c in r.clip_ids] == [f"clip-{i}" for i in range(5)]
    with tarfile.open(a / names[0]) as tar:
        members = tar.getmembers()
        assert all(m.mtime == 0 and m.uid == 0 and m.uname == "" for m in members)
        first = {
            m.name.split(".", 1)[1]: tar.extractfile(m).read()
            for m in members
            if m.name.startswith("clip-0.")
        }
    meta, tensors = decode_sample({"__key__": "clip-0", **first})
    assert torch.equal(tensors["audio"], _random_sample("clip-0", 0)[1]["audio"])

    # a torn last journal line (killed while appending) is ignored; damage elsewhere is an error
    path = journal_path(a, 0)
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines) + '\n{"name": "shard-000-0')
    assert len(read_journal(path)) == len(lines)
    path.write_text("garbage\n" + "\n".join(lines) + "\n")
    with pytest.raises(DataToolsError, match="corrupt"):
        read_journal(path)


def test_verify_catches_a_damaged_shard_and_a_nan_sample(prepared, tmp_path, capsys):
    from data_tools.common import sha256_file
    from data_tools.shards import ShardWriter
    from data_tools.verify import _iter_samples, verify
    from mova_train.data.contract import decode_sample, encode_sample

    broken = tmp_path / "broken"
    shutil.copytree(prepared.out, broken)
    first, second = sorted(broken.glob("shard-*.tar"))[:2]
    data = bytearray(first.read_bytes())
    data[700] ^= 0xFF
    first.write_bytes(bytes(data))
    # rewrite the second shard with a NaN in one latent, with a matching checksum in the manifest
    samples = list(_iter_samples(second))
    second.unlink()
    writer = ShardWriter(tmp_path / "w", 0, start_index=0, target_bytes=1 << 30)
    (tmp_path / "w").mkdir()
    for i, (key, members) in enumerate(samples):
        meta, tensors = decode_sample({"__key__": key, **members})
        if i == 0:
            tensors["audio"][0, 0] = float("nan")
            nan_key = key
        writer.write(encode_sample(meta, tensors), {})
    writer.close()
    shutil.move(tmp_path / "w" / writer.finished[0].name, second)
    manifest = json.loads((broken / "manifest.json").read_text())
    for shard in manifest["shards"]:
        if shard["name"] == second.name:
            shard["sha256"], shard["num_bytes"] = sha256_file(second), second.stat().st_size
    (broken / "manifest.json").write_text(json.dumps(manifest))

    result = verify(broken)
    assert not result.ok
    assert any(first.name in p and "sha256" in p for p in result.problems)
    assert any(nan_key in p and "NaN" in p for p in result.problems)
    assert main(["verify", str(broken)]) == 1
    assert "FAILED" in capsys.readouterr().out


def test_a_clip_that_fails_at_encode_time_is_reported_and_others_are_kept(prepared, tmp_path):
    from data_tools.encode import EncodeOptions, encode

    plan_rows = [r for r in prepared.plan() if r["status"] == "kept" and r["relpath"] == "synth_000.mp4"][:2]
    assert len(plan_rows) == 2
    damaged = tmp_path / "damaged.mp4"
    damaged.write_bytes(b"\x00" * 1000)
    plan_rows[0] = {**plan_rows[0], "path": str(damaged)}
    summary = encode(plan_rows, EncodeOptions(checkpoint=str(prepared.checkpoint), out=str(tmp_path / "out")))
    report = summary["report"]
    skipped = [r for r in report if r["status"] == "skipped"]
    kept = [r for r in report if r["status"] == "kept"]
    assert [r["clip_id"] for r in skipped] == [plan_rows[0]["clip_id"]]
    assert "damaged.mp4" in skipped[0]["reason"]
    assert [r["clip_id"] for r in kept] == [plan_rows[1]["clip_id"]]
    assert summary["manifest"]["num_samples"] == 1


def test_stage_commands_scan_plan_export(data_input, tmp_path):
    work = tmp_path / "work"
    assert main(["scan", str(data_input), "--out", str(work / "sources.jsonl")]) == 0
    assert (
        main(
            [
                "plan",
                "--sources",
                str(work / "sources.jsonl"),
                "--out",
                str(work / "plan.jsonl"),
                "--frames",
                "17",
                "--buckets",
                BUCKETS,
                "--stride",
                "24",
            ]
        )
        == 0
    )
    rows = [json.loads(x) for x in (work / "plan.jsonl").read_text().splitlines()]
    kept = [r for r in rows if r["status"] == "kept" and r["relpath"] == "synth_000.mp4"]
    assert kept and all(b["start_s"] - a["start_s"] >= 24 / 24.0 - 1e-6 for a, b in zip(kept, kept[1:]))
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps(kept[0]) + "\n")
    assert main(["export-clips", "--plan", str(one), "--out", str(tmp_path / "clips")]) == 0
    assert (tmp_path / "clips" / f"{kept[0]['clip_id']}.mp4").is_file()
    assert main(["report", str(work)]) == 0


def test_synth_is_deterministic(tmp_path):
    from data_tools.synth import synthesize

    for name in ("a", "b"):
        synthesize(tmp_path / name, num_clips=2, seconds=1.0, seed=7, audio_offsets_ms=(50, -30))
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert "captions.jsonl" in files and "synth_000.txt" in files and "synth_001.events.json" in files
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_bench_prints_figures(tiny_checkpoint):
    proc = run_data_tools(
        "bench",
        "--clips",
        "1",
        "--seconds",
        "1.5",
        "--frames",
        "5",
        "--buckets",
        "32x64",
        "--checkpoint",
        str(tiny_checkpoint),
    )
    for label in ("frames/s", "audio s/s", "clips/min", "samples/s", "sha256 check cost, later epochs"):
        assert label in proc.stdout, proc.stdout
