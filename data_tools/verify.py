"""`data_tools verify SHARDS`: re-read every shard of a shard folder and check it against `manifest.json`.

Checks: each listed shard exists with the listed size and sha256; every sample has exactly the contract's members,
decodes (JSON + safetensors, never pickle), passes the contract's validation (schema, fields, shapes, finite
values, codec identity) and matches the manifest's shapes for its bucket; clip ids are unique; sample counts match.
With `--checkpoint`, the codec identity must also match that checkpoint's codecs. Prints statistics (clips per
bucket, hours, caption lengths). Exit code 0 when everything holds, 1 when a check failed.
"""

from __future__ import annotations

import argparse
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_tools.common import DataToolsError, progress, sha256_file
from data_tools.shards import TMP_SUFFIX
from mova_train.data.contract import (
    SAMPLE_KEYS,
    ShardFormatError,
    decode_sample,
    load_manifest,
    shapes_key,
    validate_sample,
)


@dataclass
class VerifyResult:
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    num_samples: int = 0
    buckets: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    caption_chars: list[int] = field(default_factory=list)
    caption_words: list[int] = field(default_factory=list)
    text_tokens: list[int] = field(default_factory=list)
    max_abs_audio_offset_s: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self) -> str:
        lines = [f"verify: {self.num_samples} clips, {self.seconds / 3600:.4f} h ({self.seconds:.1f} s)"]
        for bucket, count in sorted(self.buckets.items()):
            lines.append(f"  bucket {bucket}: {count} clips")
        if self.caption_chars:
            c, w, t = (np.array(x) for x in (self.caption_chars, self.caption_words, self.text_tokens))
            lines.append(
                f"  captions: {c.min()}-{c.max()} chars (mean {c.mean():.0f}), {w.min()}-{w.max()} words "
                f"(mean {w.mean():.1f}), {t.min()}-{t.max()} text tokens"
            )
        lines.append(f"  largest residual audio/video offset: {self.max_abs_audio_offset_s * 1e6:.1f} us")
        lines += [f"  warning: {w}" for w in self.warnings]
        lines += [f"  PROBLEM: {p}" for p in self.problems]
        lines.append("verify: OK" if self.ok else f"verify: FAILED ({len(self.problems)} problems)")
        return "\n".join(lines)


