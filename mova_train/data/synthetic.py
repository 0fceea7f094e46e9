"""Random latent shards in the shard contract's layout, for the loader's tests and read benchmark.

These are already-encoded samples (random latents, no video behind them); `data_tools` makes real shards.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from webdataset import TarWriter

from mova_train.data.contract import (
    REQUIRED_TENSORS,
    SCHEMA_VERSION,
    Manifest,
    ShardInfo,
    encode_sample,
    manifest_shapes,
    parse_bucket,
    save_manifest,
    shapes_key,
    write_empty_prompt,
)
from mova_train.data.contract import shard_name as contract_shard_name

Sample = tuple[dict, dict[str, torch.Tensor]]


def make_synthetic_sample(
    clip_id: str,
    *,
    bucket: str = "32x48",
    num_frames: int = 9,
    num_audio_samples: int | None = None,
    num_tokens: int = 5,
    text_dim: int = 32,
    video_channels: int = 16,
    audio_channels: int = 8,
    codec_identity: str = "synthetic-codecs",
    dtype: torch.dtype = torch.float32,
    generator: torch.Generator | None = None,
    fps: float = 24.0,
) -> Sample:
    """One clip's metadata and random latents, consistent with each other as `validate_sample` requires."""
    height, width = parse_bucket(bucket)
    if num_audio_samples is None:
        num_audio_samples = round(num_frames / fps * 48000)
    t_lat = (num_frames - 1) // 4 + 1
    meta = {
        "clip_id": clip_id,
        "source": f"synthetic/{clip_id}.mp4",
        "start_s": 0.0,
        "end_s": num_frames / fps,
        "fps": fps,
        "num_frames": num_frames,
        "height": height,
        "width": width,
        "bucket": bucket,
        "audio_sample_rate": 48000,
        "num_audio_samples": num_audio_samples,
        "audio_offset_s": 0.0,
        "caption": f"synthetic clip {clip_id}",
        "content_sha256": hashlib.sha256(clip_id.encode()).hexdigest(),
        "codec_identity": codec_identity,
        "data_tools_version": "synthetic",
        "schema_version": SCHEMA_VERSION,
    }
    g = generator
    tensors = {
        "video": torch.randn(video_channels, t_lat, height // 8, width // 8, generator=g).to(dtype),
        "first_frame": torch.randn(video_channels, t_lat, height // 8, width // 8, generator=g).to(dtype),
        "audio": torch.randn(audio_channels, math.ceil(num_audio_samples / 960), generator=g).to(dtype),
        "text": torch.randn(num_tokens, text_dim, generator=g).to(dtype),
    }
    return meta, tensors


def shard_name(index: int, rank: int = 0) -> str:
    return contract_shard_name(rank, index)


def write_shard(path: str | os.PathLike, samples: Sequence[Sample]) -> None:
    """Write one tar shard (to a temp name, then rename) from (meta, tensors) pairs."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with TarWriter(str(tmp), encoder=False, mtime=0.0) as writer:
            for meta, tensors in samples:
                writer.write(encode_sample(meta, tensors))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_shard_set(
    out_dir: str | os.PathLike,
    shards: Sequence[Sequence[Sample]],
    *,
    codec_identity: str = "synthetic-codecs",
    checkpoint_identity: str = "synthetic-checkpoint",
    empty_prompt: torch.Tensor | None = None,
) -> Manifest:
    """Write `shards[i]` as `shard-000-0000i.tar` plus a `manifest.json` describing them; returns the manifest.
    `empty_prompt` ([n_tokens, Dt]) is stored as the set's empty-prompt embedding (for caption dropout)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    infos, buckets, shapes = [], {}, {}
    first_meta, first_tensors = shards[0][0]
    frame_counts: dict[str, int] = {}
    for meta, _ in (s for shard in shards for s in shard):
        frame_counts[str(meta["num_frames"])] = frame_counts.get(str(meta["num_frames"]), 0) + 1
    for i, samples in enumerate(shards):
        path = out / shard_name(i)
        write_shard(path, samples)
        data = path.read_bytes()
        infos.append(ShardInfo(path.name, hashlib.sha256(data).hexdigest(), len(samples), len(data)))
        for meta, tensors in samples:
            buckets[meta["bucket"]] = buckets.get(meta["bucket"], 0) + 1
            shapes.setdefault(
                shapes_key(meta["bucket"], meta["num_frames"], frame_counts),
                manifest_shapes({n: tensors[n].shape for n in REQUIRED_TENSORS}),
            )
    all_samples = [s for shard in shards for s in shard]
    manifest = Manifest(
        codec_identity=codec_identity,
        checkpoint_identity=checkpoint_identity,
        num_samples=len(all_samples),
        shards=infos,
        buckets=dict(sorted(buckets.items())),
        shapes=dict(sorted(shapes.items())),
        video_channels=first_tensors["video"].shape[0],
        audio_channels=first_tensors["audio"].shape[0],
        text_dim=first_tensors["text"].shape[-1],
        fps=float(first_meta["fps"]),
        num_frames=first_meta["num_frames"],
        total_seconds=sum(m["end_s"] - m["start_s"] for m, _ in all_samples),
        options={"synthetic": True},
        data_tools_version="synthetic",
        frame_counts=dict(sorted(frame_counts.items(), key=lambda kv: int(kv[0]))),
    )
    if empty_prompt is not None:
        manifest.empty_prompt_file, manifest.empty_prompt_sha256 = write_empty_prompt(out, empty_prompt)
    save_manifest(out, manifest)
    return manifest


def write_synthetic_shards(
    out_dir: str | os.PathLike,
    *,
    num_shards: int = 4,
    samples_per_shard: int = 6,
    buckets: Sequence[str] = ("32x48", "48x32"),
    num_frames: int = 9,
    text_dim: int = 32,
    audio_channels: int = 8,
    max_tokens: int = 12,
    codec_identity: str = "synthetic-codecs",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> dict[str, Sample]:
    """A shard folder of random samples cycling through `buckets`; returns {clip id: (meta, tensors)}."""
    g = torch.Generator().manual_seed(seed)
    shards, by_key = [], {}
    for i in range(num_shards):
        samples = []
        for k in range(samples_per_shard):
            key = f"clip_{i:03d}_{k:03d}"
            num_tokens = int(torch.randint(1, max_tokens + 1, (1,), generator=g))
            sample = make_synthetic_sample(
                key,
                bucket=buckets[(i * samples_per_shard + k) % len(buckets)],
                num_frames=num_frames,
                num_tokens=num_tokens,
                text_dim=text_dim,
                audio_channels=audio_channels,
                codec_identity=codec_identity,
                dtype=dtype,
                generator=g,
            )
            samples.append(sample)
            by_key[key] = sample
        shards.append(samples)
    write_shard_set(out_dir, shards, codec_identity=codec_identity)
    return by_key
