"""`data_tools plan`: cut usable sources into fixed-length clips, one bucket per source -> `plan.jsonl`.

Clips are `--frames` frames at `--fps` (default 193 at 24 fps, about 8.04 s) and start every `--stride` frames.
Several lengths (`--frames 49,97,193`) are frame buckets: a source is cut into clips of the longest length that fits
its usable span, and the tail after the last one into clips of the longest shorter length that fits it, and so on.
The usable span of a source is where both video and audio exist on the common time base. Each cut is moved by up
to `--max-shift` seconds to the quietest nearby instant (RMS energy of the soundtrack, onsets weighted in) so a
clip does not start or end inside a word or a sound event. Every rejected span gets a row with its reason:
source too short, a tail shorter than a clip, a gap left by a moved cut, a silent clip (`--skip-silent`), a frozen
picture (`--skip-frozen`), or a source skipped by scan.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np

from data_tools.align import MediaDecodeError, audio_envelope, frame_times, iter_frames, select_frames
from data_tools.common import (
    DEFAULT_BUCKETS,
    DEFAULT_FPS,
    DEFAULT_FRAMES,
    PLAN_NAME,
    Bucket,
    DataToolsError,
    check_fps,
    check_frames,
    choose_bucket,
    ensure_writable_dir,
    log,
    parse_buckets,
    progress,
    read_jsonl,
    write_jsonl_atomic,
)

ENERGY_HOP_S = 0.01
AUDIO_SLACK_S = 0.02
EPS = 1e-6


def audio_energy(row: dict) -> tuple[np.ndarray, float]:
    """(RMS envelope [K] of the source soundtrack on a 10 ms grid, time of bin 0 relative to video frame 0)."""
    rms, start = audio_envelope(row["path"], ENERGY_HOP_S)
    return rms, start - float(row["video_start_s"])


def cut_cost(rms: np.ndarray, t0: float, t: float) -> float:
    """Energy around instant t (seconds, video time): the RMS over +-30 ms plus the rise into t (onsets)."""
    center = (t - t0) / ENERGY_HOP_S
    lo, hi = int(math.floor(center - 3)), int(math.ceil(center + 3))
    lo, hi = max(lo, 0), min(hi, rms.shape[0])
    if hi <= lo:
        return 0.0
    seg = rms[lo:hi]
    onset = float(np.clip(np.diff(seg), 0, None).sum()) if seg.size > 1 else 0.0
    return float(seg.mean()) + onset


def clip_db(rms: np.ndarray, t0: float, start: float, end: float) -> float:
    lo, hi = int((start - t0) / ENERGY_HOP_S), int(math.ceil((end - t0) / ENERGY_HOP_S))
    seg = rms[max(lo, 0) : max(hi, 0)]
    if seg.size == 0:
        return -120.0
    return float(20 * np.log10(np.sqrt(np.mean(seg**2)) + 1e-6))


def frozen_score(row: dict, start: float, num_frames: int, fps: float) -> float:
    """Mean absolute change (0-255) between 8 evenly spaced frames of the clip; ~0 for a frozen picture."""
    times = frame_times(row["path"])
    wanted = start + np.linspace(0, (num_frames - 1) / fps, 8)
    indices = select_frames(times, wanted, float(row["fps"]))
    total, count, previous = 0, 0, None
    for chunk in iter_frames(row["path"], indices, row["height"], row["width"]):  # bounded memory at any size
        for frame in chunk:
            if previous is not None:
                total += int(np.abs(frame.astype(np.int16) - previous.astype(np.int16)).sum(dtype=np.int64))
                count += frame.size
            previous = frame
    return total / count if count else 0.0


def _span(row: dict, clip_id: str, start: float, end: float, reason: str) -> dict:
    return {
        "clip_id": clip_id,
        "source_id": row["source_id"],
        "relpath": row["relpath"],
        "status": "rejected",
        "reason": reason,
        "start_s": round(start, 6),
        "end_s": round(end, 6),
    }


def _cut(
    rms: np.ndarray, rms_t0: float, quiet: float, lo: float, hi: float, *, num_frames: int, fps: float,
    stride: int, max_shift_s: float,
) -> tuple[list[float], list[tuple[float, float, str]]]:  # fmt: skip
    """Clip starts of `num_frames` frames every `stride` frames in [lo, hi] (which holds at least one clip), each
    cut moved by up to `max_shift_s` to the quietest instant; and the gaps left out by moved cuts."""
    duration = num_frames / fps
    stride_s = stride / fps
    grid = 1.0 / fps
    shift_steps = int(math.floor(max_shift_s * fps + EPS))
    starts: list[float] = []
    rejected: list[tuple[float, float, str]] = []
    nominal, earliest = lo, lo
    while True:
        candidates = [nominal + k * grid for k in range(-shift_steps, shift_steps + 1)]
        candidates = [s for s in candidates if s >= earliest - EPS and s + duration <= hi + EPS]
        if not candidates:
            break
        # quietest cut at both ends; anything near the background level counts as quiet, so a cut only moves
        # away from real sound and ties go to the smallest move
        best = min(
            candidates,
            key=lambda s: (
                max(cut_cost(rms, rms_t0, s), quiet) + max(cut_cost(rms, rms_t0, s + duration), quiet),
                abs(s - nominal),
            ),
        )
        prev_end = starts[-1] + duration if starts else lo
        if best - prev_end > EPS and (not starts or stride >= num_frames):
            rejected.append((prev_end, best, "left out so that clips do not cut inside sound"))
        starts.append(best)
        earliest = best + min(stride_s, duration)
        nominal = best + stride_s
    return starts, rejected


def plan_source(
    row: dict,
    *,
    num_frames: int | tuple[int, ...],
    fps: float,
    buckets: tuple[Bucket, ...],
    stride: int | None,
    min_frames: int | None,
    max_shift_s: float,
    skip_silent: bool,
    silence_db: float,
    skip_frozen: bool,
    frozen_threshold: float,
) -> list[dict]:
    """Clip rows (kept and rejected) of one usable source. Several `num_frames` are frame buckets (longest that
    fits first, then the tail); `stride` None = each length's own (back-to-back clips)."""
    lengths = sorted({num_frames} if isinstance(num_frames, int) else set(num_frames), reverse=True)
    duration = lengths[-1] / fps  # the shortest clip: a source shorter than that has none
    video_end = float(row["duration_s"])
    audio_lo = float(row["audio_start_s"]) - float(row["video_start_s"])
    audio_hi = audio_lo + float(row["audio_duration_s"])
    # audio may end up to AUDIO_SLACK_S before the video's end (AAC frame and edit-list rounding); the missing
    # instant is padded with silence and noted by `encode`
    lo, hi = max(0.0, audio_lo), min(video_end, audio_hi + AUDIO_SLACK_S)
    # start on the target frame grid so that CFR sources at the target rate keep their original frames
    lo = math.ceil(lo * fps - EPS) / fps
    sid = row["source_id"]
    if hi - lo < duration - EPS:
        return [
            _span(
                row,
                f"{sid}-span",
                lo,
                hi,
                f"source has {max(0.0, hi - lo):.3f} s with both video and audio, shorter than one clip "
                f"({lengths[-1]} frames at {fps:g} fps = {duration:.3f} s)",
            )
        ]
    bucket = choose_bucket(int(row["width"]), int(row["height"]), buckets)
    rms, rms_t0 = audio_energy(row)
    # background level: the 20th percentile of the envelope (a steady tone or room noise), with 50% headroom
    quiet = 1.5 * float(np.percentile(rms, 20)) if rms.size else 0.0

    clips: list[tuple[float, int]] = []  # (start, frames)
    rejected: list[tuple[float, float, str]] = []
    span_lo, choices = lo, lengths
    while True:
        fits = [f for f in choices if hi - span_lo >= f / fps - EPS]
        if not fits:
            break
        length = fits[0]  # the longest that fits; the tail after its clips gets the shorter ones
        starts, gaps = _cut(
            rms, rms_t0, quiet, span_lo, hi, num_frames=length, fps=fps,
            stride=length if stride is None else stride, max_shift_s=max_shift_s,
        )  # fmt: skip
        clips += [(start, length) for start in starts]
        rejected += gaps
        span_lo, choices = starts[-1] + length / fps, fits[1:]
    last_start, last_frames = clips[-1]
    last_end = last_start + last_frames / fps
    tail = hi - last_end
    if tail > EPS:
        tail_frames = int(math.floor(tail * fps + EPS))
        clip_s = last_frames / fps
        min_frames = last_frames if min_frames is None else min_frames
        if min_frames < last_frames and tail_frames >= min_frames and hi - clip_s > last_start + EPS:
            clips.append((math.floor((hi - clip_s) * fps + EPS) / fps, last_frames))
        elif tail > 0.5 / fps:
            shortest = lengths[-1] / fps  # with frame buckets, shorter than the shortest clip
            rejected.append(
                (last_end, hi, f"tail of {tail:.3f} s is shorter than one clip ({shortest:.3f} s)")
            )

    rows: list[dict] = []
    for index, (start, clip_frames) in enumerate(clips):
        clip_id = f"{sid}-{index:04d}"
        end = start + clip_frames / fps
        clip = {
            "clip_id": clip_id,
            "source_id": sid,
            "path": row["path"],
            "relpath": row["relpath"],
            "status": "kept",
            "reason": "",
            "start_s": round(start, 6),
            "end_s": round(end, 6),
            "fps": fps,
            "num_frames": clip_frames,
            "bucket": bucket.name,
            "height": bucket.height,
            "width": bucket.width,
            "caption": row["caption"],
            "source_fps": row["fps"],
            "source_width": row["width"],
            "source_height": row["height"],
            "video_start_s": row["video_start_s"],
            "audio_start_s": row["audio_start_s"],
            "audio_db": round(clip_db(rms, rms_t0, start, end), 2),
            "cut_rms": [
                round(cut_cost(rms, rms_t0, start), 6),
                round(cut_cost(rms, rms_t0, end), 6),
            ],
        }
        if skip_silent and clip["audio_db"] < silence_db:
            clip.update(
                status="rejected", reason=f"silent ({clip['audio_db']:.1f} dBFS < {silence_db:g} dBFS)"
            )
        elif skip_frozen:
            score = frozen_score(row, start, clip_frames, fps)
            clip["motion"] = round(score, 4)
            if score < frozen_threshold:
                clip.update(status="rejected", reason=f"frozen picture (mean change {score:.2f}/255)")
        rows.append(clip)
    for k, (start, end, reason) in enumerate(rejected):
        rows.append(_span(row, f"{sid}-gap{k}", start, end, reason))
    rows.sort(key=lambda r: (r["start_s"], r["clip_id"]))
    return rows


