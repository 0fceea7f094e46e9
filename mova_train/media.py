"""Media helpers shared by the sampler and data_tools: mp4 with audio in and out, and an audio-video sync measure.

Layouts: frames are uint8 [N, H, W, 3] RGB; audio is mono float32 [S] in [-1, 1]; times are seconds from the first
video frame (frame n is shown at n / fps, audio sample k plays at k / sr).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

__all__ = [
    "AvSync",
    "MediaError",
    "compute_av_sync",
    "measure_av_offset",
    "read_mp4",
    "write_mp4",
]


class MediaError(ValueError):
    """Bad media input: wrong layout/dtype, unreadable or missing file, unsupported size."""


# ---------------------------------------------------------------------------------------------------------------
# writing


def _fps_fraction(fps: float) -> Fraction:
    # 24 -> 24/1, 30000/1001 -> 30000/1001; a rational rate keeps timestamps exact and the file deterministic
    return Fraction(fps).limit_denominator(1001)


def _pick_video_codec(av) -> str:
    for name in ("libx264", "h264", "mpeg4"):
        try:
            av.codec.Codec(name, "w")
            return name
        except Exception:  # noqa: BLE001 - PyAV raises different errors per build for a missing encoder
            continue
    raise MediaError("write_mp4: no H.264 or MPEG-4 encoder available in this PyAV/FFmpeg build")


def _check_frames(frames: np.ndarray, where: str) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise MediaError(
            f"{where}: frames must be uint8 [N, H, W, 3], got dtype {frames.dtype} shape {tuple(frames.shape)}"
        )
    if frames.shape[0] < 1:
        raise MediaError(f"{where}: no frames to write")
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        raise MediaError(f"{where}: H.264/MPEG-4 in yuv420p need even sizes, got {height}x{width}")
    return np.ascontiguousarray(frames)


def _check_audio(audio: np.ndarray, where: str, *, allow_stereo: bool = False) -> np.ndarray:
    """Mono float32 [S] in [-1, 1] (or [C, S], C in 1..2, with allow_stereo)."""
    audio = np.asarray(audio)
    if audio.ndim == 2 and 1 in audio.shape:
        audio = audio.reshape(-1)
    if not (audio.ndim == 1 or (allow_stereo and audio.ndim == 2 and audio.shape[0] == 2)):
        want = "mono [S] or stereo [2, S]" if allow_stereo else "mono [S]"
        raise MediaError(f"{where}: audio must be {want}, got shape {tuple(audio.shape)}")
    if not np.issubdtype(audio.dtype, np.floating):
        raise MediaError(f"{where}: audio must be float in [-1, 1], got dtype {audio.dtype}")
    if not np.all(np.isfinite(audio)):
        raise MediaError(f"{where}: audio contains NaN or Inf")
    return np.clip(audio.astype(np.float32), -1.0, 1.0)


def write_mp4(
    path: str | os.PathLike,
    frames: np.ndarray,
    fps: float,
    audio: np.ndarray | None = None,
    sample_rate: int = 48000,
    *,
    crf: int = 18,
    audio_bitrate: int = 192_000,
    preset: str = "medium",
    video_start_s: float = 0.0,
    audio_start_s: float = 0.0,
    frame_times_s: np.ndarray | None = None,
) -> Path:
    """Write frames (uint8 [N,H,W,3]) and optional audio (float32 [S], or stereo [2,S]) as an mp4 (H.264 + AAC).

    The same inputs give a byte-identical file: bitexact flags drop version strings and timestamps, and the encoder
    runs with a fixed thread count. The audio is written as given (trim it to the clip duration first). The file
    appears atomically (written to a temp name in the same folder, then renamed).

    `video_start_s` / `audio_start_s` place the first frame / sample on the container timeline, and
    `frame_times_s` [N] gives each frame its own time (variable frame rate): data_tools uses them to write test
    media whose streams start apart, as real files do.
    """
    import av

    path = Path(path)
    frames = _check_frames(frames, f"write_mp4({path})")
    if not (fps > 0 and math.isfinite(fps)):
        raise MediaError(f"write_mp4({path}): fps must be a positive number, got {fps}")
    if audio is not None:
        audio = _check_audio(audio, f"write_mp4({path})", allow_stereo=True)
        if int(sample_rate) <= 0:
            raise MediaError(f"write_mp4({path}): sample_rate must be positive, got {sample_rate}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    rate = _fps_fraction(float(fps))
    codec = _pick_video_codec(av)
    try:
        with av.open(str(tmp), mode="w", format="mp4", options={"fflags": "+bitexact"}) as container:
            container.metadata.clear()
            height, width = frames.shape[1:3]
            vstream = container.add_stream(codec, rate=rate)
            vstream.width, vstream.height, vstream.pix_fmt = width, height, "yuv420p"
            timed = frame_times_s is not None or video_start_s != 0.0
            # a 90 kHz clock (the mp4 convention) when frames carry their own times, else one tick per frame
            vstream.time_base = Fraction(1, 90000) if timed else Fraction(1, 1) / rate
            if timed:
                vstream.codec_context.time_base = vstream.time_base
            vstream.codec_context.flags |= av.codec.context.Flags.bitexact
            # One thread and no SIMD: x264's output depends on its thread count, and its assembly paths differed
            # between identical runs in 2 of 12 trials with the bundled PyAV build; asm=0 gave 20/20 identical files.
            vstream.codec_context.thread_count = 1
            if codec == "libx264":
                vstream.options = {
                    "crf": str(crf),
                    "preset": preset,
                    "threads": "1",
                    "x264-params": "asm=0",
                }
            else:
                vstream.codec_context.bit_rate = int(8 * width * height * float(rate))
            astream = None
            if audio is not None:
                astream = container.add_stream("aac", rate=int(sample_rate))
                astream.layout = "mono" if audio.ndim == 1 else "stereo"
                astream.codec_context.bit_rate = audio_bitrate * (1 if audio.ndim == 1 else 2)
                astream.codec_context.flags |= av.codec.context.Flags.bitexact
                astream.time_base = Fraction(1, int(sample_rate))
            for index, frame in enumerate(frames):
                vframe = av.VideoFrame.from_ndarray(frame, format="rgb24")
                if timed:
                    t = video_start_s + (
                        index / float(fps) if frame_times_s is None else float(frame_times_s[index])
                    )
                    vframe.pts = int(round(t * 90000))
                    vframe.time_base = vstream.time_base
                else:
                    vframe.pts = index
                for packet in vstream.encode(vframe):
                    container.mux(packet)
            for packet in vstream.encode():
                container.mux(packet)
            if astream is not None:
                _encode_audio(
                    av, container, astream, audio, first_sample=int(round(audio_start_s * sample_rate))
                )
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _encode_audio(av, container, astream, audio: np.ndarray, *, first_sample: int = 0) -> None:
    # feed fixed-size chunks; the encoder's FIFO regroups them into 1024-sample AAC frames
    chunk = 4096
    planar = audio if audio.ndim == 2 else audio[None, :]  # [C, S]
    for start in range(0, planar.shape[1], chunk):
        piece = np.ascontiguousarray(planar[:, start : start + chunk])
        if planar.shape[0] == 1:
            aframe = av.AudioFrame.from_ndarray(piece, format="flt", layout="mono")
        else:
            aframe = av.AudioFrame.from_ndarray(piece, format="fltp", layout="stereo")
        aframe.sample_rate = astream.codec_context.sample_rate
        aframe.pts = first_sample + start
        aframe.time_base = Fraction(1, aframe.sample_rate)
        for packet in astream.encode(aframe):
            container.mux(packet)
    for packet in astream.encode():
        container.mux(packet)


# ---------------------------------------------------------------------------------------------------------------
# reading


def read_mp4(
    path: str | os.PathLike, *, with_audio: bool = True
) -> tuple[np.ndarray, float, np.ndarray | None, int | None]:
    """Read a video file: (frames uint8 [N,H,W,3], fps, mono float32 audio [S] or None, sample rate or None).

    Video is decoded with decord, audio with PyAV at the file's own sample rate (multi-channel audio is averaged to
    mono). Works for any container FFmpeg reads, not only mp4. Stream start times are not applied: frame 0 and
    sample 0 are both taken as t = 0, which is right for files written by `write_mp4`; sources whose streams start
    at different times need an aligned decode (data_tools does that).
    """
    path = Path(path)
    if not path.is_file():
        raise MediaError(f"read_mp4: no such file: {path}")
    frames, fps = _read_frames_decord(path)
    if frames is None:
        frames, fps = _read_frames_pyav(path)
    if frames.shape[0] == 0:
        raise MediaError(f"read_mp4: {path} has no video frames")
    audio, sample_rate = read_audio(path) if with_audio else (None, None)
    return frames, fps, audio, sample_rate


def _probe_video(path: Path) -> tuple[int, int]:
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise MediaError(f"read_mp4: {path} has no video stream")
            context = container.streams.video[0].codec_context
            return int(context.height), int(context.width)
    except av.error.FFmpegError as exc:
        raise MediaError(f"read_mp4: cannot open {path}: {exc}") from exc


def _read_frames_decord(path: Path) -> tuple[np.ndarray | None, float]:
    """Frames via decord; None when decord returns a wrong layout.

    Workaround (decord 0.6.0): for some small widths (16, 48) decord returns [H, W, 4 or 6] garbage instead of RGB;
    we detect the mismatch against the stream's probed size and let the PyAV path decode instead.
    """
    import decord

    height, width = _probe_video(path)
    try:
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
        fps = float(reader.get_avg_fps())
        frames = reader.get_batch(list(range(len(reader)))).asnumpy() if len(reader) else None
        del reader
    except decord.DECORDError:
        return None, 0.0
    if frames is None or frames.shape[1:] != (height, width, 3):
        return None, 0.0
    return frames, fps


def _read_frames_pyav(path: Path) -> tuple[np.ndarray, float]:
    import av

    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    except av.error.FFmpegError as exc:
        raise MediaError(f"read_mp4: cannot decode the video stream of {path}: {exc}") from exc
    if not frames:
        raise MediaError(f"read_mp4: {path} has no video frames")
    return np.stack(frames), float(rate) if rate else 0.0


def read_audio(path: str | os.PathLike) -> tuple[np.ndarray | None, int | None]:
    """The first audio stream of a media file as mono float32 [S] at its own rate; (None, None) without audio."""
    import av

    path = Path(path)
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                return None, None
            stream = container.streams.audio[0]
            sample_rate = int(stream.codec_context.sample_rate)
            # decode to planar float, averaging channels
            resampler = av.AudioResampler(format="fltp", layout="mono", rate=sample_rate)
            pieces: list[np.ndarray] = []
            end_s = 0.0
            for packet in container.demux(stream):
                if packet.pts is not None and packet.duration and packet.time_base:
                    end_s = max(end_s, float((packet.pts + packet.duration) * packet.time_base))
                for frame in packet.decode():
                    for out in resampler.resample(frame):
                        pieces.append(out.to_ndarray().reshape(-1))
            for out in resampler.resample(None):
                pieces.append(out.to_ndarray().reshape(-1))
    except av.error.FFmpegError as exc:
        raise MediaError(f"read_audio: cannot decode the audio stream of {path}: {exc}") from exc
    audio = np.concatenate(pieces).astype(np.float32) if pieces else np.zeros(0, np.float32)
    if end_s > 0:
        # AAC decodes whole 1024-sample frames; the packets' timing says where the real signal ends
        audio = audio[: int(round(end_s * sample_rate))]
    return audio, sample_rate


# ---------------------------------------------------------------------------------------------------------------
# audio-video sync


@dataclass
class AvSync:
    """Result of `compute_av_sync`. offset_s > 0 means the audio events come later than the visual ones."""

    offset_s: float  # NaN when either signal has no events
    confidence: float  # peak normalised cross-correlation in [0, 1]; 0 when nothing to correlate
    lags_s: np.ndarray  # [K] candidate offsets
    correlation: np.ndarray  # [K] normalised cross-correlation per lag
    visual_onsets: np.ndarray  # [N] visual onset strength per frame
    audio_onsets: np.ndarray  # [N * SUBFRAMES] audio onset strength on a quarter-frame grid


def visual_onset_strength(frames: np.ndarray) -> np.ndarray:
    """Per-frame visual onset strength [N]: mean positive luminance increase against the previous frame.

    Half-wave rectification (like spectral flux) fires on a flash's onset but not on its decay, and on moving edges.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise MediaError(f"visual_onset_strength: frames must be [N, H, W, 3], got {tuple(frames.shape)}")
    luma = frames[..., 0] * 0.299 + frames[..., 1] * 0.587 + frames[..., 2] * 0.114  # [N, H, W]
    luma = luma.astype(np.float32) / (255.0 if frames.dtype == np.uint8 else 1.0)
    onsets = np.zeros(frames.shape[0], np.float32)
    if frames.shape[0] > 1:
        onsets[1:] = np.clip(np.diff(luma, axis=0), 0.0, None).mean(axis=(1, 2))
    return onsets


