"""`data_tools scan INPUT_DIR`: probe every media file and collect its caption -> `sources.jsonl`.

Per file: duration, frame rate (constant or variable), size, audio presence, sample rate, channels, and the stream
start times that alignment corrects for. Captions come from a sidecar `<name>.txt` or `<name>.json`
({"caption": ...}), or from a `captions.jsonl` / `captions.csv` table in INPUT_DIR (columns `file` and `caption`,
loaded with `datasets`). Files that cannot be used are kept in the table with status "skipped" and the reason.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from data_tools.common import (
    SOURCES_NAME,
    VIDEO_EXTENSIONS,
    DataToolsError,
    ensure_writable_dir,
    log,
    progress,
    sanitize_id,
    write_jsonl_atomic,
)

CAPTION_TABLES = ("captions.jsonl", "captions.csv")
FILE_COLUMNS = ("file", "path", "video", "filename", "name")
CAPTION_COLUMNS = ("caption", "text", "prompt")
# frame intervals varying by more than this fraction of the median mark a variable-frame-rate source
VFR_TOLERANCE = 0.1


class SkipSource(Exception):
    """Internal: this source cannot be used; the message is the reason written to the table."""


def find_media(input_dir: Path) -> list[Path]:
    """Video files under `input_dir`, and video-named links that lead nowhere (a loop, a missing target): those
    are reported by scan as skipped with the reason instead of vanishing from the report."""
    return sorted(
        p
        for p in input_dir.rglob("*")
        if (p.is_file() or (p.is_symlink() and not p.exists()))
        and p.suffix.lower() in VIDEO_EXTENSIONS
        and not p.name.startswith(".")
    )


def _dangling_link_reason(path: Path) -> str:
    target = os.readlink(path)
    try:
        path.stat()
    except OSError as e:
        if e.errno == errno.ELOOP:
            return f"symbolic link loop ({path.name} -> {target} leads back to itself)"
        return f"symbolic link to a missing file ({path.name} -> {target})"
    return f"symbolic link that cannot be followed ({path.name} -> {target})"


# --------------------------------------------------------------------------------------------------------------
# captions


def _check_utf8(path: Path) -> None:
    try:
        path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataToolsError(
            f"caption table {path} is not UTF-8 (byte {path.read_bytes()[e.start]:#04x} at offset {e.start}); "
            "re-save it as UTF-8"
        ) from None


def load_caption_table(path: Path) -> dict[str, str]:
    """{file key: caption} from a captions.jsonl / captions.csv table (read with `datasets`)."""
    import datasets

    _check_utf8(path)
    datasets.disable_progress_bars()
    builder = "json" if path.suffix == ".jsonl" else "csv"
    with tempfile.TemporaryDirectory(prefix="mova-captions-") as cache:
        try:
            table = datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache)
        except Exception as e:  # datasets wraps parser errors in several types
            raise DataToolsError(f"caption table {path} cannot be read: {e}") from None
        columns = table.column_names
        rows = table.to_list()
    file_col = next((c for c in FILE_COLUMNS if c in columns), None)
    text_col = next((c for c in CAPTION_COLUMNS if c in columns), None)
    if file_col is None or text_col is None:
        raise DataToolsError(
            f"caption table {path} has columns {columns}; it needs one of {list(FILE_COLUMNS)} and one of "
            f"{list(CAPTION_COLUMNS)}"
        )
    captions: dict[str, str] = {}
    for number, row in enumerate(rows, start=1):
        key, text = row[file_col], row[text_col]
        if not isinstance(key, str) or not key:
            raise DataToolsError(f"caption table {path}, row {number}: empty {file_col!r}")
        if key in captions and captions[key] != text:
            raise DataToolsError(f"caption table {path}: {key!r} is listed twice with different captions")
        captions[key] = "" if text is None else str(text)
    return captions


def load_caption_tables(input_dir: Path, extra: list[Path]) -> dict[str, tuple[str, str]]:
    """{file key: (caption, table path)} from every table found or given."""
    merged: dict[str, tuple[str, str]] = {}
    tables = [input_dir / name for name in CAPTION_TABLES if (input_dir / name).is_file()] + list(extra)
    for table in tables:
        if not table.is_file():
            raise DataToolsError(f"caption table {table} does not exist")
        for key, text in load_caption_table(table).items():
            merged.setdefault(key, (text, str(table)))
    return merged


def find_caption(media: Path, input_dir: Path, tables: dict[str, tuple[str, str]]) -> tuple[str, str]:
    """(caption, where it came from) for one media file; SkipSource when missing, unreadable or empty."""
    txt, js = media.with_suffix(".txt"), media.with_suffix(".json")
    text: str | None = None
    if txt.is_file():
        try:
            text = txt.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise SkipSource(
                f"caption file {txt.name} is not UTF-8 (invalid byte at offset {e.start})"
            ) from None
        source = txt.name
    elif js.is_file():
        try:
            obj = json.loads(js.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SkipSource(f"caption file {js.name} is not UTF-8 JSON ({e})") from None
        text = next(
            (obj[c] for c in CAPTION_COLUMNS if isinstance(obj, dict) and isinstance(obj.get(c), str)), None
        )
        # a sidecar JSON without a caption field is other metadata: look in the tables instead
        source = js.name
    if text is None:
        rel = media.relative_to(input_dir).as_posix()
        for key in (rel, media.name, media.stem):
            if key in tables:
                text, table = tables[key]
                source = Path(table).name
                break
        else:
            raise SkipSource(
                f"no caption: add {media.stem}.txt next to it or a row in captions.jsonl/captions.csv "
                f"(a {media.stem}.json sidecar needs a 'caption' field), or pass --default-caption"
            )
    text = " ".join(text.split())
    if not text:
        raise SkipSource(f"empty caption in {source}")
    return text, source


# --------------------------------------------------------------------------------------------------------------
# probing


def _looks_like_container(path: Path) -> bool:
    """True when the file starts like an mp4/mov, Matroska/WebM or AVI file (so a failure means damage)."""
    with open(path, "rb") as f:
        head = f.read(12)
    return head[4:8] in (b"ftyp", b"moov", b"mdat", b"wide", b"free") or head[:4] in (
        b"\x1aE\xdf\xa3",
        b"RIFF",
    )


def probe_streams(path: Path) -> dict:
    """Container facts from PyAV: streams, codecs, start times, audio layout and duration."""
    import av

    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, UnicodeDecodeError) as e:
        detail = getattr(e, "strerror", None) or str(e)
        if _looks_like_container(path):
            raise SkipSource(f"truncated or damaged video file: FFmpeg cannot open it ({detail})") from None
        raise SkipSource(f"not a readable video file: FFmpeg cannot open it ({detail})") from None
    with container:
        if not container.streams.video:
            raise SkipSource("no video stream")
        vstream = container.streams.video[0]
        info = {
            "video_codec": vstream.codec_context.name,
            "width": int(vstream.codec_context.width),
            "height": int(vstream.codec_context.height),
            "has_audio": bool(container.streams.audio),
        }
        try:
            first = next(iter(container.decode(vstream)), None)
        except av.error.FFmpegError as e:
            raise SkipSource(f"the video stream cannot be decoded ({e})") from None
        if first is None:
            raise SkipSource("the video stream has no frames")
        tb = vstream.time_base
        info["video_start_s"] = float(first.pts * tb) if first.pts is not None else 0.0
        if not container.streams.audio:
            return info
        astream = container.streams.audio[0]
        info.update(
            audio_codec=astream.codec_context.name,
            audio_sample_rate=int(astream.codec_context.sample_rate),
            audio_channels=int(astream.codec_context.channels),
        )
    # audio timing from its own pass: first decoded frame (after any priming skip) and the end of the last packet
    with av.open(str(path)) as container:
        astream = container.streams.audio[0]
        atb = astream.time_base
        first_packet_pts = first_frame_pts = None
        end = None
        try:
            for packet in container.demux(astream):
                if packet.pts is None:
                    continue
                if first_packet_pts is None:
                    first_packet_pts = packet.pts
                if first_frame_pts is None:
                    for frame in packet.decode():
                        if frame.pts is not None:
                            first_frame_pts = frame.pts
                            break
                end = max(end or 0, packet.pts + (packet.duration or 0))
        except av.error.FFmpegError as e:
            raise SkipSource(f"the audio stream cannot be read ({e})") from None
        if first_frame_pts is None or end is None:
            raise SkipSource("the audio stream has no decodable samples")
        info["audio_start_s"] = float(first_frame_pts * atb)
        info["audio_duration_s"] = float((end - first_frame_pts) * atb)
        # samples FFmpeg dropped at the start (AAC priming signalled by an edit list); informational
        info["audio_skipped_priming_samples"] = int(
            round(float((first_frame_pts - first_packet_pts) * atb) * info["audio_sample_rate"])
        )
    return info


def probe_frames(path: Path, info: dict) -> dict:
    """Frame count, rates and duration from decord's frame index; the last frame is decoded to catch truncation."""
    import decord

    try:
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
        count = len(reader)
        if count == 0:
            raise SkipSource("the video stream has no frames")
        stamps = reader.get_frame_timestamp(list(range(count))).astype(np.float64)  # [N, 2] start, end
        reader[count - 1]
    except (decord.DECORDError, RuntimeError) as e:
        raise SkipSource(
            f"video frames cannot be decoded, the file may be truncated ({str(e)[:200]})"
        ) from None
    starts = stamps[:, 0] - stamps[0, 0]
    intervals = np.diff(starts)
    median = float(np.median(intervals)) if intervals.size else 0.0
    fps = 1.0 / median if median > 0 else float(reader.get_avg_fps())
    spread = float(intervals.max() - intervals.min()) if intervals.size else 0.0
    return {
        "num_frames": count,
        "fps": round(fps, 3),
        "avg_fps": round(float(reader.get_avg_fps()), 6),
        "duration_s": round(float(stamps[-1, 1] - stamps[0, 0]), 6),
        "vfr": bool(median > 0 and spread > VFR_TOLERANCE * median),
        "frame_interval_min_s": round(float(intervals.min()), 6) if intervals.size else None,
        "frame_interval_max_s": round(float(intervals.max()), 6) if intervals.size else None,
    }


