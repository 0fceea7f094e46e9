"""The shard contract between data_tools (writer) and the trainer (reader): sample layout, validation, manifest.

A sample is one clip: `<key>.json` (metadata) and `<key>.latents.safetensors` (named tensors). Payloads are JSON and
safetensors only, so a shard can never run code on the node that reads it.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from mova_train.checkpoint_io import write_bytes_atomic, write_json_atomic

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
JSON_KEY = "json"
LATENTS_KEY = "latents.safetensors"
SAMPLE_KEYS = (JSON_KEY, LATENTS_KEY)
REQUIRED_TENSORS = ("video", "first_frame", "audio", "text")
LATENT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
KEY_PATTERN = re.compile(r"^[A-Za-z0-9_-]+$")
# The unpadded text embedding of the empty prompt "", stored once per shard set for caption dropout.
EMPTY_PROMPT_NAME = "empty_prompt.safetensors"
EMPTY_PROMPT_TENSOR = "text"  # [n_tokens, Dt]

REQUIRED_META = {
    "clip_id": str,
    "source": str,
    "start_s": (int, float),
    "end_s": (int, float),
    "fps": (int, float),
    "num_frames": int,
    "height": int,
    "width": int,
    "bucket": str,
    "audio_sample_rate": int,
    "num_audio_samples": int,
    "audio_offset_s": (int, float),
    "caption": str,
    "content_sha256": str,
    "codec_identity": str,
    "data_tools_version": str,
    "schema_version": int,
}


class ShardFormatError(ValueError):
    """A sample, shard or manifest that breaks the contract; the message says which one and why."""


@dataclass(frozen=True)
class SampleSpec:
    """What every sample of a shard set must look like (derived from the manifest or the base checkpoint)."""

    video_channels: int = 16
    audio_channels: int = 128
    text_dim: int | None = None
    temporal_stride: int = 4
    spatial_stride: int = 8
    audio_hop: int = 960
    codec_identity: str | None = None


def shard_name(rank: int, index: int) -> str:
    """File name of the `index`-th shard written by `rank` (the manifest lists the names the loader reads)."""
    return f"shard-{rank:03d}-{index:05d}.tar"


def bucket_name(height: int, width: int) -> str:
    return f"{height}x{width}"


def parse_bucket(bucket: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)x(\d+)", bucket.strip())
    if not m:
        raise ValueError(f"bucket {bucket!r} is not of the form HxW (e.g. 352x640)")
    return int(m.group(1)), int(m.group(2))


def encode_sample(meta: dict, tensors: dict[str, torch.Tensor]) -> dict[str, bytes | str]:
    """Serialise one clip to the members of a WebDataset sample (`__key__` = clip id)."""
    key = meta.get("clip_id", "")
    if not isinstance(key, str) or not KEY_PATTERN.match(key):
        raise ShardFormatError(f"clip_id {key!r} must be non-empty and use only letters, digits, '_' and '-'")
    payload = {k: v.detach().to("cpu").contiguous() for k, v in sorted(tensors.items())}
    return {
        "__key__": key,
        JSON_KEY: (json.dumps(meta, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8"),
        LATENTS_KEY: st_save(payload),
    }


def decode_sample(sample: dict, *, where: str = "") -> tuple[dict, dict[str, torch.Tensor]]:
    """Parse the raw members of a sample (bytes) into (metadata, tensors); never unpickles anything."""
    key = sample.get("__key__", "?")
    at = f"sample {key!r}" + (f" in {where}" if where else "")
    missing = [k for k in SAMPLE_KEYS if k not in sample]
    if missing:
        present = sorted(k for k in sample if not k.startswith("__"))
        raise ShardFormatError(f"{at}: missing member(s) {missing}; present: {present}")
    try:
        meta = json.loads(bytes(sample[JSON_KEY]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ShardFormatError(f"{at}: metadata is not UTF-8 JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ShardFormatError(f"{at}: metadata must be a JSON object")
    try:
        tensors = st_load(bytes(sample[LATENTS_KEY]))
    except Exception as e:  # safetensors raises its own error types for corrupt payloads
        raise ShardFormatError(f"{at}: latents are not a valid safetensors payload ({e})") from None
    return meta, tensors


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in `t`. max(|t|) propagates both: ~15x cheaper than isfinite(t).all() on 360p bf16 latents."""
    return t.numel() == 0 or bool(torch.isfinite(t.abs().amax()))