def default_max_shift(num_frames: int, fps: float) -> float:
    """An eighth of a clip, at most 1 s: enough to step out of a word without losing much material."""
    return round(min(1.0, 0.125 * num_frames / fps), 6)


def plan(
    sources: list[dict],
    *,
    num_frames: int | tuple[int, ...] = DEFAULT_FRAMES,
    fps: float = DEFAULT_FPS,
    buckets: tuple[Bucket, ...] | str = DEFAULT_BUCKETS,
    stride: int | None = None,
    min_frames: int | None = None,
    max_shift_s: float | None = None,
    skip_silent: bool = False,
    silence_db: float = -50.0,
    skip_frozen: bool = False,
    frozen_threshold: float = 1.0,
) -> list[dict]:
    """Rows of the clip plan: kept clips (the ones `encode` will process) and rejected spans, with reasons.
    Several `num_frames` are frame buckets (see the module doc)."""
    lengths = (num_frames,) if isinstance(num_frames, int) else tuple(num_frames)
    if not lengths:
        raise DataToolsError("--frames: give at least one frame count")
    for f in lengths:
        check_frames(f)
    check_fps(fps)
    if isinstance(buckets, str):
        buckets = parse_buckets(buckets)
    stride = None if stride is None else int(stride)  # None: each length's own
    if stride is not None and stride < 1:
        raise DataToolsError(f"--stride {stride}: must be at least 1 frame")
    min_frames = None if min_frames is None else int(min_frames)
    if min_frames is not None and min_frames < 1:
        raise DataToolsError(f"--min-frames {min_frames}: must be at least 1")
    if max_shift_s is None:
        max_shift_s = default_max_shift(max(lengths), fps)
    if max_shift_s < 0:
        raise DataToolsError(f"--max-shift {max_shift_s}: must not be negative")
    rows: list[dict] = []
    for src in progress(sources, total=len(sources), desc="plan", unit="source"):
        if src.get("status") != "ok":
            rows.append(
                {
                    "clip_id": f"{src.get('source_id', 'source')}-source",
                    "source_id": src.get("source_id", ""),
                    "relpath": src.get("relpath", ""),
                    "status": "rejected",
                    "reason": f"source skipped by scan: {src.get('reason', '')}",
                }
            )
            continue
        try:
            rows.extend(
                plan_source(
                    src,
                    num_frames=lengths,
                    fps=fps,
                    buckets=buckets,
                    stride=stride,
                    min_frames=min_frames,
                    max_shift_s=max_shift_s,
                    skip_silent=skip_silent,
                    silence_db=silence_db,
                    skip_frozen=skip_frozen,
                    frozen_threshold=frozen_threshold,
                )
            )
        except MediaDecodeError as e:
            rows.append(
                _span(src, f"{src['source_id']}-source", 0.0, float(src.get("duration_s", 0)), str(e))
            )
    return rows


