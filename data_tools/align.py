"""Decode one planned clip and put its audio and video on one time base (the `encode` and `export-clips` core).

Time base: seconds on the container timeline. Video frame k of a source is shown at `video_start_s + rel_k`, where
`rel_k` are decord's frame timestamps relative to the first frame and `video_start_s` is the first frame's
presentation time (PyAV). Audio samples are placed by the presentation time of the decoded frames they come
from, so stream start offsets, edit lists and AAC encoder priming (which FFmpeg either skips on decode or labels
with earlier timestamps) are all honoured. A clip that starts at `start_s` (relative to the first video frame)
takes frame times `start_s + k / fps` and audio from `video_start_s + start_s` on: audio sample 0 is the instant
of video frame 0; the sub-sample rounding left over is the recorded `audio_offset_s`.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from data_tools.common import TARGET_SAMPLE_RATE, DataToolsError


class MediaDecodeError(DataToolsError):
    """A source file (or part of it) that cannot be decoded; the message names the file."""


# --------------------------------------------------------------------------------------------------------------
# audio


@dataclass
class AudioWindow:
    """Decoded audio of one stream: samples [C, S] at the stream's own rate, sample 0 at `start_s`."""

    samples: np.ndarray  # [C, S] float32
    sample_rate: int
    start_s: float  # container time of sample 0


def _frame_to_float(frame) -> np.ndarray:
    """One PyAV AudioFrame as float32 [C, n] in [-1, 1], whatever its sample format."""
    array = frame.to_ndarray()
    channels = len(frame.layout.channels)
    if not frame.format.is_planar:
        array = array.reshape(-1, channels).T
    name = frame.format.name.rstrip("p")
    if name == "s16":
        array = array.astype(np.float32) / 32768.0
    elif name == "s32":
        array = array.astype(np.float32) / 2147483648.0
    elif name == "u8":
        array = (array.astype(np.float32) - 128.0) / 128.0
    else:
        array = array.astype(np.float32)
    return array


def _audio_stream(container, path: str | os.PathLike):
    """The first audio stream of an open PyAV container and its sample rate."""
    if not container.streams.audio:
        raise MediaDecodeError(f"{path}: no audio stream")
    stream = container.streams.audio[0]
    return stream, int(stream.codec_context.sample_rate)


def decode_audio(
    path: str | os.PathLike, *, start_s: float | None = None, end_s: float | None = None
) -> AudioWindow:
    """Audio of the first audio stream between container times start_s and end_s (whole stream when None).

    Samples are placed by frame presentation time into a zero-filled buffer, so a gap in the stream stays a gap
    instead of pulling later audio earlier.
    """
    import av

    margin = 0.5
    try:
        with av.open(str(path)) as container:
            stream, rate = _audio_stream(container, path)
            tb = stream.time_base
            if start_s is not None and start_s > 2.0:
                # seek a little before the window: AAC needs a frame of pre-roll after a seek
                container.seek(int((start_s - 1.0) / tb), stream=stream, backward=True)
            pieces: list[tuple[float, np.ndarray]] = []
            next_time: float | None = None
            for packet in container.demux(stream):
                for frame in packet.decode():
                    samples = _frame_to_float(frame)
                    t = float(frame.pts * tb) if frame.pts is not None else next_time
                    if t is None:
                        t = 0.0
                    next_time = t + samples.shape[1] / rate
                    if start_s is not None and next_time < start_s - margin:
                        continue
                    pieces.append((t, samples))
                if end_s is not None and next_time is not None and next_time > end_s + margin:
                    break
    except av.error.FFmpegError as e:
        raise MediaDecodeError(f"{path}: cannot decode the audio stream ({e})") from None
    if not pieces:
        raise MediaDecodeError(f"{path}: the audio stream has no samples in the requested range")
    first = pieces[0][0]
    channels = max(p[1].shape[0] for p in pieces)
    last = max(t + p.shape[1] / rate for t, p in pieces)
    total = int(round((last - first) * rate))
    buffer = np.zeros((channels, total), np.float32)
    for t, samples in pieces:
        i0 = int(round((t - first) * rate))
        n = min(samples.shape[1], total - i0)
        if n > 0:
            buffer[: samples.shape[0], i0 : i0 + n] = samples[:, :n]
    return AudioWindow(buffer, rate, first)


