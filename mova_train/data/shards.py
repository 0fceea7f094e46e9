"""The shard sets that `data.shards` names: a folder with `manifest.json` or a brace-expanded URL list, resolved
to shard URLs in canonical order with their sample counts, and the fingerprint a saved loader state records; or a
list of such sets, each with `repeats` or a `weight`, mixed into one stream (`ShardMix`)."""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
import random
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


def resolve_shards(spec: Any) -> ShardSet | ShardMix:
    """The shards `spec` (a data.shards value) names: one `ShardSet` for a folder or URL list, a `ShardMix` for a
    list of shard sets. Both give the `fingerprint()` a saved loader state records."""
    if isinstance(spec, str):
        return resolve_shard_set(spec)
    return resolve_mix(spec)


def resolve_shard_set(spec: str) -> ShardSet:
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


# ---------------------------------------------------------------------------------------------------------------
# Several shard sets mixed into one stream

SOURCE_KEYS = ("path", "repeats", "weight")


def normalize_shard_spec(spec: Any, name: str = "data.shards") -> str | list[dict]:
    """`data.shards` as a stripped string (one shard set) or a list of `{path, repeats}` / `{path, weight}` dicts
    (a plain string entry is `{path: it}`). Raises ValueError naming the entry and field (`data.shards[1].weight`).

    `repeats` (integer >= 1) reads a set that many times per epoch; `weight` (number > 0) gives a set that share of
    the stream's samples relative to the other sets' weights, whatever their sizes. One list uses one of the two:
    an entry without it has repeats 1 / weight 1."""
    if isinstance(spec, str):
        if not spec.strip():
            raise ValueError(f"{name} must name a shard folder (with manifest.json) or a shard URL list")
        return spec.strip()
    if isinstance(spec, Mapping) or not isinstance(spec, Sequence) or not spec:
        raise ValueError(
            f"{name} must be a shard folder / URL list, or a non-empty list of shard sets "
            f"[{{path: DIR, repeats: N}} or {{path: DIR, weight: W}}, ...]; got {spec!r}"
        )
    entries: list[dict] = []
    for i, raw in enumerate(spec):
        at = f"{name}[{i}]"
        entry = {"path": raw} if isinstance(raw, str) else raw
        if not isinstance(entry, Mapping):
            raise ValueError(f"{at} must be a path or a mapping with keys {list(SOURCE_KEYS)}, got {raw!r}")
        unknown = sorted(set(entry) - set(SOURCE_KEYS))
        if unknown:
            raise ValueError(f"{at}: unknown key(s) {unknown}; allowed: {list(SOURCE_KEYS)}")
        path = entry.get("path")
        if not isinstance(path, str) or not path.strip():
            raise ValueError(f"{at}.path must name a shard folder or a shard URL list, got {path!r}")
        out = {"path": path.strip()}
        if "repeats" in entry:
            r = entry["repeats"]
            if isinstance(r, bool) or not isinstance(r, int) or r < 1:
                raise ValueError(f"{at}.repeats must be an integer >= 1, got {r!r}")
            out["repeats"] = r
        if "weight" in entry:
            w = entry["weight"]
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not (math.isfinite(w) and w > 0):
                raise ValueError(f"{at}.weight must be a number > 0, got {w!r}")
            out["weight"] = float(w)
        entries.append(out)
    weighted = [i for i, e in enumerate(entries) if "weight" in e]
    repeated = [i for i, e in enumerate(entries) if "repeats" in e]
    if weighted and repeated:
        raise ValueError(
            f"{name}: entries {weighted} give a weight and entries {repeated} give repeats; use one of the two "
            "in one list (weight = share of the samples, repeats = times per epoch)"
        )
    paths = [e["path"] for e in entries]
    twice = sorted({p for p in paths if paths.count(p) > 1})
    if twice:
        raise ValueError(f"{name} names {twice[0]!r} twice; give it `repeats` or a `weight` instead")
    for e in entries:
        e.setdefault("weight" if weighted else "repeats", 1.0 if weighted else 1)
    return entries


