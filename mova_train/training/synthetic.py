"""Random latent shards in the shard contract, for trainer tests and `python -m mova_train.bench train`.

They have the exact shapes the codecs of a checkpoint would produce (and its codec identity in the manifest), but
random contents: good for exercising the trainer, not for learning anything. Real data: `python -m data_tools`.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import torch

from mova_train.data.contract import (
    SCHEMA_VERSION,
    Manifest,
    ShardInfo,
    bucket_name,
    encode_sample,
    save_manifest,
)

SAMPLE_RATE = 48_000
AUDIO_HOP = 960


def write_random_shards(
    out_dir: str | os.PathLike,
    *,
    codec_identity: str,
    text_dim: int,
    num_clips: int = 1,
    num_shards: int = 1,
    num_frames: int = 5,
    height: int = 32,
    width: int = 32,
    fps: float = 24.0,
    text_tokens: int = 7,
    audio_channels: int = 128,
    seed: int = 0,
) -> Path:
    """Write `num_clips` random clips round-robin into `num_shards` tar shards plus manifest.json; returns out_dir."""
    import webdataset as wds

    if (num_frames - 1) % 4 or height % 16 or width % 16:
        raise ValueError(
            f"num_frames must be 4k+1 and height/width multiples of 16, got {num_frames}, {height}x{width}"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    t_lat, h_lat, w_lat = (num_frames - 1) // 4 + 1, height // 8, width // 8
    num_audio = int(SAMPLE_RATE * num_frames / fps)
    audio_len = math.ceil(num_audio / AUDIO_HOP)
    samples: list[list[dict]] = [[] for _ in range(num_shards)]
    for i in range(num_clips):
        key = f"clip{i:05d}"
        tensors = {
            "video": torch.randn(16, t_lat, h_lat, w_lat, generator=g),  # [16, T', h, w]
            "first_frame": torch.randn(16, t_lat, h_lat, w_lat, generator=g),
            "audio": torch.randn(audio_channels, audio_len, generator=g),  # [Ca, L]
            "text": torch.randn(text_tokens, text_dim, generator=g),  # [n_tokens, Dt]
        }
        meta = {
            "clip_id": key,
            "source": f"random/{key}.mp4",
            "start_s": 0.0,
            "end_s": num_frames / fps,
            "fps": fps,
            "num_frames": num_frames,
            "height": height,
            "width": width,
            "bucket": bucket_name(height, width),
            "audio_sample_rate": SAMPLE_RATE,
            "num_audio_samples": num_audio,
            "audio_offset_s": 0.0,
            "caption": f"random clip {i}",
            "content_sha256": hashlib.sha256(key.encode()).hexdigest(),
            "codec_identity": codec_identity,
            "data_tools_version": "synthetic",
            "schema_version": SCHEMA_VERSION,
        }
        samples[i % num_shards].append(encode_sample(meta, tensors))
    infos = []
    for s, members in enumerate(samples):
        name = f"shard-000-{s:05d}.tar"
        tmp = out / (name + ".tmp")
        with wds.TarWriter(str(tmp)) as sink:
            for sample in members:
                sink.write(sample)
        os.replace(tmp, out / name)
        data = (out / name).read_bytes()
        infos.append(ShardInfo(name, hashlib.sha256(data).hexdigest(), len(members), len(data)))
    bucket = bucket_name(height, width)
    save_manifest(
        out,
        Manifest(
            codec_identity=codec_identity,
            checkpoint_identity="random",
            num_samples=num_clips,
            shards=infos,
            buckets={bucket: num_clips},
            shapes={
                bucket: {
                    "video": [16, t_lat, h_lat, w_lat],
                    "first_frame": [16, t_lat, h_lat, w_lat],
                    "audio": [audio_channels, audio_len],
                    "text": [-1, text_dim],
                }
            },
            text_dim=text_dim,
            audio_channels=audio_channels,
            fps=fps,
            num_frames=num_frames,
            total_seconds=num_clips * num_frames / fps,
            options={"generator": "mova_train.training.synthetic", "seed": seed},
            data_tools_version="synthetic",
        ),
    )
    return out


def write_random_shards_for(checkpoint_dir: str | os.PathLike, out_dir: str | os.PathLike, **kwargs) -> Path:
    """Random shards whose shapes and codec identity match a checkpoint (text width from its config)."""
    from mova_train.codecs import codec_identity
    from mova_train.models.checkpoint import read_mova_config

    config = read_mova_config(checkpoint_dir)
    return write_random_shards(
        out_dir,
        codec_identity=codec_identity(checkpoint_dir),
        text_dim=config.text_dim,
        audio_channels=config.audio_latent_dim,
        **kwargs,
    )
