"""Reading one shard: its samples as raw tar members (only the contract's two members, never anything that could
be unpickled), and the checks that turn one raw sample into a batchable sample or a rejection with its reason."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext, tar_file_iterator

from mova_train.data.batch import ParsedSample, group_key
from mova_train.data.contract import (
    JSON_KEY,
    LATENTS_KEY,
    REQUIRED_TENSORS,
    SAMPLE_KEYS,
    Manifest,
    SampleSpec,
    ShardFormatError,
    all_finite,
    decode_sample,
    shapes_key,
    validate_sample,
)
from mova_train.data.errors import ShardReadError

# Rejection reasons reported in `.stats["rejected"]`.
REASONS = (
    "missing_member",  # the sample lacks `json` or `latents.safetensors`
    "decode_error",  # metadata not JSON or latents not safetensors
    "codec_identity",  # encoded by other codecs than the manifest / base checkpoint
    "non_finite",  # NaN or Inf in a latent
    "invalid",  # metadata or shapes break the contract (validate_sample)
    "key_mismatch",  # tar key differs from metadata clip_id
    "shape_mismatch",  # shapes differ from the manifest's shapes for the bucket
    "text_too_long",  # more text tokens than text_len
    "corrupt_shard",  # samples lost to a truncated or unreadable shard
)


class Rejection(NamedTuple):
    reason: str  # one of REASONS
    message: str


def _wanted_member(fname: str) -> bool:
    # Only the contract's two members are ever read; anything else (e.g. a pickle someone added) is skipped unread.
    return fname.endswith("." + JSON_KEY) or fname.endswith("." + LATENTS_KEY)


def iter_shard(url: str, *, skip: int = 0) -> Iterator[tuple[int, dict]]:
    """Yield `(index, raw sample)` for the complete samples of a tar shard, from sample `skip` on.

    A raw sample is `{"__key__": key, "json": bytes, "latents.safetensors": bytes}` (members may be missing).
    Skipped samples are passed over without being kept. Raises ShardReadError naming the shard when it cannot be
    opened or ends in the middle of a member; the sample being read at that point is dropped.
    """
    try:
        stream = gopen(url, "rb")
    except Exception as e:
        raise ShardReadError(f"shard {url}: cannot open ({type(e).__name__}: {e})") from None
    index = 0
    current: dict | None = None
    try:
        for member in tar_file_iterator(stream, select_files=_wanted_member):
            prefix, suffix = base_plus_ext(member["fname"])
            if prefix is None:
                continue
            if current is None or prefix != current["__key__"]:
                if current is not None:
                    if index >= skip:
                        yield index, current
                    index += 1
                current = {"__key__": prefix}
            if suffix in current:
                raise ShardReadError(
                    f"shard {url}: member {member['fname']!r} appears twice in sample {prefix!r}"
                )
            current[suffix] = member["data"] if index >= skip else b""
        if current is not None and index >= skip:
            yield index, current
    except ShardReadError:
        raise
    except Exception as e:  # tarfile/zlib/OS errors of a truncated or corrupt archive
        detail = str(e).split(" @ ")[0]  # webdataset appends the repr of the file object
        raise ShardReadError(
            f"shard {url}: corrupt or truncated tar after {index} complete sample(s) ({type(e).__name__}: {detail})"
        ) from None
    finally:
        stream.close()


def count_shard_samples(url: str) -> int:
    """Number of samples in a shard (reads it through; raises ShardReadError if it is truncated)."""
    return sum(1 for _ in iter_shard(url))


@dataclass(frozen=True)
class SampleChecks:
    """What a raw sample must satisfy to be batched (from the data config, the manifest and the trainer)."""

    text_len: int
    spec: SampleSpec
    sample_identity: str | None  # codec identity every sample must carry (None: not checked)
    validate: bool  # data.validate
    buckets: list[str] | None  # data.buckets
    manifest: Manifest | None

    def parse(self, raw: dict, j: int, index: int, url: str) -> ParsedSample | Rejection | None:
        """A valid sample, a rejection (reason, message), or None if data.buckets filters it out."""
        key = raw["__key__"]
        at = f"sample {key!r} in {url}"
        missing = [k for k in SAMPLE_KEYS if k not in raw]
        if missing:
            return Rejection("missing_member", f"{at}: missing member(s) {missing}")
        try:
            meta, tensors = decode_sample(raw, where=url)
        except ShardFormatError as e:
            return Rejection("decode_error", str(e))
        identity = meta.get("codec_identity")
        if self.sample_identity is not None and identity != self.sample_identity:
            return Rejection(
                "codec_identity", f"{at}: codec identity {identity!r}, expected {self.sample_identity!r}"
            )
        absent = [n for n in REQUIRED_TENSORS if n not in tensors]
        if absent or not isinstance(meta.get("bucket"), str):
            return Rejection("invalid", f"{at}: latents lack {absent} or metadata lacks 'bucket'")
        tensors = {n: tensors[n] for n in REQUIRED_TENSORS}  # optional extra features are not batched
        if self.validate:
            bad = [
                n for n in REQUIRED_TENSORS if tensors[n].is_floating_point() and not all_finite(tensors[n])
            ]
            if bad:
                return Rejection("non_finite", f"{at}: {bad} hold NaN or Inf")
            try:
                validate_sample(meta, tensors, expect=self.spec, where=url, check_finite=False)
            except ShardFormatError as e:
                return Rejection("invalid", str(e))
            if meta["clip_id"] != key:
                return Rejection("key_mismatch", f"{at}: metadata clip_id is {meta['clip_id']!r}")
            problem = self.manifest_shape_problem(meta, tensors)
            if problem:
                return Rejection("shape_mismatch", f"{at}: {problem}")
        elif tensors["text"].ndim != 2:
            return Rejection(
                "invalid", f"{at}: text embedding shape {list(tensors['text'].shape)}, expected [tokens, D]"
            )
        if tensors["text"].shape[0] > self.text_len:
            n = tensors["text"].shape[0]
            return Rejection("text_too_long", f"{at}: {n} text tokens > text_len {self.text_len}")
        if self.buckets is not None and meta["bucket"] not in self.buckets:
            return None
        return ParsedSample([j, index, key], group_key(meta, tensors), meta, tensors)

    def manifest_shape_problem(self, meta: dict, tensors: dict[str, torch.Tensor]) -> str | None:
        manifest = self.manifest
        if manifest is None or not manifest.shapes:
            return None
        key = shapes_key(meta["bucket"], meta.get("num_frames"), manifest.frame_counts)
        shapes = manifest.shapes.get(key)
        if shapes is None:
            return f"bucket {key!r} is not in the manifest (buckets: {sorted(manifest.shapes)})"
        for name, want in shapes.items():
            if name not in tensors:
                continue
            got = list(tensors[name].shape)
            if len(got) != len(want) or any(w != -1 and w != g for w, g in zip(want, got)):
                return f"{name} shape {got}, the manifest says {want} for bucket {key}"
        return None
