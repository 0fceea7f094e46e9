"""The `manifest.json` of an encoded shard folder, built by rank 0 from the journals of all ranks."""

from __future__ import annotations

from pathlib import Path

from data_tools.common import DATA_TOOLS_VERSION
from data_tools.shards import journal_path, read_journal
from mova_train.data.contract import Manifest, ShardInfo, manifest_shapes, save_manifest, shapes_key


def build_manifest(
    out: Path,
    world_size: int,
    codecs,
    checkpoint_identity: str,
    options: dict,
    *,
    empty_prompt: tuple[str, str] = ("", ""),
) -> Manifest:
    """Rank 0, after every rank finished: one manifest over the journals of all ranks. `empty_prompt`: the
    (file name, sha256) of the set's empty-prompt embedding (`encode.write_empty_prompt_file`)."""
    shards: list[ShardInfo] = []
    buckets: dict[str, int] = {}
    frame_counts: dict[str, int] = {}
    records = [r for rank in range(world_size) for r in read_journal(journal_path(out, rank)) if r.name]
    for record in records:
        for s in record.samples:
            frames = str(s.get("num_frames", options.get("num_frames")))  # journals of older runs lack it
            frame_counts[frames] = frame_counts.get(frames, 0) + 1
    shapes: dict[str, dict[str, list[int]]] = {}
    seconds = 0.0
    fps = num_frames = None
    for record in records:
        shards.append(ShardInfo(record.name, record.sha256, len(record.clip_ids), record.num_bytes))
        for s in record.samples:
            buckets[s["bucket"]] = buckets.get(s["bucket"], 0) + 1
            seconds += s["seconds"]
            shapes.setdefault(
                shapes_key(s["bucket"], s.get("num_frames", options.get("num_frames")), frame_counts),
                manifest_shapes(s["shapes"]),
            )
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
        frame_counts=dict(sorted(frame_counts.items(), key=lambda kv: int(kv[0]))),
        empty_prompt_file=empty_prompt[0],
        empty_prompt_sha256=empty_prompt[1],
    )
    save_manifest(out, manifest)
    return manifest