@dataclass(frozen=True)
class ShardMix:
    """One or more shard sets read as one stream of shard positions.

    The shards of all sets are listed once, set after set (`urls`, `num_samples`, `checksums`, `set_of`). A *pass*
    is a fixed multiset of those shards: set s contributes `slots[s]` shard reads, i.e. each of its shards
    `slots[s] // n_s` times plus `slots[s] % n_s` of them chosen per pass by the seed (the fractional part of a
    weight). Pass p is that list shuffled with the seed (`shuffle_shards`), so a stream position maps to a shard
    by arithmetic alone: exact and elastic resume need no extra state. One set read once per pass is exactly the
    single-set stream of before (same order, same fingerprint)."""

    sets: tuple[ShardSet, ...]
    labels: tuple[str, ...]  # each set's path as configured
    slots: tuple[int, ...]  # shard reads per pass, by set
    entries: tuple[dict, ...] = field(
        default=()
    )  # the normalized data.shards entries ({} for a plain string)

    @functools.cached_property
    def urls(self) -> tuple[str, ...]:
        return tuple(u for s in self.sets for u in s.urls)

    @functools.cached_property
    def num_samples(self) -> tuple[int | None, ...]:
        return tuple(c for s in self.sets for c in s.num_samples)

    @functools.cached_property
    def checksums(self) -> tuple[str | None, ...]:
        return tuple(c for s in self.sets for c in s.checksums)

    @functools.cached_property
    def set_of(self) -> tuple[int, ...]:
        """The set index of each entry of `urls`."""
        return tuple(i for i, s in enumerate(self.sets) for _ in s.urls)

    @property
    def manifest(self) -> Manifest | None:
        """The first set's manifest (every set shares its codec identity, checked by the loader)."""
        return self.sets[0].manifest

    @property
    def manifest_path(self) -> str | None:
        return self.sets[0].manifest_path

    @property
    def pass_length(self) -> int:
        """Shard reads per pass (one epoch of a data.resample=false run)."""
        return sum(self.slots)

    def fingerprint(self) -> str:
        if len(self.sets) == 1 and self.slots[0] == len(self.sets[0].urls):
            return self.sets[0].fingerprint()  # a plain shard set resumes states saved before mixes existed
        text = "\n".join(f"{s.fingerprint()}:{n}" for s, n in zip(self.sets, self.slots))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]

    def pass_order(self, seed: int, p: int, shuffle: bool, mix) -> list[int]:
        """Indices into `urls` of pass `p`, in reading order; `mix(*parts)` is the loader's seeded hash."""
        order: list[int] = []
        start = 0
        for s, (shard_set, slots) in enumerate(zip(self.sets, self.slots)):
            n = len(shard_set.urls)
            whole, part = divmod(slots, n)
            order += [start + i for _ in range(whole) for i in range(n)]
            if part:
                order += sorted(
                    start + i for i in random.Random(mix(seed, "mix", s, p)).sample(range(n), part)
                )
            start += n
        if shuffle:
            random.Random(mix(seed, "shards", p)).shuffle(order)
        return order

    def describe(self) -> str:
        """One line per set for the loader's log: shards, samples, reads per pass and share of the stream."""
        parts = []
        per_pass = [self._samples_per_pass(i) for i in range(len(self.sets))]
        known = None not in per_pass
        total = sum(per_pass) if known else 0
        for i, (label, s) in enumerate(zip(self.labels, self.sets)):
            samples = s.manifest.num_samples if s.manifest is not None else None
            share = f", {per_pass[i] / total:.1%} of the samples" if known and total else ""
            parts.append(
                f"{label}: {len(s.urls)} shard(s)"
                + (f", {samples} samples" if samples is not None else "")
                + f", {self.slots[i] / len(s.urls):g} read(s) per epoch{share}"
            )
        return "; ".join(parts)

    def _samples_per_pass(self, i: int) -> float | None:
        counts = self.sets[i].num_samples
        if None in counts:
            return None
        return sum(counts) * self.slots[i] / len(counts)


def resolve_mix(spec: Any) -> ShardMix:
    """The `ShardMix` of a data.shards value (a string: one set read once per pass). Raises ValueError naming the
    entry for a bad spec, a set without sample counts that is given a weight, or an unreadable set."""
    entries = normalize_shard_spec(spec)
    if isinstance(entries, str):
        shard_set = resolve_shard_set(entries)
        return ShardMix((shard_set,), (entries,), (len(shard_set.urls),), ({},))
    sets = []
    for i, e in enumerate(entries):
        try:
            sets.append(resolve_shard_set(e["path"]))
        except ValueError as err:
            raise type(err)(f"data.shards[{i}] ({e['path']}): {err}") from None
    if "repeats" in entries[0]:
        slots = [e["repeats"] * len(s.urls) for e, s in zip(entries, sets)]
    else:
        sizes = []
        for i, (e, s) in enumerate(zip(entries, sets)):
            if None in s.num_samples:
                raise ValueError(
                    f"data.shards[{i}] ({e['path']}): a weight needs the sample counts of a {MANIFEST_NAME}; "
                    "give the folder, or use repeats"
                )
            sizes.append(sum(s.num_samples))
        if 0 in sizes:
            raise ValueError(f"data.shards[{sizes.index(0)}] has no samples")
        # The set with the most samples for its weight is read once per pass; the others are read as often as
        # their weight asks (at least once), in whole shards.
        scale = max(n / e["weight"] for n, e in zip(sizes, entries))
        slots = [
            max(len(s.urls), round(scale * e["weight"] / n * len(s.urls)))
            for n, e, s in zip(sizes, entries, sets)
        ]
    return ShardMix(tuple(sets), tuple(e["path"] for e in entries), tuple(slots), tuple(entries))