def scan_file(
    path: Path, input_dir: Path, tables: dict, *, allow_vfr: bool, default_caption: str | None
) -> dict:
    rel = path.relative_to(input_dir).as_posix()
    if path.is_symlink() and not path.exists():
        reason = _dangling_link_reason(path)
        return {
            "path": str(path),
            "relpath": rel,
            "size_bytes": 0,
            "notes": [],
            "status": "skipped",
            "reason": reason,
        }
    row: dict = {"path": str(path.resolve()), "relpath": rel, "size_bytes": path.stat().st_size, "notes": []}
    try:
        row.update(probe_streams(path))
        row.update(probe_frames(path, row))
        if row["vfr"] and not allow_vfr:
            raise SkipSource(
                f"variable frame rate (frame intervals {row['frame_interval_min_s'] * 1000:.1f}-"
                f"{row['frame_interval_max_s'] * 1000:.1f} ms); re-encode at a constant rate or pass --allow-vfr "
                "to sample frames by timestamp"
            )
        if row["vfr"]:
            row["notes"].append("variable frame rate: frames are picked by timestamp")
        if not row["has_audio"]:
            raise SkipSource("no audio track (MOVA trains on paired video and audio)")
        sr, ch = row["audio_sample_rate"], row["audio_channels"]
        if sr != 48000 or ch != 1:
            row["notes"].append(f"audio {sr} Hz, {ch} channel(s): resampled to 48000 Hz mono")
        offset = row["audio_start_s"] - row["video_start_s"]
        if abs(offset) > 1e-4:
            row["notes"].append(
                f"audio stream starts {offset * 1000:+.1f} ms from the video stream: corrected"
            )
        try:
            row["caption"], row["caption_source"] = find_caption(path, input_dir, tables)
        except SkipSource:
            if default_caption is None:
                raise
            row["caption"], row["caption_source"] = default_caption, "--default-caption"
        row["status"], row["reason"] = "ok", ""
    except SkipSource as e:
        row["status"], row["reason"] = "skipped", str(e)
    except Exception as e:  # noqa: BLE001 - one odd file must not stop the scan of the others
        row["status"], row["reason"] = "skipped", f"probing failed ({type(e).__name__}: {e})"
    return row