# --------------------------------------------------------------------------------------------------------------
# which --frames would fit (the hint `prepare` prints when the plan drops most of the input)

FRAME_STEP = (
    4  # the video VAE's temporal stride: valid frame counts are FRAME_STEP * k + 1 (see check_frames)
)


def usable_span(row: dict, fps: float) -> tuple[float, float]:
    """(start, end) in video seconds where a usable source has both video and audio, start on the clip frame grid:
    the span `plan_source` cuts clips from (a clip fits when end - start >= frames / fps)."""
    audio_lo = float(row["audio_start_s"]) - float(row["video_start_s"])
    audio_hi = audio_lo + float(row["audio_duration_s"])
    lo, hi = max(0.0, audio_lo), min(float(row["duration_s"]), audio_hi + AUDIO_SLACK_S)
    return math.ceil(lo * fps - EPS) / fps, hi


def largest_fitting_frames(sources: list[dict], fps: float, *, share: float = 1.0) -> int | None:
    """The largest valid --frames (4k + 1) that keeps at least one clip from at least `share` (0-1] of the sources
    scan accepted; None when there are none or not even one frame fits."""
    spans = sorted(
        max(0.0, hi - lo) for lo, hi in (usable_span(r, fps) for r in sources if r.get("status") == "ok")
    )
    if not spans:
        return None
    needed = max(1, math.ceil(share * len(spans) - EPS))
    # the same test as plan_source: a clip of n frames fits a span when n / fps <= span + EPS
    frames = int(math.floor((spans[len(spans) - needed] + EPS) * fps))
    frames -= (frames - 1) % FRAME_STEP
    return frames if frames >= 1 else None


