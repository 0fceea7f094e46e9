"""The shard set that `data.shards` names: a folder with `manifest.json` or a brace-expanded URL list, resolved
to shard URLs in canonical order with their sample counts, and the fingerprint a saved loader state records."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from webdataset.shardlists import expand_urls

from mova_train.checkpoint_io import sha256_file
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

    @functools.cached_property
    def checksums(self) -> tuple[str | None, ...]:
        """Each shard's sha256 from the manifest (None where no manifest lists it)."""
        by_name = {s.name: s.sha256 for s in self.manifest.shards} if self.manifest is not None else {}
        return tuple(by_name.get(n) or None for n in self.names)

    def fingerprint(self) -> str:
        """Names, counts and content checksums (from the manifest), not paths: a moved shard folder still resumes,
        shards of the same names and counts with other content do not."""
        text = "\n".join(f"{n}:{c}:{h}" for n, c, h in zip(self.names, self.num_samples, self.checksums))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


# Shards whose bytes matched (or did not match) the manifest in this process, by (path, size, mtime): each is
# hashed once, not on every epoch; a quarantined one is refused without being read again.
_VERIFIED: set[tuple[str, int, int]] = set()
_QUARANTINED: dict[tuple[str, int, int], str] = {}


def _hash_check(url: str, key: tuple[str, int, int], sha256: str) -> None:
    try:
        digest = sha256_file(url)
    except OSError as e:  # removed or unreadable since it was listed: the same handling as a corrupt shard
        _QUARANTINED[key] = f"shard {url}: cannot be read to check its sha256 ({e})"
        return
    if digest == sha256:
        _VERIFIED.add(key)
    else:
        _QUARANTINED[key] = (
            f"shard {url}: its bytes do not hash to the manifest's sha256 {sha256[:16]}… (changed or corrupt since "
            "it was written): quarantined, none of its samples is used; `python -m data_tools verify` checks the "
            "whole folder"
        )


class _AheadHasher:
    """One background thread per process that hashes the shard a reader will open next while it reads the
    current one (hashlib releases the GIL), so verification costs the loader little beyond the first shard."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mova-shard-sha256")
        self.pending: dict[tuple[str, int, int], Future] = {}


_AHEAD: _AheadHasher | None = None


def _ahead() -> _AheadHasher:
    global _AHEAD
    if _AHEAD is None or _AHEAD.pid != os.getpid():  # a forked loader worker starts its own thread
        _AHEAD = _AheadHasher()
    return _AHEAD


def _key(url: str) -> tuple[str, int, int] | None:
    try:
        st = Path(url).stat()
    except OSError:
        return None
    return (url, st.st_size, st.st_mtime_ns)


def forget_verified() -> None:
    """Drop this process's record of verified and quarantined shards (the next read hashes them again)."""
    _VERIFIED.clear()
    _QUARANTINED.clear()


def verify_shard_ahead(url: str, sha256: str | None) -> None:
    """Start hashing a shard that will be read soon (a no-op when there is nothing to check)."""
    if sha256 is None or not _is_local(url):
        return
    key = _key(url)
    if key is None or key in _VERIFIED or key in _QUARANTINED:
        return
    ahead = _ahead()
    if key not in ahead.pending:
        ahead.pending[key] = ahead.pool.submit(_hash_check, url, key, sha256)


def verify_shard(url: str, sha256: str | None) -> None:
    """Raise ShardReadError naming the shard when its bytes do not hash to the manifest's sha256. Local files
    only (a remote URL is checked by whoever serves it); a shard verified once is not hashed again unless it
    changed on disk."""
    if sha256 is None or not _is_local(url):
        return
    key = _key(url)
    if key is None:
        raise ShardReadError(f"shard {url}: cannot open (missing or unreadable)")
    if key not in _VERIFIED and key not in _QUARANTINED:
        pending = _ahead().pending.pop(key, None)
        if pending is not None:
            pending.result()
        else:
            _hash_check(url, key, sha256)
    if key in _QUARANTINED:
        raise ShardReadError(_QUARANTINED[key])


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