def assign_source_ids(rows: list[dict]) -> None:
    seen: dict[str, int] = {}
    for row in rows:
        base = sanitize_id(Path(row["relpath"]).with_suffix("").as_posix().replace("/", "__"))
        seen[base] = seen.get(base, 0) + 1
        row["source_id"] = base if seen[base] == 1 else f"{base}_{seen[base]}"


def scan(
    input_dir: str | os.PathLike,
    *,
    captions: list[str | os.PathLike] = (),
    allow_vfr: bool = False,
    default_caption: str | None = None,
    workers: int = 1,
) -> list[dict]:
    """Rows of the sources table (one per media file, sorted by path)."""
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise DataToolsError(f"input folder {input_dir} does not exist or is not a folder")
    tables = load_caption_tables(input_dir, [Path(c) for c in captions])
    files = find_media(input_dir)
    if not files:
        raise DataToolsError(f"no video files ({', '.join(VIDEO_EXTENSIONS)}) found under {input_dir}")

    def one(path: Path) -> dict:
        return scan_file(path, input_dir, tables, allow_vfr=allow_vfr, default_caption=default_caption)

    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            rows = list(progress(pool.map(one, files), total=len(files), desc="scan", unit="file"))
    else:
        rows = [one(p) for p in progress(files, total=len(files), desc="scan", unit="file")]
    assign_source_ids(rows)
    return rows


def add_scan_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--captions",
        action="append",
        default=[],
        metavar="TABLE",
        help="extra captions.jsonl/.csv table (columns file, caption); repeatable",
    )
    parser.add_argument(
        "--allow-vfr",
        action="store_true",
        help="use variable-frame-rate sources (frames picked by timestamp) instead of skipping them",
    )
    parser.add_argument(
        "--default-caption",
        default=None,
        help="caption for files that have none (default: such files are skipped)",
    )
    parser.add_argument(
        "--workers", type=int, default=2, help="parallel probing/decoding threads (default 2)"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input_dir", help="folder with the raw videos (searched recursively)")
    parser.add_argument(
        "--out", required=True, help=f"where to write the sources table (e.g. work/{SOURCES_NAME})"
    )
    add_scan_options(parser)


def summarize_sources(rows: list[dict]) -> str:
    ok = [r for r in rows if r["status"] == "ok"]
    lines = [f"scan: {len(ok)} of {len(rows)} files usable"]
    lines += [f"  skipped {r['relpath']}: {r['reason']}" for r in rows if r["status"] != "ok"]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    ensure_writable_dir(out.parent, what="output folder")
    rows = scan(
        args.input_dir,
        captions=args.captions,
        allow_vfr=args.allow_vfr,
        default_caption=args.default_caption,
        workers=args.workers,
    )
    write_jsonl_atomic(out, rows)
    log(summarize_sources(rows))
    return 0
