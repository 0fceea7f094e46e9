"""The `manifest.json` of an encoded shard folder, built by rank 0 from the journals of all ranks."""

from __future__ import annotations

from pathlib import Path

from data_tools.common import DATA_TOOLS_VERSION
from data_tools.shards import journal_path, read_journal
from mova_train.data.contract import Manifest, ShardInfo, manifest_shapes, save_manifest


def build_manifest(out: Path, world_size: int, codecs, checkpoint_identity: str, options: dict) -> Manifest:
    """Rank 0, after every rank finished: one manifest over the journals of all ranks."""
    shards: list[ShardInfo] = []
    buckets: dict[str, int] = {}
    shapes: dict[str, dict[str, list[int]]] = {}
    seconds = 0.0
    fps = num_frames = None
    for rank in range(world_size):
        for record in read_journal(journal_path(out, rank)):
            if not record.name:
                continue
            shards.append(ShardInfo(record.name, record.sha256, len(record.clip_ids), record.num_bytes))
            for s in record.samples:
                buckets[s["bucket"]] = buckets.get(s["bucket"], 0) + 1
                seconds += s["seconds"]
                shapes.setdefault(s["bucket"], manifest_shapes(s["shapes"]))
    shards.sort(key=lambda s: s.name)
    fps = options.get("fps")
    num_frames = options.get("num_frames")
    manifest = Manifest(
        codec_identity=codecs.identity,
        checkpoint_identity=checkpoint_identity,
        num_samples=sum(s.num_samples for s in shards),
        shards=shards,
        buckets=dict(sorted(buckets.items())),
        shapes=dict(sorted(shapes.items())),
        video_channels=16,
        audio_channels=int(codecs.audio_latent_dim),
        text_dim=int(codecs.text_dim),
        fps=float(fps) if fps is not None else 24.0,
        num_frames=int(num_frames) if num_frames is not None else 193,
        audio_sample_rate=int(codecs.sample_rate),
        total_seconds=round(seconds, 6),
        options=options,
        data_tools_version=DATA_TOOLS_VERSION,
    )
    save_manifest(out, manifest)
    return manifest
