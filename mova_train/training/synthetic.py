"""Random latent shards in the shard contract, for trainer tests and `python -m mova_train.bench train`.

They have the exact shapes the codecs of a checkpoint would produce (and its codec identity in the manifest), but
random contents: good for exercising the trainer, not for learning anything. Real data: `python -m data_tools`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from mova_train.data.contract import bucket_name
from mova_train.data.synthetic import make_synthetic_sample, write_shard_set

SAMPLE_RATE = 48_000


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
    if (num_frames - 1) % 4 or height % 16 or width % 16:
        raise ValueError(
            f"num_frames must be 4k+1 and height/width multiples of 16, got {num_frames}, {height}x{width}"
        )
    g = torch.Generator().manual_seed(seed)
    shards: list[list] = [[] for _ in range(num_shards)]
    for i in range(num_clips):
        sample = make_synthetic_sample(
            f"clip{i:05d}",
            bucket=bucket_name(height, width),
            num_frames=num_frames,
            num_audio_samples=int(SAMPLE_RATE * num_frames / fps),
            num_tokens=text_tokens,
            text_dim=text_dim,
            audio_channels=audio_channels,
            codec_identity=codec_identity,
            generator=g,
            fps=fps,
        )
        shards[i % num_shards].append(sample)
    write_shard_set(out_dir, shards, codec_identity=codec_identity, checkpoint_identity="random")
    return Path(out_dir)


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