def add_plan_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--fps", type=float, default=DEFAULT_FPS, help=f"clip frame rate (default {DEFAULT_FPS:g})"
    )
    parser.add_argument(
        "--frames",
        type=str,
        default=str(DEFAULT_FRAMES),
        help=f"frames per clip, 4k+1 (default {DEFAULT_FRAMES}); several, e.g. 49,97,193, are frame buckets: each "
        "span gets the longest that fits, its tail the shorter ones",
    )
    parser.add_argument(
        "--buckets",
        default=DEFAULT_BUCKETS,
        help=f"frame sizes HxW, multiples of 16; each source gets the closest aspect (default {DEFAULT_BUCKETS})",
    )
    parser.add_argument(
        "--stride", type=int, default=None, help="frames between clip starts (default: --frames)"
    )
    parser.add_argument(
        "--min-frames",
        type=int,
        default=None,
        help="keep a source's tail of at least this many frames as one more clip ending at the source's end "
        "(overlapping the previous one); default --frames (tails are dropped)",
    )
    parser.add_argument(
        "--max-shift",
        type=float,
        default=None,
        help="seconds a cut may move to avoid cutting inside sound (default: 1/8 clip, at most 1 s; 0 disables)",
    )
    parser.add_argument("--skip-silent", action="store_true", help="reject clips quieter than --silence-db")
    parser.add_argument(
        "--silence-db", type=float, default=-50.0, help="silence threshold in dBFS (default -50)"
    )
    parser.add_argument(
        "--skip-frozen", action="store_true", help="reject clips whose picture does not change"
    )
    parser.add_argument(
        "--frozen-threshold",
        type=float,
        default=1.0,
        help="mean frame change (0-255) below which a clip is frozen",
    )


