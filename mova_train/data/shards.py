"""The shard set that `data.shards` names: a folder with `manifest.json` or a brace-expanded URL list, resolved
to shard URLs in canonical order with their sample counts, and the fingerprint a saved loader state records."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

from webdataset.shardlists import expand_urls

from mova_train.data.contract import MANIFEST_NAME, Manifest, ShardFormatError, load_manifest
from mova_train.data.errors import ShardReadError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardSet:
    """The shards to read, in canonical order, with their sample counts when a manifest gives them."""

    urls: tuple[str, ...]
    num_samples: tuple[int | None, ...]
    manifest: Manifest | None = None
    manifest_path: str | None = None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(u.rstrip("/").rsplit("/", 1)[-1] for u in self.urls)

    def fingerprint(self) -> str:
        """Names and counts, not paths, so a moved shard folder still resumes."""
        text = "\n".join(f"{n}:{c}" for n, c in zip(self.names, self.num_samples))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def resolve_shards(spec: str) -> ShardSet:
    """Read a shard folder's manifest, or expand a URL list (and use a manifest next to it when there is one)."""
    spec = spec.strip()
    folder = Path(spec)
    if _is_local(spec) and folder.is_dir():
        manifest = load_manifest(folder)
        if not manifest.shards:
            raise ShardFormatError(f"{folder / MANIFEST_NAME} lists no shards")
        urls = tuple(str(folder / s.name) for s in manifest.shards)
        missing = [u for u in urls if not Path(u).is_file()]
        if missing:
            raise ShardReadError(
                f"{len(missing)} shard(s) listed in {folder / MANIFEST_NAME} are missing, e.g. {missing[0]}"
            )
        for s, u in zip(manifest.shards, urls):
            size = Path(u).stat().st_size
            if s.num_bytes and size != s.num_bytes:
                logger.warning(
                    "shard %s has %d bytes, the manifest says %d: truncated or rewritten?",
                    u,
                    size,
                    s.num_bytes,
                )
        counts = tuple(s.num_samples for s in manifest.shards)
        return ShardSet(urls, counts, manifest, str(folder / MANIFEST_NAME))

    try:
        urls = tuple(expand_urls(spec))
    except (AssertionError, ValueError) as e:  # webdataset asserts on an unset ${VAR}
        raise ValueError(f"data.shards {spec!r} cannot be expanded: {e}") from None
    if not urls:
        raise ValueError(f"data.shards {spec!r} expands to no shard")
    if len(set(urls)) != len(urls):
        raise ValueError(f"data.shards {spec!r} names some shard twice")
    if _is_local(spec) and not any(ch in spec for ch in "{}") and spec.endswith(MANIFEST_NAME):
        raise ValueError(f"data.shards: give the folder {str(Path(spec).parent)!r}, not its {MANIFEST_NAME}")
    local = all(_is_local(u) for u in urls)
    if local:
        missing = [u for u in urls if not Path(u).is_file()]
        if missing:
            raise ShardReadError(f"data.shards: {len(missing)} shard file(s) not found, e.g. {missing[0]}")
    manifest = manifest_path = None
    counts: tuple[int | None, ...] = (None,) * len(urls)
    parents = {str(Path(u).parent) for u in urls} if local else set()
    if len(parents) == 1:
        parent = Path(parents.pop())
        if (parent / MANIFEST_NAME).is_file():
            manifest = load_manifest(parent)
            manifest_path = str(parent / MANIFEST_NAME)
            by_name = {s.name: s.num_samples for s in manifest.shards}
            unknown = [u for u in urls if Path(u).name not in by_name]
            if unknown:
                raise ShardFormatError(f"{manifest_path} does not list shard {unknown[0]}")
            counts = tuple(by_name[Path(u).name] for u in urls)
    return ShardSet(urls, counts, manifest, manifest_path)