def audio_envelope(path: str | os.PathLike, hop_s: float) -> tuple[np.ndarray, float]:
    """(RMS of the mono mixdown per hop_s bin [K], container time of bin 0), streamed: memory stays O(K) even for
    hour-long sources."""
    import av

    sums: list[float] = []
    counts: list[int] = []
    first: float | None = None
    try:
        with av.open(str(path)) as container:
            stream, rate = _audio_stream(container, path)
            hop = max(1, int(round(hop_s * rate)))
            next_time: float | None = None
            for frame in container.decode(stream):
                mono = _frame_to_float(frame).mean(axis=0).astype(np.float64)
                t = float(frame.pts * stream.time_base) if frame.pts is not None else (next_time or 0.0)
                next_time = t + mono.shape[0] / rate
                if first is None:
                    first = t
                start = int(round((t - first) * rate))
                if start < 0:
                    mono, start = mono[-start:], 0
                # add each sample's energy to its bin
                bins = (start + np.arange(mono.shape[0])) // hop
                if bins.size == 0:
                    continue
                need = int(bins[-1]) + 1
                if need > len(sums):
                    sums.extend([0.0] * (need - len(sums)))
                    counts.extend([0] * (need - len(counts)))
                energy = np.bincount(bins - bins[0], weights=mono * mono)
                number = np.bincount(bins - bins[0])
                b0 = int(bins[0])
                for k in range(energy.shape[0]):
                    sums[b0 + k] += float(energy[k])
                    counts[b0 + k] += int(number[k])
    except av.error.FFmpegError as e:
        raise MediaDecodeError(f"{path}: cannot decode the audio stream ({e})") from None
    if first is None:
        raise MediaDecodeError(f"{path}: the audio stream has no samples")
    sums_a, counts_a = np.array(sums), np.maximum(np.array(counts), 1)
    return np.sqrt(sums_a / counts_a + 1e-12), first


def resample_mono(samples: np.ndarray, rate: int, target_rate: int) -> np.ndarray:
    """[C, S] at rate -> mono float32 [S'] at target_rate (channel mean, then soxr high-quality resampling)."""
    mono = samples.mean(axis=0).astype(np.float32)
    if rate == target_rate:
        return mono
    import librosa

    return librosa.resample(mono, orig_sr=rate, target_sr=target_rate, res_type="soxr_hq").astype(np.float32)


# --------------------------------------------------------------------------------------------------------------
# video


def first_video_time(path: str | os.PathLike) -> float:
    """Presentation time (s) of the first decoded video frame on the container timeline."""
    import av

    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            for frame in container.decode(stream):
                if frame.pts is not None:
                    return float(frame.pts * stream.time_base)
                return float((stream.start_time or 0) * stream.time_base)
    except (av.error.FFmpegError, IndexError) as e:
        raise MediaDecodeError(f"{path}: cannot decode the video stream ({e})") from None
    raise MediaDecodeError(f"{path}: the video stream has no frames")


def frame_times(path: str | os.PathLike) -> np.ndarray:
    """[N] start time of every frame, relative to the first frame (decord's index)."""
    import decord

    try:
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
        stamps = reader.get_frame_timestamp(list(range(len(reader))))[:, 0].astype(np.float64)
    except (decord.DECORDError, RuntimeError) as e:
        raise MediaDecodeError(f"{path}: cannot index the video frames ({e})") from None
    if stamps.size == 0:
        raise MediaDecodeError(f"{path}: the video stream has no frames")
    return stamps - stamps[0]


def select_frames(times_rel: np.ndarray, wanted: np.ndarray, source_fps: float) -> np.ndarray:
    """Index of the source frame on screen at each wanted time (relative to the first frame)."""
    # a frame whose start is within a tenth of a frame (or 1 ms) of the wanted time counts as on screen
    tolerance = min(1e-3, 0.1 / max(source_fps, 1.0))
    index = np.searchsorted(times_rel, wanted + tolerance, side="right") - 1
    return np.clip(index, 0, len(times_rel) - 1)