def parse_frames(text: str | int) -> int | tuple[int, ...]:
    """`--frames`: one count (`193`) or frame buckets (`49,97,193`), each 4k + 1, longest first."""
    if isinstance(text, int):
        return check_frames(text)
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise DataToolsError(f"--frames {text!r}: give frame counts like 193 or 49,97,193") from None
    if not values:
        raise DataToolsError(f"--frames {text!r}: give frame counts like 193 or 49,97,193")
    if len(set(values)) != len(values):
        raise DataToolsError(f"--frames {text!r} names a frame count twice")
    for v in values:
        check_frames(v)
    return values[0] if len(values) == 1 else tuple(sorted(values, reverse=True))


def plan_kwargs(args: argparse.Namespace) -> dict:
    frames = parse_frames(args.frames)
    longest = frames if isinstance(frames, int) else frames[0]
    return {
        "num_frames": frames,
        "fps": check_fps(args.fps),
        "buckets": parse_buckets(args.buckets),
        "stride": args.stride,
        "min_frames": args.min_frames,
        "max_shift_s": default_max_shift(longest, args.fps) if args.max_shift is None else args.max_shift,
        "skip_silent": args.skip_silent,
        "silence_db": args.silence_db,
        "skip_frozen": args.skip_frozen,
        "frozen_threshold": args.frozen_threshold,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sources", required=True, help="sources table written by `scan`")
    parser.add_argument("--out", required=True, help=f"where to write the clip plan (e.g. work/{PLAN_NAME})")
    add_plan_options(parser)


def summarize_plan(rows: list[dict]) -> str:
    kept = [r for r in rows if r["status"] == "kept"]
    buckets: dict[str, int] = {}
    frames: dict[int, int] = {}
    for r in kept:
        buckets[r["bucket"]] = buckets.get(r["bucket"], 0) + 1
        frames[r["num_frames"]] = frames.get(r["num_frames"], 0) + 1
    seconds = sum(r["end_s"] - r["start_s"] for r in kept)
    text = ", ".join(f"{b}: {n}" for b, n in sorted(buckets.items())) or "none"
    if len(frames) > 1:
        text += "; frames " + ", ".join(f"{f}: {n}" for f, n in sorted(frames.items()))
    return f"plan: {len(kept)} clips ({seconds / 3600:.3f} h) in buckets {text}; {len(rows) - len(kept)} rejected spans"


def run(args: argparse.Namespace) -> int:
    kwargs = plan_kwargs(args)
    sources = read_jsonl(args.sources, what="sources table")
    out = Path(args.out)
    ensure_writable_dir(out.parent)
    rows = plan(sources, **kwargs)
    write_jsonl_atomic(out, rows)
    log(summarize_plan(rows))
    return 0