def validate_sample(
    meta: dict,
    tensors: dict[str, torch.Tensor],
    *,
    expect: SampleSpec,
    where: str = "",
    check_finite: bool = True,
) -> None:
    """Check metadata fields, tensor names, dtypes, shapes (against each other and the metadata) and finiteness
    (`check_finite=False` for a caller that has just checked it, e.g. the loader counting NaN samples apart)."""
    at = f"sample {meta.get('clip_id', '?')!r}" + (f" in {where}" if where else "")
    for name, typ in REQUIRED_META.items():
        if name not in meta:
            raise ShardFormatError(f"{at}: metadata lacks {name!r}")
        if not isinstance(meta[name], typ) or isinstance(meta[name], bool):
            raise ShardFormatError(f"{at}: metadata {name!r} has type {type(meta[name]).__name__}")
    if meta["schema_version"] != SCHEMA_VERSION:
        raise ShardFormatError(
            f"{at}: schema_version {meta['schema_version']}, this version reads {SCHEMA_VERSION}"
        )
    if expect.codec_identity is not None and meta["codec_identity"] != expect.codec_identity:
        raise ShardFormatError(
            f"{at}: encoded by codecs {meta['codec_identity'][:16]}…, the base checkpoint's are "
            f"{expect.codec_identity[:16]}…; re-encode the data with this checkpoint"
        )
    missing = [n for n in REQUIRED_TENSORS if n not in tensors]
    if missing:
        raise ShardFormatError(f"{at}: latents lack {missing}; present: {sorted(tensors)}")
    for name in REQUIRED_TENSORS:
        t = tensors[name]
        if t.dtype not in LATENT_DTYPES:
            raise ShardFormatError(f"{at}: {name} has dtype {t.dtype}; allowed: float32, bfloat16, float16")
        if check_finite and not all_finite(t):
            raise ShardFormatError(f"{at}: {name} holds NaN or Inf values")

    video, first, audio, text = (tensors[n] for n in REQUIRED_TENSORS)
    t_lat = (meta["num_frames"] - 1) // expect.temporal_stride + 1
    h_lat, w_lat = meta["height"] // expect.spatial_stride, meta["width"] // expect.spatial_stride
    want_video = (expect.video_channels, t_lat, h_lat, w_lat)
    if tuple(video.shape) != want_video:
        raise ShardFormatError(
            f"{at}: video latent shape {list(video.shape)}, expected {list(want_video)} for "
            f"{meta['num_frames']} frames at {meta['height']}x{meta['width']}"
        )
    if tuple(first.shape) != want_video:
        raise ShardFormatError(f"{at}: first_frame shape {list(first.shape)}, expected {list(want_video)}")
    want_audio = (expect.audio_channels, math.ceil(meta["num_audio_samples"] / expect.audio_hop))
    if tuple(audio.shape) != want_audio:
        raise ShardFormatError(
            f"{at}: audio latent shape {list(audio.shape)}, expected {list(want_audio)} for "
            f"{meta['num_audio_samples']} samples"
        )
    if (
        text.ndim != 2
        or text.shape[0] < 1
        or (expect.text_dim is not None and text.shape[1] != expect.text_dim)
    ):
        raise ShardFormatError(
            f"{at}: text embedding shape {list(text.shape)}, expected [tokens >= 1, {expect.text_dim or 'D'}]"
        )
    if meta["bucket"] != bucket_name(meta["height"], meta["width"]):
        raise ShardFormatError(
            f"{at}: bucket {meta['bucket']!r} does not match {meta['height']}x{meta['width']}"
        )


@dataclass
class ShardInfo:
    name: str
    sha256: str
    num_samples: int
    num_bytes: int