def _iter_samples(path: Path):
    """(key, {ext: bytes}) groups of a tar in member order; raises tarfile.TarError on a damaged file."""
    current_key, group = None, {}
    with tarfile.open(path, mode="r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            name = member.name.rsplit("/", 1)[-1]
            key, _, ext = name.partition(".")
            if key != current_key and group:
                yield current_key, group
                group = {}
            current_key = key
            if ext in group:
                raise tarfile.TarError(f"member {member.name} appears twice")
            group[ext] = tar.extractfile(member).read()
    if group:
        yield current_key, group


def verify(folder: str | Path, *, checkpoint: str | Path | None = None) -> VerifyResult:
    folder = Path(folder)
    if not folder.is_dir():
        raise DataToolsError(f"shard folder {folder} does not exist")
    try:
        manifest = load_manifest(folder)
    except ShardFormatError as e:
        raise DataToolsError(str(e)) from None
    result = VerifyResult()
    spec = manifest.sample_spec()
    if checkpoint is not None:
        from mova_train.codecs import codec_identity  # heavy (transformers, VAEs): only when asked

        expected = codec_identity(checkpoint)
        if expected != manifest.codec_identity:
            result.problems.append(
                f"codec identity {manifest.codec_identity[:16]}… differs from {checkpoint}'s codecs "
                f"{expected[:16]}…: re-encode the data with that checkpoint"
            )
    if manifest.empty_prompt_file:  # caption dropout's empty-prompt embedding, when the folder stores one
        path = folder / manifest.empty_prompt_file
        if not path.is_file() or sha256_file(path) != manifest.empty_prompt_sha256:
            result.problems.append(
                f"{manifest.empty_prompt_file}: missing or changed since encode (sha256 differs from manifest.json); "
                "rewrite it with python -m data_tools empty-prompt"
            )
    listed = {s.name for s in manifest.shards}
    for path in sorted(folder.glob("shard-*.tar")):
        if path.name not in listed:
            result.warnings.append(
                f"{path.name} is not listed in manifest.json and is ignored by the trainer"
            )
    for path in sorted(folder.glob(f"shard-*.tar{TMP_SUFFIX}")):
        result.warnings.append(f"{path.name} is an unfinished shard of an interrupted run (rerun to resume)")

    seen: dict[str, str] = {}
    for info in progress(manifest.shards, total=len(manifest.shards), desc="verify", unit="shard"):
        path = folder / info.name
        if not path.is_file():
            result.problems.append(f"{info.name}: listed in manifest.json but missing")
            continue
        if path.stat().st_size != info.num_bytes:
            result.problems.append(
                f"{info.name}: {path.stat().st_size} bytes, manifest.json says {info.num_bytes}"
            )
            continue
        if sha256_file(path) != info.sha256:
            result.problems.append(f"{info.name}: sha256 differs from manifest.json (corrupt or modified)")
            continue
        count = 0
        try:
            for key, members in _iter_samples(path):
                count += 1
                where = f"{info.name}"
                extra = sorted(set(members) - set(SAMPLE_KEYS))
                if extra:
                    result.warnings.append(f"{info.name}: sample {key!r} has extra members {extra}")
                try:
                    meta, tensors = decode_sample({"__key__": key, **members}, where=where)
                    validate_sample(meta, tensors, expect=spec, where=where)
                except ShardFormatError as e:
                    result.problems.append(str(e))
                    continue
                if meta["clip_id"] != key:
                    result.problems.append(
                        f"{info.name}: tar key {key!r} differs from clip_id {meta['clip_id']!r}"
                    )
                if key in seen:
                    result.problems.append(f"clip {key!r} appears in {seen[key]} and {info.name}")
                seen[key] = info.name
                want = manifest.shapes.get(
                    shapes_key(meta["bucket"], meta["num_frames"], manifest.frame_counts)
                )
                if want is None:
                    result.problems.append(
                        f"{info.name}: sample {key!r} has bucket {meta['bucket']} not in manifest"
                    )
                else:
                    for name, shape in want.items():
                        got = list(tensors[name].shape)
                        if name == "text":
                            ok = got[1:] == shape[1:]
                        else:
                            ok = got == list(shape)
                        if not ok:
                            result.problems.append(
                                f"{info.name}: sample {key!r} {name} shape {got}, manifest says {shape}"
                            )
                frames_ok = (
                    str(meta["num_frames"]) in manifest.frame_counts
                    if manifest.frame_counts
                    else meta["num_frames"] == manifest.num_frames
                )
                if not frames_ok or abs(meta["fps"] - manifest.fps) > 1e-6:
                    result.problems.append(
                        f"{info.name}: sample {key!r} has {meta['num_frames']} frames at {meta['fps']} fps, "
                        f"manifest says {manifest.num_frames} at {manifest.fps}"
                    )
                result.num_samples += 1
                result.buckets[meta["bucket"]] = result.buckets.get(meta["bucket"], 0) + 1
                result.seconds += meta["num_frames"] / meta["fps"]
                result.caption_chars.append(len(meta["caption"]))
                result.caption_words.append(len(meta["caption"].split()))
                result.text_tokens.append(int(tensors["text"].shape[0]))
                result.max_abs_audio_offset_s = max(
                    result.max_abs_audio_offset_s, abs(meta["audio_offset_s"])
                )
        except (tarfile.TarError, OSError) as e:
            result.problems.append(f"{info.name}: cannot be read as a tar file ({e})")
            continue
        if count != info.num_samples:
            result.problems.append(f"{info.name}: {count} samples, manifest.json says {info.num_samples}")
    if result.num_samples != manifest.num_samples and not result.problems:
        result.problems.append(
            f"{result.num_samples} samples in the shards, manifest.json says {manifest.num_samples}"
        )
    if manifest.buckets and result.buckets != manifest.buckets and not result.problems:
        result.problems.append(f"clips per bucket {result.buckets}, manifest.json says {manifest.buckets}")
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("shards", help="shard folder (with manifest.json)")
    parser.add_argument(
        "--checkpoint", default=None, help="also require the codec identity of this checkpoint's codecs"
    )


def run(args: argparse.Namespace) -> int:
    result = verify(args.shards, checkpoint=args.checkpoint)
    print(result.format())
    return 0 if result.ok else 1