def audio_onset_strength(audio: np.ndarray, sample_rate: int, rate: float, num_bins: int) -> np.ndarray:
    """Audio onset strength [num_bins] at `rate` bins per second: positive increase of log RMS energy.

    Bin n covers samples [n·sr/rate, (n+1)·sr/rate); with rate = fps, bin n is the time frame n is on screen.
    """
    audio = np.asarray(audio, dtype=np.float64).reshape(-1)
    edges = np.round(np.arange(num_bins + 1) * (sample_rate / rate)).astype(np.int64)
    energy = np.zeros(num_bins, np.float64)
    for n in range(num_bins):
        piece = audio[edges[n] : edges[n + 1]]
        energy[n] = float(np.mean(piece * piece)) if piece.size else 0.0
    log_energy = np.log10(energy + 1e-8)  # floor at -80 dB so silence is flat
    onsets = np.zeros(num_bins, np.float32)
    if num_bins > 1:
        onsets[1:] = np.clip(np.diff(log_energy), 0.0, None)
    return onsets


# audio onsets are measured on SUBFRAMES bins per video frame, so offsets resolve to a quarter frame
SUBFRAMES = 4


def compute_av_sync(
    frames: np.ndarray, fps: float, audio: np.ndarray, sample_rate: int, *, max_offset_s: float = 1.0
) -> AvSync:
    """Cross-correlate visual and audio onset strengths over lags within ±max_offset_s (see AvSync).

    The visual onsets are impulses at each frame's start time on a grid of SUBFRAMES bins per frame; the audio
    onsets are measured on the same grid. Each lag's score is the normalised (biased) cross-correlation of the
    mean-removed signals, so lags that leave little overlap score low; the peak is refined with a parabola through
    its neighbours.
    """
    if not (fps > 0 and sample_rate > 0):
        raise MediaError(f"compute_av_sync: fps and sample_rate must be positive, got {fps}, {sample_rate}")
    visual = visual_onset_strength(frames).astype(np.float64)
    num_frames = visual.shape[0]
    num_bins = num_frames * SUBFRAMES
    bin_rate = fps * SUBFRAMES
    sound = audio_onset_strength(audio, sample_rate, bin_rate, num_bins).astype(np.float64)
    visual_grid = np.zeros(num_bins, np.float64)
    visual_grid[::SUBFRAMES] = visual
    # lags up to half the clip, so every score rests on at least half of it
    max_lag = max(0, min(int(round(max_offset_s * bin_rate)), num_bins // 2))
    lags = np.arange(-max_lag, max_lag + 1)
    visual_grid -= visual_grid.mean()
    sound -= sound.mean()
    denom = math.sqrt(float(np.dot(visual_grid, visual_grid)) * float(np.dot(sound, sound)))
    correlation = np.zeros(lags.shape[0], np.float64)
    if denom > 1e-12:
        for i, lag in enumerate(lags):
            # the audio event at bin n + lag pairs with the visual event at bin n
            v = visual_grid[max(0, -lag) : num_bins - max(0, lag)]
            a = sound[max(0, lag) : num_bins - max(0, -lag)]
            correlation[i] = float(np.dot(v, a)) / denom
    best = int(np.argmax(correlation))
    peak = float(correlation[best])
    if peak <= 0.0:
        offset = float("nan")
        confidence = 0.0
    else:
        shift = 0.0
        if 0 < best < len(lags) - 1:
            left, right = correlation[best - 1], correlation[best + 1]
            curvature = left - 2.0 * peak + right
            if curvature < 0:
                shift = float(np.clip(0.5 * (left - right) / curvature, -0.5, 0.5))
        offset = float((lags[best] + shift) / bin_rate)
        confidence = min(1.0, peak)
    return AvSync(
        offset_s=offset,
        confidence=confidence,
        lags_s=(lags / bin_rate).astype(np.float32),
        correlation=correlation.astype(np.float32),
        visual_onsets=visual.astype(np.float32),
        audio_onsets=sound.astype(np.float32),
    )


def measure_av_offset(
    frames: np.ndarray, fps: float, audio: np.ndarray, sample_rate: int, *, max_offset_s: float = 1.0
) -> tuple[float, float]:
    """(offset_seconds, confidence) of audio onsets against visual motion/flash events, by cross-correlation.

    offset > 0: audio late. Offset is NaN and confidence 0 when the clip has no correlated events (e.g. silence or
    a static picture).
    """
    result = compute_av_sync(frames, fps, audio, sample_rate, max_offset_s=max_offset_s)
    return result.offset_s, result.confidence