# Source frames held at once while decoding: a 1080p clip decodes in chunks of 10 frames, an 8K one frame by frame,
# so the memory of one clip no longer grows with the source resolution times the clip length.
CHUNK_BYTES = 64 << 20
# Sources above 4K UHD decode with PyAV, frame by frame in order: decord decodes ahead in a thread of its own and
# holds the frames it made while the consumer resizes (2.7 GB for 17 frames of 8K), PyAV holds one. For smaller
# sources decord's seeking is faster and its buffers small.
PYAV_ABOVE_PIXELS = 3840 * 2160


def frames_per_chunk(height: int, width: int, bytes_per_value: int = 1) -> int:
    return max(1, CHUNK_BYTES // (height * width * 3 * bytes_per_value))


class _DecordLayoutBug(Exception):
    """decord 0.6.0 returned a frame of the wrong layout (a few small widths): decode with PyAV instead."""


def _chunks_decord(path: str, indices: np.ndarray, height: int, width: int) -> Iterator[np.ndarray]:
    import decord

    reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
    # One frame at a time, in order (`get_batch` holds about twice a batch's bytes, and a seek back makes decord
    # allocate again), grouped into chunks; a chunk of one frame is a view, not a copy.
    step, pending, last, picture = frames_per_chunk(height, width), [], None, None
    for index in indices:
        if int(index) != last:
            last, picture = int(index), reader[int(index)].asnumpy()
            if picture.shape != (height, width, 3):
                raise _DecordLayoutBug()
        pending.append(picture)
        if len(pending) >= step:
            yield pending[0][None] if len(pending) == 1 else np.stack(pending)
            pending = []
    if pending:
        yield pending[0][None] if len(pending) == 1 else np.stack(pending)


def _chunks_pyav(path: str, indices: np.ndarray, height: int, width: int) -> Iterator[np.ndarray]:
    import av

    step, wanted, pending = frames_per_chunk(height, width), [int(i) for i in indices], []
    position = 0
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "NONE"  # no decoder threads holding frames ahead of use
        for index, frame in enumerate(container.decode(stream)):
            if position < len(wanted) and index == wanted[position]:
                picture = frame.to_ndarray(format="rgb24")
                while position < len(wanted) and wanted[position] == index:  # a frame shown twice
                    pending.append(picture)
                    position += 1
                if len(pending) >= step:
                    yield np.stack(pending)
                    pending = []
            if position == len(wanted):
                break
    if position < len(wanted):
        raise MediaDecodeError(
            f"{path}: frames {wanted[position : position + 5]} could not be decoded (truncated file?)"
        )
    if pending:
        yield np.stack(pending)


def iter_frames(
    path: str | os.PathLike, indices: np.ndarray, height: int, width: int
) -> Iterator[np.ndarray]:
    """uint8 [n, H, W, 3] RGB frames at the source size, in `indices` order (non-decreasing), a bounded chunk at a
    time (CHUNK_BYTES)."""
    import av
    import decord

    indices = np.asarray(indices)
    try:
        if height * width > PYAV_ABOVE_PIXELS:
            yield from _chunks_pyav(str(path), indices, height, width)
            return
        started = False
        try:
            for chunk in _chunks_decord(str(path), indices, height, width):
                started = True
                yield chunk
        except _DecordLayoutBug:
            if started:  # a later frame only: cannot happen for one stream, but never yield frames twice
                raise MediaDecodeError(f"{path}: decord changed the frame layout mid-stream") from None
            yield from _chunks_pyav(str(path), indices, height, width)
    except (decord.DECORDError, RuntimeError, av.error.FFmpegError) as e:
        raise MediaDecodeError(f"{path}: cannot decode video frames ({e})") from None


def decode_frames(path: str | os.PathLike, indices: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [len(indices), H, W, 3] RGB frames at the source size (all at once: for small sources)."""
    return np.concatenate(list(iter_frames(path, indices, height, width)))


def resize_cover(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [N, h, w, 3] -> [N, height, width, 3]: scale to cover the target (keep aspect), centre-crop."""
    import torch
    import torch.nn.functional as F

    n, h, w, _ = frames.shape
    if (h, w) == (height, width):
        return frames
    scale = max(height / h, width / w)
    new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
    top, left = (new_h - height) // 2, (new_w - width) // 2
    out = np.empty((n, height, width, 3), np.uint8)
    step = min(16, frames_per_chunk(h, w, bytes_per_value=4))  # chunks bound the float memory
    for i0 in range(0, n, step):
        x = torch.from_numpy(frames[i0 : i0 + step]).permute(0, 3, 1, 2).float()  # [n, 3, h, w]
        x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
        x = x[:, :, top : top + height, left : left + width]
        out[i0 : i0 + step] = x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return out


# --------------------------------------------------------------------------------------------------------------
# one clip


@dataclass
class AlignedClip:
    frames: np.ndarray  # uint8 [N, H, W, 3]
    audio: np.ndarray  # float32 [S] mono at sample_rate
    sample_rate: int
    audio_offset_s: float  # time of audio sample 0 minus time of video frame 0 after alignment
    stream_offset_s: float  # measured: audio content start minus first video frame, corrected for
    notes: list[str] = field(default_factory=list)

    def content_sha256(self, caption: str) -> str:
        digest = hashlib.sha256()
        digest.update(np.ascontiguousarray(self.frames).tobytes())
        digest.update(np.ascontiguousarray(self.audio, dtype="<f4").tobytes())
        digest.update(caption.encode("utf-8"))
        return digest.hexdigest()


def num_audio_samples(num_frames: int, fps: float, sample_rate: int = TARGET_SAMPLE_RATE) -> int:
    """floor(sr * N / fps): the reference's audio length for N frames (386,000 for 193 frames at 24 fps)."""
    return int(math.floor(sample_rate * num_frames / fps + 1e-9))


def load_clip(row: dict, *, sample_rate: int = TARGET_SAMPLE_RATE) -> AlignedClip:
    """Decode, resize/crop and align one clip-plan row (see the module docstring for the time base)."""
    path = row["path"]
    fps, num_frames = float(row["fps"]), int(row["num_frames"])
    start_s = float(row["start_s"])
    notes: list[str] = []

    times = frame_times(path)
    wanted = start_s + np.arange(num_frames) / fps
    indices = select_frames(times, wanted, float(row.get("source_fps") or fps))
    if wanted[-1] > times[-1] + 1.5 / max(float(row.get("source_fps") or fps), 1.0):
        raise MediaDecodeError(f"{path}: clip {row['clip_id']} runs past the last video frame")
    source_size = int(row["source_height"]), int(row["source_width"])
    frames = np.concatenate(  # resized chunk by chunk: never the whole clip at the source resolution
        [
            resize_cover(c, int(row["height"]), int(row["width"]))
            for c in iter_frames(path, indices, *source_size)
        ]
    )

    video_t0 = float(row["video_start_s"]) + start_s  # container time of clip frame 0
    count = num_audio_samples(num_frames, fps, sample_rate)
    window = decode_audio(path, start_s=video_t0, end_s=video_t0 + count / sample_rate)
    audio = resample_mono(window.samples, window.sample_rate, sample_rate)
    exact = (video_t0 - window.start_s) * sample_rate
    first = int(round(exact))
    residual = (first - exact) / sample_rate
    lead = max(0, -first)
    piece = audio[max(0, first) : max(0, first) + count - lead]
    tail = count - lead - piece.shape[0]
    if lead or tail:
        notes.append(
            f"audio padded with silence: {lead / sample_rate:.3f} s before, {tail / sample_rate:.3f} s after"
        )
    aligned = np.concatenate([np.zeros(lead, np.float32), piece, np.zeros(tail, np.float32)])
    stream_offset = float(row.get("audio_start_s", 0.0)) - float(row["video_start_s"])
    return AlignedClip(frames, aligned, sample_rate, residual, stream_offset, notes)
