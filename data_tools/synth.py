"""`data_tools synth`: the bundled synthetic dataset (real H.264/AAC mp4 files) used by the demo and the tests.

Each clip has moving shapes, a gliding tone, speech-like voiced bursts and sync events: a one-frame white flash with
a loud click at the same instant. `<name>.events.json` records the event times, so alignment can be checked on the
decoded output. `--audio-offset-ms` writes the audio stream earlier or later than the video stream by a known
amount while the content stays in sync, the case an aligner must correct.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import numpy as np

from data_tools.common import DataToolsError, ensure_writable_dir, log, progress, write_jsonl_atomic
from mova_train.media import MediaError, write_mp4

SYNTH_SAMPLE_RATE = 48000
# (height, width) cycle: two landscape clips, one portrait, one square, so every bucket kind gets sources
SYNTH_SIZES = ((128, 224), (128, 224), (224, 128), (160, 160))
FLASH_LEVEL = 250
CLICK_SECONDS = 0.004
CLICK_AMPLITUDE = 0.9
# speech bursts and tones stay well below the click so a click's onset is the loudest thing near it
SPEECH_AMPLITUDE = 0.22
TONE_AMPLITUDE = 0.05
EVENT_GUARD_S = 0.2


def write_media(
    path: str | os.PathLike,
    frames: np.ndarray,
    fps: float,
    audio: np.ndarray | None = None,
    sample_rate: int = SYNTH_SAMPLE_RATE,
    *,
    video_start_s: float = 0.0,
    audio_start_s: float = 0.0,
    frame_times_s: np.ndarray | None = None,
    crf: int = 20,
) -> Path:
    """Write a synthetic mp4 (H.264 + AAC) with explicit stream start times or per-frame times (VFR).

    frames: uint8 [N, H, W, 3]; audio: float32 [S] or [C, S] (C = 1 or 2) or None. A thin layer over
    `mova_train.media.write_mp4` (the project's one mp4 writer) that reports problems as DataToolsError.
    """

    try:
        return write_mp4(
            path, frames, fps, audio, sample_rate, crf=crf, preset="veryfast", audio_bitrate=128_000,
            video_start_s=video_start_s, audio_start_s=audio_start_s, frame_times_s=frame_times_s,
        )  # fmt: skip
    except MediaError as e:
        raise DataToolsError(str(e)) from None


def _event_frames(rng: np.random.Generator, num_frames: int, fps: float) -> list[int]:
    """Sync events about every 0.7-1.1 s, never in the first or last 0.25 s."""
    frames, t = [], 0.3 + rng.uniform(0.0, 0.2)
    while t < num_frames / fps - 0.3:
        frames.append(int(round(t * fps)))
        t += rng.uniform(0.7, 1.1)
    return frames


def _speech_spans(
    rng: np.random.Generator, seconds: float, event_times: list[float]
) -> list[tuple[float, float]]:
    """Voiced bursts of 0.3-0.7 s that keep EVENT_GUARD_S away from every sync event."""
    spans: list[tuple[float, float]] = []
    t = rng.uniform(0.05, 0.3)
    while t < seconds - 0.35:
        length = rng.uniform(0.3, 0.7)
        end = min(t + length, seconds - 0.05)
        clash = [e for e in event_times if t - EVENT_GUARD_S < e < end + EVENT_GUARD_S]
        if clash:
            t = clash[-1] + EVENT_GUARD_S + 0.01
            continue
        spans.append((round(t, 4), round(end, 4)))
        t = end + rng.uniform(0.25, 0.6)
    return spans


def render_audio(
    rng: np.random.Generator,
    seconds: float,
    sample_rate: int,
    event_times: list[float],
    speech_spans: list[tuple[float, float]],
) -> np.ndarray:
    """Mono float32 [S]: a gliding tone, voiced harmonic bursts with a syllable envelope, and clicks at events."""
    n = int(round(seconds * sample_rate))
    t = np.arange(n) / sample_rate
    f_tone = rng.uniform(300.0, 500.0)
    glide = 1.0 + 0.15 * np.sin(2 * np.pi * rng.uniform(0.1, 0.3) * t)
    audio = TONE_AMPLITUDE * np.sin(2 * np.pi * np.cumsum(f_tone * glide) / sample_rate)
    for start, end in speech_spans:
        i0, i1 = int(start * sample_rate), int(end * sample_rate)
        ts = t[i0:i1] - start
        f0 = rng.uniform(110.0, 220.0) * (1.0 + 0.05 * np.sin(2 * np.pi * 5.0 * ts))
        phase = 2 * np.pi * np.cumsum(f0) / sample_rate
        voiced = sum(np.sin(h * phase) / h for h in range(1, 9))
        syllables = np.abs(np.sin(np.pi * rng.uniform(3.5, 5.5) * ts)) ** 0.7
        fade = np.minimum(1.0, np.minimum(ts, (end - start) - ts) / 0.02)
        audio[i0:i1] += SPEECH_AMPLITUDE * voiced / 2.7 * syllables * fade
    click_len = int(CLICK_SECONDS * sample_rate)
    decay = np.exp(-np.arange(click_len) / (click_len / 4))
    for event in event_times:
        i0 = int(round(event * sample_rate))
        piece = rng.uniform(-1.0, 1.0, click_len) * decay
        piece[0] = 1.0  # a sharp leading edge marks the onset exactly
        end = min(n, i0 + click_len)
        audio[i0:end] += CLICK_AMPLITUDE * piece[: end - i0]
    return np.clip(audio, -1.0, 1.0).astype(np.float32)


def render_frames(
    rng: np.random.Generator, num_frames: int, height: int, width: int, flash_frames: list[int]
) -> np.ndarray:
    """uint8 [N, H, W, 3]: a dark gradient with three bouncing shapes; flash frames are near-white."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack(
        [
            20 + 40 * xs / width,
            25 + 30 * ys / height,
            45 + 25 * (xs + ys) / (width + height),
        ],
        axis=-1,
    )
    shapes = []
    for k in range(3):
        radius = rng.uniform(0.08, 0.16) * min(height, width)
        pos = np.array([rng.uniform(radius, height - radius), rng.uniform(radius, width - radius)])
        vel = rng.uniform(-1.0, 1.0, 2) * min(height, width) / 24.0
        color = rng.uniform(60, 170, 3)
        shapes.append((k % 2 == 0, radius, pos, vel, color))
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    flashes = set(flash_frames)
    for i in range(num_frames):
        if i in flashes:
            frames[i] = FLASH_LEVEL
            continue
        img = base.copy()
        for is_circle, radius, pos, vel, color in shapes:
            p = pos + vel * i
            # bounce inside the frame (reflect the unbounded trajectory)
            for axis, size in enumerate((height, width)):
                span = size - 2 * radius
                q = (p[axis] - radius) % (2 * span)
                p[axis] = radius + (q if q <= span else 2 * span - q)
            if is_circle:
                mask = (ys - p[0]) ** 2 + (xs - p[1]) ** 2 <= radius**2
            else:
                mask = (np.abs(ys - p[0]) <= radius) & (np.abs(xs - p[1]) <= radius)
            img[mask] = color
        frames[i] = np.clip(img, 0, 255).astype(np.uint8)
    return frames