@dataclass
class Manifest:
    """`manifest.json` of a shard folder. Unknown fields are refused so a typo never passes silently."""

    codec_identity: str
    checkpoint_identity: str
    num_samples: int
    shards: list[ShardInfo]
    buckets: dict[str, int] = field(default_factory=dict)  # "HxW" -> clip count
    shapes: dict[str, dict[str, list[int]]] = field(
        default_factory=dict
    )  # bucket -> tensor -> shape (text: [-1, D])
    video_channels: int = 16
    audio_channels: int = 128
    text_dim: int = 4096
    fps: float = 24.0
    num_frames: int = 193
    audio_sample_rate: int = 48000
    total_seconds: float = 0.0
    options: dict = field(default_factory=dict)
    data_tools_version: str = ""
    schema_version: int = SCHEMA_VERSION
    frame_counts: dict[str, int] = field(
        default_factory=dict
    )  # frames per clip ("49", "97", ...) -> clip count
    empty_prompt_file: str = (
        ""  # EMPTY_PROMPT_NAME when the set stores it ("" = shards written before it existed)
    )
    empty_prompt_sha256: str = ""

    def sample_spec(self) -> SampleSpec:
        return SampleSpec(
            video_channels=self.video_channels,
            audio_channels=self.audio_channels,
            text_dim=self.text_dim,
            codec_identity=self.codec_identity,
        )


def shapes_key(bucket: str, num_frames: int, frame_counts: Mapping[str, int] | None) -> str:
    """The `Manifest.shapes` key of a clip: its bucket "HxW", or "HxW/F" (F frames) in a set whose clips have
    several frame counts (`data_tools prepare --frames 49,97,193`), where one bucket holds several shapes."""
    return bucket if not frame_counts or len(frame_counts) < 2 else f"{bucket}/{num_frames}"


def manifest_shapes(shapes: Mapping[str, Sequence[int]]) -> dict[str, list[int]]:
    """A bucket's `Manifest.shapes` entry from one sample's tensor shapes: the text length varies from sample to
    sample, so text is recorded as [-1, D]."""
    out = {name: list(shape) for name, shape in shapes.items()}
    out["text"] = [-1, out["text"][-1]]
    return out


def write_empty_prompt(folder: str | Path, text: torch.Tensor) -> tuple[str, str]:
    """Write a shard set's empty-prompt embedding `text` [n_tokens, Dt] as EMPTY_PROMPT_NAME; returns the
    (file name, sha256) the manifest records (`empty_prompt_file`, `empty_prompt_sha256`)."""
    if text.ndim != 2 or text.shape[0] < 1:
        raise ShardFormatError(
            f"the empty-prompt embedding must be [n_tokens >= 1, D], got {list(text.shape)}"
        )
    data = st_save({EMPTY_PROMPT_TENSOR: text.detach().to("cpu").contiguous()})
    write_bytes_atomic(Path(folder) / EMPTY_PROMPT_NAME, data)
    return EMPTY_PROMPT_NAME, hashlib.sha256(data).hexdigest()


def save_manifest(folder: str | Path, manifest: Manifest) -> None:
    write_json_atomic(Path(folder) / MANIFEST_NAME, asdict(manifest))


def load_manifest(folder: str | Path) -> Manifest:
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise ShardFormatError(
            f"no {MANIFEST_NAME} in {folder}: is this a shard folder written by data_tools?"
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ShardFormatError(f"{path} is not valid JSON ({e})") from None
    known = {f.name for f in fields(Manifest)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ShardFormatError(f"{path}: unknown field(s) {unknown}")
    if raw.get("schema_version") != SCHEMA_VERSION:
        raise ShardFormatError(
            f"{path}: schema_version {raw.get('schema_version')}, this version reads {SCHEMA_VERSION}"
        )
    try:
        raw["shards"] = [ShardInfo(**s) for s in raw.get("shards", [])]
        return Manifest(**raw)
    except TypeError as e:
        raise ShardFormatError(f"{path}: {e}") from None
