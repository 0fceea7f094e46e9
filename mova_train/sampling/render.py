"""Writing renders: an mp4 with muxed audio, and a PNG contact sheet (frames, waveform, spectrogram, A/V sync).

Layouts as in sampler.Render: frames uint8 [N, H, W, 3], audio float32 [S].
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import numpy as np

from mova_train.media import AvSync, compute_av_sync, write_mp4

CONTACT_COLUMNS = 4
CONTACT_ROWS = 2


def render_stem(index: int, prompt: str, seed: int) -> str:
    """A file-system-safe, stable name: '000-a-dog-barks-s42'."""
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:40].strip("-") or "render"
    return f"{index:03d}-{slug}-s{seed}"


def save_render(render, out_dir: str | os.PathLike, stem: str, *, contact_sheet: bool = True) -> dict:
    """Write `<stem>.mp4` (H.264 + AAC 48 kHz) and `<stem>.png`; return paths and the A/V sync figure."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mp4 = write_mp4(out_dir / f"{stem}.mp4", render.video, render.fps, render.audio, render.sample_rate)
    sync = compute_av_sync(render.video, render.fps, render.audio, render.sample_rate)
    record = {
        "prompt": render.prompt,
        "negative_prompt": render.negative_prompt,
        "seed": render.seed,
        "image": render.image,
        "num_frames": int(render.video.shape[0]),
        "height": int(render.video.shape[1]),
        "width": int(render.video.shape[2]),
        "fps": render.fps,
        "sample_rate": render.sample_rate,
        "num_audio_samples": int(render.audio.shape[0]),
        "mp4": str(mp4),
        "av_offset_s": None if math.isnan(sync.offset_s) else round(sync.offset_s, 6),
        "av_confidence": round(sync.confidence, 6),
    }
    if contact_sheet:
        record["contact_sheet"] = str(
            write_contact_sheet(out_dir / f"{stem}.png", render.video, render.audio, render.sample_rate,
                                fps=render.fps, title=render.prompt, sync=sync)
        )  # fmt: skip
    return record


def write_contact_sheet(
    path: str | os.PathLike,
    frames: np.ndarray,
    audio: np.ndarray,
    sample_rate: int,
    *,
    fps: float,
    title: str = "",
    sync: AvSync | None = None,
) -> Path:
    """A PNG: a grid of evenly spaced frames, the waveform, a log-magnitude spectrogram, and the A/V sync curve.

    Uses matplotlib's object API (no pyplot), so it touches no global backend state and is safe in threads.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    num_frames = frames.shape[0]
    count = min(num_frames, CONTACT_COLUMNS * CONTACT_ROWS)
    picks = np.unique(np.linspace(0, num_frames - 1, count).round().astype(int))
    rows = math.ceil(len(picks) / CONTACT_COLUMNS)
    aspect = frames.shape[1] / frames.shape[2]
    fig = Figure(figsize=(12, 2.9 * rows * aspect * 1.3 + 6.5), dpi=100)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(rows + 3, CONTACT_COLUMNS, height_ratios=[aspect * 3] * rows + [1.6, 2.2, 1.6])
    for i, frame_index in enumerate(picks):
        ax = fig.add_subplot(grid[i // CONTACT_COLUMNS, i % CONTACT_COLUMNS])
        ax.imshow(frames[frame_index], interpolation="nearest")
        ax.set_title(f"frame {frame_index} ({frame_index / fps:.2f} s)", fontsize=8)
        ax.axis("off")
    seconds = np.arange(audio.shape[0]) / sample_rate
    duration = num_frames / fps
    wave_ax = fig.add_subplot(grid[rows, :])
    wave_ax.plot(seconds, audio, linewidth=0.4, color="tab:blue")
    wave_ax.set_xlim(0, duration)
    wave_ax.set_ylim(-1.05, 1.05)
    wave_ax.set_ylabel("waveform", fontsize=8)
    wave_ax.tick_params(labelsize=7)
    spec_ax = fig.add_subplot(grid[rows + 1, :], sharex=wave_ax)
    spectrum, extent = _log_spectrogram(audio, sample_rate)
    spec_ax.imshow(
        spectrum, origin="lower", aspect="auto", extent=extent, cmap="magma", interpolation="nearest"
    )
    spec_ax.set_ylabel("kHz", fontsize=8)
    spec_ax.tick_params(labelsize=7)
    sync_ax = fig.add_subplot(grid[rows + 2, :])
    if sync is not None:
        sync_ax.plot(sync.lags_s, sync.correlation, color="tab:green", linewidth=1.0)
        if not math.isnan(sync.offset_s):
            sync_ax.axvline(sync.offset_s, color="tab:red", linewidth=0.8)
        label = (
            "no A/V events to correlate"
            if math.isnan(sync.offset_s)
            else f"A/V offset {sync.offset_s * 1000:+.0f} ms (audio late if +), confidence {sync.confidence:.2f}"
        )
        sync_ax.set_title(label, fontsize=8)
    sync_ax.set_xlabel("lag (s)", fontsize=8)
    sync_ax.set_ylabel("xcorr", fontsize=8)
    sync_ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title[:160], fontsize=10)
    fig.subplots_adjust(left=0.06, right=0.98, top=0.93, bottom=0.05, hspace=0.45, wspace=0.05)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        # no Software/date metadata, so the same render gives the same bytes
        fig.savefig(tmp, format="png", metadata={"Software": None})
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _log_spectrogram(audio: np.ndarray, sample_rate: int, n_fft: int = 1024, hop: int = 256):
    """dB magnitude [F, frames] of a Hann-windowed STFT and its imshow extent (seconds, kHz)."""
    audio = np.asarray(audio, dtype=np.float32)
    if audio.shape[0] < n_fft:
        audio = np.pad(audio, (0, n_fft - audio.shape[0]))
    window = np.hanning(n_fft).astype(np.float32)
    count = 1 + (audio.shape[0] - n_fft) // hop
    index = np.arange(n_fft)[None, :] + hop * np.arange(count)[:, None]
    magnitude = np.abs(np.fft.rfft(audio[index] * window, axis=1)).T  # [F, frames]
    db = 20.0 * np.log10(magnitude + 1e-6)
    db = np.maximum(db, db.max() - 80.0)
    extent = (0.0, audio.shape[0] / sample_rate, 0.0, sample_rate / 2000.0)
    return db, extent