CAPTION_SHAPES = ("circles and squares", "a circle and two squares", "bouncing discs", "drifting blocks")
CAPTION_SOUNDS = (
    "a humming voice",
    "a murmuring speaker",
    "a soft tone and a voice",
    "syllables over a drone",
)


def synthesize(
    out_dir: str | os.PathLike,
    *,
    num_clips: int = 5,
    seconds: float = 3.0,
    seed: int = 0,
    fps: float = 24.0,
    audio_offsets_ms: tuple[float, ...] = (0.0,),
    sample_rate: int = SYNTH_SAMPLE_RATE,
    channels: int = 1,
    scale: float = 1.0,
    prefix: str = "synth",
) -> list[Path]:
    """Write `num_clips` synthetic mp4 files plus their sidecars into out_dir; returns the mp4 paths.

    Clips with an even index carry `<name>.txt` captions, the others are captioned in `captions.jsonl`, so both
    caption sources are exercised. The output depends only on the arguments (seeded per clip). `channels` 2 writes
    the same soundtrack on both channels.
    """
    if num_clips < 1:
        raise DataToolsError(f"--clips {num_clips}: must be at least 1")
    if channels not in (1, 2):
        raise DataToolsError(f"channels {channels}: 1 or 2")
    if seconds < 1.0:
        raise DataToolsError(f"--seconds {seconds}: must be at least 1")
    out = ensure_writable_dir(out_dir)
    paths: list[Path] = []
    table_rows: list[dict] = []
    for index in progress(range(num_clips), total=num_clips, desc="synth", unit="clip"):
        rng = np.random.default_rng([seed, index])
        height, width = SYNTH_SIZES[index % len(SYNTH_SIZES)]
        height, width = int(round(height * scale / 16)) * 16, int(round(width * scale / 16)) * 16
        num_frames = int(round(seconds * fps))
        name = f"{prefix}_{index:03d}"
        flash_frames = _event_frames(rng, num_frames, fps)
        event_times = [f / fps for f in flash_frames]
        spans = _speech_spans(rng, num_frames / fps, event_times)
        frames = render_frames(rng, num_frames, height, width, flash_frames)
        # the true, in-sync soundtrack: sample k plays with video time k / sr
        audio = render_audio(rng, num_frames / fps, sample_rate, event_times, spans)
        offset_s = float(audio_offsets_ms[index % len(audio_offsets_ms)]) / 1000.0
        # audio stream starts `offset_s` after the video stream (before it when negative); the content stays in
        # sync on the container timeline, so a reader that ignores stream start times hears it off by offset_s
        if offset_s >= 0:
            stream_audio = audio[int(round(offset_s * sample_rate)) :]
            video_start, audio_start = 0.0, offset_s
        else:
            lead = np.zeros(int(round(-offset_s * sample_rate)), np.float32)
            stream_audio = np.concatenate([lead, audio])
            video_start, audio_start = -offset_s, 0.0
        if channels == 2:
            stream_audio = np.stack([stream_audio, stream_audio])
        path = out / f"{name}.mp4"
        write_media(
            path, frames, fps, stream_audio, sample_rate, video_start_s=video_start, audio_start_s=audio_start
        )
        caption = (
            f"{CAPTION_SHAPES[index % len(CAPTION_SHAPES)].capitalize()} move over a dark gradient while "
            f"{CAPTION_SOUNDS[(index + seed) % len(CAPTION_SOUNDS)]} is heard; white flashes come with sharp clicks."
        )
        if index % 2 == 0:
            (out / f"{name}.txt").write_text(caption + "\n", encoding="utf-8")
        else:
            table_rows.append({"file": path.name, "caption": caption})
        sidecar = {
            "file": path.name,
            "fps": fps,
            "num_frames": num_frames,
            "height": height,
            "width": width,
            "sample_rate": sample_rate,
            "audio_offset_s": offset_s,
            "sync_event_frames": flash_frames,
            "sync_events_s": event_times,
            "speech_spans_s": [list(s) for s in spans],
            "seed": seed,
        }
        (out / f"{name}.events.json").write_text(json.dumps(sidecar, indent=1) + "\n", encoding="utf-8")
        paths.append(path)
    if table_rows:
        write_jsonl_atomic(out / "captions.jsonl", table_rows)
    return paths


def parse_offsets(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        raise DataToolsError(f"--audio-offset-ms {text!r}: give numbers separated by commas") from None
    if not values or any(not math.isfinite(v) or abs(v) > 2000 for v in values):
        raise DataToolsError(f"--audio-offset-ms {text!r}: give numbers within +-2000 ms")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_dir", help="folder to write the synthetic mp4 files and captions into")
    parser.add_argument("--clips", type=int, default=5, help="number of source videos (default 5)")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each video (default 3.0)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed, same files (default 0)")
    parser.add_argument("--fps", type=float, default=24.0, help="frame rate of the videos (default 24)")
    parser.add_argument(
        "--audio-offset-ms",
        default="0",
        help="audio stream start minus video stream start, in ms; a comma list cycles over the clips, "
        "e.g. '0,120,-80' (content stays in sync; an aligner must undo the offset). Default 0",
    )
    parser.add_argument(
        "--scale", type=float, default=1.0, help="frame size factor over the built-in 128x224-ish sizes"
    )


def run(args: argparse.Namespace) -> int:
    paths = synthesize(
        args.out_dir,
        num_clips=args.clips,
        seconds=args.seconds,
        seed=args.seed,
        fps=args.fps,
        audio_offsets_ms=parse_offsets(args.audio_offset_ms),
        scale=args.scale,
    )
    log(f"synth: wrote {len(paths)} videos with captions and sync-event sidecars to {args.out_dir}")
    return 0
