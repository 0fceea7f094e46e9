"""Streams the latent shards written by data_tools as same-shape batches, deterministically and exactly resumable.

Design (every choice below serves exact resume without replaying the run):

* **Shard order.** The shard list (from `manifest.json`, or a brace-expanded URL list) is read as one stream that
  repeats forever (`resample=true`) or once per epoch (`resample=false`). Pass `p` over the list uses the
  permutation `perm(seed, p)` (identity when `shuffle_shards=false`), the same on every rank. Stream position `j`
  names the shard `list[perm(seed, j // n)[j % n]]`; an epoch `e` of a finite run is `j in [e*n, (e+1)*n)`.
  With several shard sets (`data.shards` a list with repeats or weights) a pass is a fixed multiset of `n` shard
  reads over all sets (`ShardMix.pass_order`: a set's shards repeated, plus a seeded subset for a fractional
  weight), so the mix is as deterministic and resumable as a single set.
* **Caption dropout.** With `data.caption_dropout=P` a sample's text is replaced by its set's stored empty-prompt
  embedding when `hash(seed, j, index) < P`: a function of the sample's stream position, so a resumed (or
  re-split) run drops exactly the same captions.
* **Splitting.** Rank `r` with `N = max(1, num_workers)` reader slots per rank owns slots `s = r + world_size*w`
  and slot `s` reads every stream position `j` with `j % (world_size*N) == s` (webdataset's split-by-node then
  split-by-worker on shards). Each shard of a pass is read by exactly one slot, so without resampling every sample
  is seen exactly once per epoch over all ranks; with resampling every slot keeps getting shards even when there
  are fewer shards than slots.
* **Per slot:** tar members are grouped into samples by `__key__` (webdataset's tar iterator, only `json` and
  `latents.safetensors` members are read, nothing is ever unpickled), decoded with the contract's
  `decode_sample`, validated (`validate_sample`, finiteness, consistency with the manifest's shapes and codec
  identity), then pass through a shuffle buffer (draw `m` picks index `hash(seed, slot, epoch, m) % len(buffer)`)
  and into per-shape pending lists; a list that reaches `batch_size` becomes a batch. Samples of different shape
  (bucket, frame count, audio length, dtype) never share a batch. At the end of a finite epoch the buffer drains in
  draw order and partial batches flush in sorted shape order, so no sample is dropped.
* **State.** A slot's state after each batch is small and JSON-able: stream position and samples consumed in the
  current shard, draw count, and *references* `(j, index, key)` to the samples held in the shuffle buffer and the
  pending lists (never their tensors). Worker processes attach it to every batch they send, and the main process
  keeps the state of the last batch it actually handed out from each worker, plus which worker is next. With
  `num_workers > 0`, torch's DataLoader hands out worker results round-robin in a fixed order (skipping finished
  workers); a resumed loader rotates the worker roles so that the next worker comes first. Resuming re-reads the
  referenced samples (at most `shuffle_buffer` + pending ones, from a few shards) and skips the consumed part of the
  current shard without decoding it; nothing else is replayed.
* **Bad data.** A sample that fails decoding or validation is rejected and counted by reason (`.stats`); once at
  least `MIN_SAMPLES_FOR_REJECT_CHECK` samples were seen (or at the end of an epoch) a rejected fraction above
  `max_rejected_fraction` raises `TooManyRejectedError`. A truncated or corrupt shard raises `ShardReadError`
  naming it; with `resample=true` it is logged, its lost samples are counted as rejected and the stream goes on.

The order depends on (seed, world_size, num_workers, batch_size, shuffle settings); a state saved under other values
is refused with the field that differs.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mova_train.checkpoint_io import sha256_file
from mova_train.data.batch import Batch, ParsedSample, build_batch
from mova_train.data.config import DataConfig, check_data_config
from mova_train.data.contract import (
    EMPTY_PROMPT_TENSOR,
    MANIFEST_NAME,
    Manifest,
    SampleSpec,
    ShardFormatError,
)
from mova_train.data.errors import (
    CodecIdentityError,
    LoaderError,
    LoaderStateError,
    ShardReadError,
    TooManyRejectedError,
)
from mova_train.data.reader import Rejection, SampleChecks, iter_shard
from mova_train.data.shards import ShardMix, ShardSet, resolve_mix, verify_shard, verify_shard_ahead
from mova_train.data.stats import check_rejected, empty_stats, merge_stats

logger = logging.getLogger(__name__)

STATE_VERSION = 1
# Layout fields a state may differ in and still be continued, by `ShardLoader.load_resplit_state`.
_ELASTIC_FIELDS = ("rank", "world_size", "num_workers")
# Layout fields added after STATE_VERSION 1, with the value every state saved before them had.
_LAYOUT_DEFAULTS = {"caption_dropout": 0.0}


# ---------------------------------------------------------------------------------------------------------------
# One reader slot


@dataclass(frozen=True)
class _Plan:
    """Everything a reader needs; picklable so that DataLoader workers get a copy."""

    cfg: DataConfig
    shards: ShardMix
    rank: int
    world_size: int
    seed: int
    text_len: int
    spec: SampleSpec
    sample_identity: str | None  # codec identity every sample must carry (None: not checked)
    # per shard set, the stored empty-prompt embedding [n_tokens, Dt]; empty unless data.caption_dropout > 0
    empty_prompts: tuple[torch.Tensor, ...] = ()

    @property
    def pass_length(self) -> int:  # shard reads per pass over all sets (one epoch without resampling)
        return self.shards.pass_length

    @property
    def num_readers(self) -> int:  # reader slots per rank
        return max(1, self.cfg.num_workers)

    @property
    def num_slots(self) -> int:
        return self.world_size * self.num_readers

    def slot(self, worker: int) -> int:
        return self.rank + self.world_size * worker


def _mix(*parts: object) -> int:
    digest = hashlib.blake2b("/".join(str(p) for p in parts).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _fresh_slot_state(plan: _Plan, worker: int, epoch: int) -> dict:
    start = plan.slot(worker) + (0 if plan.cfg.resample else epoch * plan.pass_length)
    return {
        "cursor": start,
        "offset": 0,
        "queue": [],  # [position, offset] to read before `cursor` (left by readers of another layout)
        "draws": 0,
        "buffer": [],
        "pending": [],
        "done": False,
        "shards_without_sample": 0,
        "stats": empty_stats(),
    }


class _SlotReader:
    """The sample stream of one (rank, worker) slot, resumable from a state dict."""

    def __init__(self, plan: _Plan, worker: int, epoch: int, state: dict | None):
        self.plan = plan
        self.cfg = plan.cfg
        self.worker = worker
        self.slot = plan.slot(worker)
        self.epoch = epoch if not self.cfg.resample else 0
        self.state = _fresh_slot_state(plan, worker, epoch) if state is None else _copy_state(state)
        self.stream_end = None if self.cfg.resample else (epoch + 1) * plan.pass_length
        self._perm_pass = -1
        self._perm: list[int] = []
        self.where = f"rank {plan.rank} reader {worker}"
        self.checks = [  # per shard set: each is checked against its own manifest
            SampleChecks(
                text_len=plan.text_len,
                spec=plan.spec,
                sample_identity=plan.sample_identity,
                validate=self.cfg.validate,
                buckets=self.cfg.buckets,
                manifest=shard_set.manifest,
            )
            for shard_set in plan.shards.sets
        ]
        self.warned: set[str] = set()

    # -- shard stream -----------------------------------------------------------------------------------------
    def shard_index(self, j: int) -> int:
        n = self.plan.pass_length
        p = j // n
        if p != self._perm_pass:
            order = self.plan.shards.pass_order(self.plan.seed, p, self.cfg.shuffle_shards, _mix)
            self._perm_pass, self._perm = p, order
        return self._perm[j % n]

    def parse(
        self, raw: dict, j: int, index: int, url: str, count: bool = True
    ) -> ParsedSample | Rejection | None:
        """The set's checks, then caption dropout (a function of (seed, j, index) only, so resumes agree)."""
        set_index = self.plan.shards.set_of[self.shard_index(j)]
        parsed = self.checks[set_index].parse(raw, j, index, url)
        stats = self.state["stats"] if count else {}  # a re-read buffered sample was counted when first read
        if isinstance(parsed, ParsedSample):
            if len(self.plan.shards.sets) > 1:
                label = self.plan.shards.labels[set_index]
                sets = stats.setdefault("sets", {})
                sets[label] = sets.get(label, 0) + 1
            p = self.cfg.caption_dropout
            if p > 0 and _mix(self.plan.seed, "caption_dropout", j, index) / 2.0**64 < p:
                text = parsed.tensors["text"]
                empty = self.plan.empty_prompts[set_index].to(text.dtype)  # [n_tokens, Dt]
                parsed.tensors["text"] = empty
                parsed.meta = {**parsed.meta, "caption_dropped": True}
                stats["captions_dropped"] = stats.get("captions_dropped", 0) + 1
        return parsed

    def url(self, j: int) -> str:
        return self.plan.shards.urls[self.shard_index(j)]

    def open_shard(self, j: int, skip: int) -> Iterator[tuple[int, dict]]:
        """The samples of shard position j from `skip` on, after its bytes were checked against the manifest."""
        url = self.url(j)
        if self.cfg.verify_checksums:
            checksums = self.plan.shards.checksums
            verify_shard(url, checksums[self.shard_index(j)])
            nxt = j + self.plan.num_slots  # this reader's next shard, hashed while this one is read
            if self.stream_end is None or nxt < self.stream_end:
                verify_shard_ahead(self.url(nxt), checksums[self.shard_index(nxt)])
        return iter_shard(url, skip=skip)

    def draw(self, k: int) -> int:
        st = self.state
        i = _mix(self.plan.seed, "buffer", self.slot, self.epoch, st["draws"]) % k
        st["draws"] += 1
        return i

    # -- samples ----------------------------------------------------------------------------------------------
    def reject(self, reason: str, message: str, count: int = 1) -> None:
        stats = self.state["stats"]
        stats["rejected"][reason] = stats["rejected"].get(reason, 0) + count
        stats["examples"].setdefault(reason, message[:500])
        check_rejected(stats, self.cfg.max_rejected_fraction, self.where, final=False)

    def materialise(self, refs: list[list]) -> list[ParsedSample]:
        """Re-read the samples a saved state refers to (they passed validation once, so they must again)."""
        by_pos: dict[int, set[int]] = {}
        for j, index, _ in refs:
            by_pos.setdefault(j, set()).add(index)
        found: dict[tuple[int, int], ParsedSample] = {}
        for j, wanted in by_pos.items():
            url = self.url(j)
            try:
                for index, raw in self.open_shard(j, min(wanted)):
                    if index in wanted:
                        parsed = self.parse(raw, j, index, url, count=False)
                        if not isinstance(parsed, ParsedSample):
                            raise LoaderStateError(
                                f"resume: sample {index} of {url} no longer passes validation ({parsed!r}); "
                                "the shards changed since the checkpoint"
                            )
                        found[(j, index)] = parsed
                        if all((j, i) in found for i in wanted):
                            break
            except ShardReadError as e:
                raise LoaderStateError(f"resume: cannot re-read a buffered sample: {e}") from None
        out = []
        for j, index, key in refs:
            s = found.get((j, index))
            if s is None or s.ref[2] != key:
                raise LoaderStateError(
                    f"resume: sample {index} of shard {self.url(j)} should be {key!r} but is "
                    f"{None if s is None else s.ref[2]!r}; the shards changed since the checkpoint"
                )
            out.append(s)
        return out

    # -- the stream -------------------------------------------------------------------------------------------
    def snapshot(self, buffer: list[ParsedSample], pending: dict[str, list[ParsedSample]]) -> dict:
        st = self.state
        snap = _copy_state(st)
        snap["buffer"] = [list(s.ref) for s in buffer]
        snap["pending"] = sorted((list(s.ref) for group in pending.values() for s in group), key=_ref_order)
        return snap

    def items(self) -> Iterator[tuple[Batch | None, dict]]:
        """Yield (batch, state after it); a finite stream ends with (None, final state)."""
        st = self.state
        if st["done"]:
            return
        buffer = self.materialise(st["buffer"])
        pending: dict[str, list[ParsedSample]] = {}
        for s in self.materialise(st["pending"]):
            pending.setdefault(s.group, []).append(s)
        cfg = self.cfg
        stats = st["stats"]
        n = self.plan.pass_length
        num_slots = self.plan.num_slots

        def add(sample: ParsedSample) -> Batch | None:
            group = pending.setdefault(sample.group, [])
            group.append(sample)
            if len(group) < cfg.batch_size:
                return None
            del pending[sample.group]
            return build_batch(group, self.plan.text_len)

        while st["queue"] or self.stream_end is None or st["cursor"] < self.stream_end:
            from_queue = bool(st["queue"])
            j = st["queue"][0][0] if from_queue else st["cursor"]
            url = self.url(j)
            accepted_before = stats["accepted"]
            expected = self.plan.shards.num_samples[self.shard_index(j)]
            try:
                for index, raw in self.open_shard(j, st["offset"]):
                    st["offset"] = index + 1
                    stats["seen"] += 1
                    parsed = self.parse(raw, j, index, url)
                    if parsed is None:
                        stats["filtered"] += 1
                        continue
                    if isinstance(parsed, Rejection):
                        self.reject(parsed.reason, parsed.message)
                        continue
                    stats["accepted"] += 1
                    if cfg.shuffle_buffer > 1:
                        if len(buffer) < cfg.shuffle_buffer:
                            buffer.append(parsed)
                            continue
                        i = self.draw(len(buffer))
                        parsed, buffer[i] = buffer[i], parsed
                    batch = add(parsed)
                    if batch is not None:
                        yield batch, self.snapshot(buffer, pending)
                if expected is not None and st["offset"] < expected:
                    raise ShardReadError(
                        f"shard {url}: ends after {st['offset']} sample(s), the manifest says {expected}"
                    )
            except ShardReadError as e:
                if not cfg.resample:
                    raise
                lost = max(1, expected - st["offset"]) if expected is not None else 1
                if url not in self.warned:  # once per reader, not on every pass of an infinite stream
                    self.warned.add(url)
                    logger.warning("%s: %s; skipping it (%d sample(s) lost)", self.where, e, lost)
                stats["seen"] += lost
                stats["shard_errors"] += 1
                self.reject("corrupt_shard", str(e), lost)
            if from_queue:
                st["queue"].pop(0)
                st["offset"] = st["queue"][0][1] if st["queue"] else 0
            else:
                st["cursor"] = j + num_slots
                st["offset"] = 0
            if stats["accepted"] > accepted_before:
                st["shards_without_sample"] = 0
            else:
                st["shards_without_sample"] += 1
                # An infinite stream with nothing usable (empty shards, a bucket filter matching nothing) would
                # spin silently; only before the first usable sample, so a rare bucket later on is no error.
                limit = 8 * n + 64
                if (
                    self.stream_end is None
                    and stats["accepted"] == 0
                    and st["shards_without_sample"] >= limit
                ):
                    buckets = f" matching data.buckets={cfg.buckets}" if cfg.buckets else ""
                    raise LoaderError(
                        f"{self.where}: read {st['shards_without_sample']} shards without one usable "
                        f"sample{buckets}; stats: {merge_stats([stats])}"
                    )

        # End of a finite epoch: drain the buffer in draw order, then flush partial batches in a fixed order.
        while buffer:
            batch = add(buffer.pop(self.draw(len(buffer))))
            if batch is not None:
                yield batch, self.snapshot(buffer, pending)
        for group in sorted(pending):
            samples = pending.pop(group)
            yield build_batch(samples, self.plan.text_len), self.snapshot(buffer, pending)
        st["done"] = True
        yield None, self.snapshot(buffer, pending)


def _ref_order(ref: list) -> tuple:
    return (ref[0], ref[1])


def _copy_state(state: dict) -> dict:
    stats = state["stats"]
    return {
        **state,
        "buffer": [list(r) for r in state["buffer"]],
        "pending": [list(r) for r in state["pending"]],
        "queue": [list(q) for q in state.get("queue", [])],
        "stats": {
            **stats,
            "rejected": dict(stats["rejected"]),
            "examples": dict(stats["examples"]),
            **({"sets": dict(stats["sets"])} if "sets" in stats else {}),
        },
    }


class _WorkerDataset(IterableDataset):
    """What each DataLoader worker runs: the reader of its (rotated) slot."""

    def __init__(self, plan: _Plan, epoch: int, states: dict[int, dict], first_worker: int):
        super().__init__()
        self.plan = plan
        self.epoch = epoch
        self.states = states
        self.first_worker = first_worker

    def __iter__(self) -> Iterator[tuple[int, Batch | None, dict]]:
        info = get_worker_info()
        assert info is not None and info.num_workers == self.plan.num_readers
        # Rotating roles makes the DataLoader's round-robin start with the worker that was next when saved.
        worker = (info.id + self.first_worker) % info.num_workers
        reader = _SlotReader(self.plan, worker, self.epoch, self.states.get(worker))
        try:
            for batch, state in reader.items():
                yield worker, batch, state
        except (LoaderError, ShardFormatError) as e:
            # Data and config errors travel as an item: torch (2.13) waits out a 5 s join timeout when shutting
            # down a worker that raised, and the main process can raise the error without the worker traceback.
            yield worker, None, {"error": [type(e).__name__, str(e)]}


_WORKER_ERRORS = {
    cls.__name__: cls
    for cls in (
        LoaderError,
        CodecIdentityError,
        ShardReadError,
        TooManyRejectedError,
        LoaderStateError,
        ShardFormatError,
    )
}


def _pass_through(item: Any) -> Any:
    return item


# ---------------------------------------------------------------------------------------------------------------
# The loader


class ShardLoader:
    """Iterable over `Batch`es of one rank. `iter()` continues from the last batch handed out (or the loaded state);
    with `resample=false` one `iter()` is one epoch and the next `iter()` starts the next epoch."""

    def __init__(self, plan: _Plan):
        self.plan = plan
        self.cfg = plan.cfg
        self._epoch = 0
        self._states: dict[int, dict] = {}
        self._next_worker = 0
        self._num_batches = 0
        self._epoch_batches = 0
        self._past_stats = empty_stats()
        self._generation = 0

    # -- public properties ------------------------------------------------------------------------------------
    @property
    def shards(self) -> ShardMix:
        return self.plan.shards

    @property
    def manifest(self) -> Manifest | None:
        return self.plan.shards.manifest

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def num_batches(self) -> int:
        """Batches handed out so far (over all epochs, resume included)."""
        return self._num_batches

    @property
    def stats(self) -> dict:
        """Samples seen / accepted / filtered by bucket, rejected by reason (with one example message each)."""
        return merge_stats([self._past_stats] + [s["stats"] for s in self._states.values()])

    def _epoch_stats(self) -> dict:
        return merge_stats([s["stats"] for s in self._states.values()])

    # -- iteration --------------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Batch]:
        self._generation += 1
        return self._iterate(self._generation)

    def _items(self) -> Iterator[tuple[int, Batch | None, dict]]:
        plan = self.plan
        if self.cfg.num_workers == 0:
            reader = _SlotReader(plan, 0, self._epoch, self._states.get(0))
            for batch, state in reader.items():
                yield 0, batch, state
            return
        dataset = _WorkerDataset(plan, self._epoch, dict(self._states), self._next_worker)
        loader = DataLoader(
            dataset,
            batch_size=None,
            num_workers=self.cfg.num_workers,
            collate_fn=_pass_through,
            persistent_workers=False,
        )
        iterator = iter(loader)  # the only reference: dropping it stops the worker processes at once
        while True:
            try:
                worker, batch, state = next(iterator)
            except StopIteration:
                return
            if "error" in state:
                del iterator
                name, message = state["error"]
                raise _WORKER_ERRORS.get(name, LoaderError)(message)
            yield worker, batch, state  # `worker` is the logical reader index (roles were rotated)

    def _iterate(self, generation: int) -> Iterator[Batch]:
        where = f"rank {self.plan.rank}"
        n_readers = self.plan.num_readers
        for worker, batch, state in self._items():
            if generation != self._generation:
                raise RuntimeError(
                    "this ShardLoader iterator was superseded by a newer iter() of the same loader"
                )
            self._states[worker] = state
            self._next_worker = (worker + 1) % n_readers
            check_rejected(self._epoch_stats(), self.cfg.max_rejected_fraction, where, final=False)
            if batch is None:
                continue
            self._num_batches += 1
            self._epoch_batches += 1
            yield batch
        if self.cfg.resample:  # only reachable if a reader stopped, which an infinite stream never does
            raise AssertionError("resampled stream ended")
        if generation != self._generation:
            return
        stats = self._epoch_stats()
        check_rejected(stats, self.cfg.max_rejected_fraction, f"{where}, epoch {self._epoch}", final=True)
        if self._epoch_batches == 0:
            raise LoaderError(
                f"{where}: epoch {self._epoch} produced no batch from {len(self.plan.shards.urls)} shard(s)"
                + (f" with data.buckets={self.cfg.buckets}" if self.cfg.buckets else "")
                + f"; stats: {stats}"
            )
        self._past_stats = merge_stats([self._past_stats, stats])
        self._epoch += 1
        self._states = {}
        self._next_worker = 0
        self._epoch_batches = 0

    # -- state ------------------------------------------------------------------------------------------------
    def _layout(self) -> dict:
        cfg = self.cfg
        return {
            "seed": self.plan.seed,
            "rank": self.plan.rank,
            "world_size": self.plan.world_size,
            "num_workers": cfg.num_workers,
            "batch_size": cfg.batch_size,
            "shuffle_buffer": cfg.shuffle_buffer,
            "shuffle_shards": cfg.shuffle_shards,
            "resample": cfg.resample,
            "buckets": cfg.buckets,
            "validate": cfg.validate,
            "text_len": self.plan.text_len,
            "shards": self.plan.shards.fingerprint(),
            "caption_dropout": cfg.caption_dropout,
        }

    def state_dict(self) -> dict:
        """JSON-able data position of this rank after the last batch handed out."""
        return {
            "version": STATE_VERSION,
            "layout": self._layout(),
            "epoch": self._epoch,
            "next_worker": self._next_worker,
            "num_batches": self._num_batches,
            "epoch_batches": self._epoch_batches,
            "readers": {str(w): _copy_state(s) for w, s in sorted(self._states.items())},
            "past_stats": {k: v for k, v in self._past_stats.items() if k != "rejected_total"},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue exactly where `state` was saved; refuses a state from another layout, naming the field."""
        if not isinstance(state, Mapping) or state.get("version") != STATE_VERSION:
            raise LoaderStateError(
                f"loader state version {state.get('version') if isinstance(state, Mapping) else None!r}, "
                f"this version reads {STATE_VERSION}"
            )
        mine = self._layout()
        theirs = {**_LAYOUT_DEFAULTS, **state.get("layout", {})}
        for name, value in mine.items():
            if theirs.get(name) != value:
                what = "shard set (names and sample counts)" if name == "shards" else name
                raise LoaderStateError(
                    f"loader state was saved with {what}={theirs.get(name)!r}, this loader has {value!r}; "
                    "the data order depends on it, so it cannot resume exactly"
                )
        try:
            readers = {int(w): _copy_state(s) for w, s in state["readers"].items()}
            if any(not 0 <= w < self.plan.num_readers for w in readers):
                raise LoaderStateError(f"loader state names readers {sorted(readers)}")
            self._epoch = int(state["epoch"])
            self._next_worker = int(state["next_worker"])
            self._num_batches = int(state["num_batches"])
            self._epoch_batches = int(state["epoch_batches"])
            self._past_stats = _copy_state({"buffer": [], "pending": [], "stats": dict(state["past_stats"])})[
                "stats"
            ]
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            if isinstance(e, LoaderStateError):
                raise
            raise LoaderStateError(f"loader state is malformed ({type(e).__name__}: {e})") from None
        self._states = readers
        self._generation += 1  # any running iterator is now stale

    # -- elastic resume ---------------------------------------------------------------------------------------
    def load_resplit_state(self, states: list[Mapping[str, Any]]) -> None:
        """Continue an epoch that other ranks/workers started: `states` are the state_dicts of every rank of a run
        with another world size or num_workers. Every sample of the epoch is still read exactly once over the
        old and the new ranks: each shard position a reader had started continues at its offset, the ones no
        reader reached are shared out again, and the samples held in shuffle buffers and pending batches are
        handed to the new readers. The order differs from an uninterrupted run (it cannot match)."""
        plan, cfg = self.plan, self.cfg
        layouts = [
            {**_LAYOUT_DEFAULTS, **(s.get("layout", {}) if isinstance(s, Mapping) else {})} for s in states
        ]
        if not states or any(s.get("version") != STATE_VERSION for s in states):
            raise LoaderStateError(
                f"loader states of {len(states)} rank(s) are missing or of another version"
            )
        mine = {k: v for k, v in self._layout().items() if k not in _ELASTIC_FIELDS}
        for name, value in mine.items():
            theirs = {repr(lay.get(name)) for lay in layouts}
            if theirs != {repr(value)}:
                what = "shard set (names, sample counts and checksums)" if name == "shards" else name
                raise LoaderStateError(
                    f"loader state was saved with {what}={layouts[0].get(name)!r}, this loader has {value!r}; "
                    "the data order depends on it, so it cannot continue the epoch"
                )
        old_world = len(states)
        old_readers = max(1, int(layouts[0]["num_workers"]))
        old_slots = old_world * old_readers
        epochs = {int(s["epoch"]) for s in states}
        if len(epochs) != 1:
            raise LoaderStateError(
                f"the saved ranks are in different epochs {sorted(epochs)} (data.resample=false with uneven "
                "shards): resume with the same number of ranks"
            )
        epoch = epochs.pop()
        n = plan.pass_length
        end = None if cfg.resample else (epoch + 1) * n
        slots: list[dict] = []
        for rank, state in enumerate(states):
            readers = {int(w): s for w, s in state["readers"].items()}
            for w in range(old_readers):
                slot_plan = _Plan(cfg, plan.shards, rank, old_world, plan.seed, plan.text_len, plan.spec,
                                  plan.sample_identity, plan.empty_prompts)  # fmt: skip
                slots.append(readers.get(w) or _fresh_slot_state(slot_plan, w, epoch))
        # Positions each old reader started (partial) or will never reach (untouched), below the frontier.
        live = [s for s in slots if not s["done"] and (end is None or s["cursor"] < end)]
        frontier = max((s["cursor"] for s in live), default=end if end is not None else 0) + 1
        if end is not None:
            frontier = min(frontier, end)
        work: list[list[int]] = []
        for s in live:
            work.append([s["cursor"], s["offset"]])
            work += [[j, 0] for j in range(s["cursor"] + old_slots, frontier, old_slots)]
        work.sort()
        held = [ref for s in slots for ref in s["buffer"] + s["pending"]]
        held.sort(key=_ref_order)
        new_slots = plan.num_slots
        self._states = {}
        for w in range(plan.num_readers):
            slot = plan.slot(w)
            state = _fresh_slot_state(plan, w, epoch)
            cursor = frontier + (slot - frontier) % new_slots
            mine_work = work[slot::new_slots]
            mine_held = held[slot::new_slots]
            state.update(
                cursor=cursor,
                queue=mine_work,
                offset=mine_work[0][1] if mine_work else 0,
                buffer=mine_held if cfg.shuffle_buffer > 1 else [],
                pending=[] if cfg.shuffle_buffer > 1 else mine_held,
                done=bool(end is not None and cursor >= end and not mine_work and not mine_held),
            )
            self._states[w] = state
        self._epoch = epoch
        self._next_worker = 0
        self._num_batches = 0
        self._epoch_batches = sum(int(s["epoch_batches"]) for s in states)
        self._past_stats = (
            empty_stats()
            if plan.rank
            else merge_stats([dict(s["past_stats"]) for s in states] + [s["stats"] for s in slots])
        )
        self._generation += 1


# ---------------------------------------------------------------------------------------------------------------
# Entry point


def build_loader(
    cfg: DataConfig | Mapping[str, Any],
    *,
    rank: int,
    world_size: int,
    seed: int,
    text_len: int,
    expected_codec_identity: str | None,
) -> ShardLoader:
    """Resolve and check the shards (manifest, codec identity, buckets) and return this rank's loader.

    Raises before any data is read: ValueError for a bad config, CodecIdentityError when the manifest's codec
    identity differs from `expected_codec_identity` (None skips the check), ShardFormatError / ShardReadError for a
    missing or broken manifest or missing shard files.
    """
    cfg = check_data_config(cfg)
    if not (
        isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size
    ):
        raise ValueError(f"rank {rank!r} / world_size {world_size!r}: need 0 <= rank < world_size")
    if not isinstance(text_len, int) or text_len < 1:
        raise ValueError(f"text_len must be a positive integer, got {text_len!r}")
    if not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    shards = resolve_mix(cfg.shards)
    manifest = shards.manifest
    if not cfg.resample and shards.pass_length < world_size:
        raise ValueError(
            f"data.shards has {shards.pass_length} shard read(s) per epoch for world_size {world_size}: with "
            "data.resample=false every rank needs at least one shard; write more shards or set data.resample=true"
        )
    sample_identity = expected_codec_identity
    with_manifest = [s for s in shards.sets if s.manifest is not None]
    for shard_set in with_manifest:
        m = shard_set.manifest
        if expected_codec_identity is not None and m.codec_identity != expected_codec_identity:
            raise CodecIdentityError(
                f"{shard_set.manifest_path}: the shards were encoded by codecs {m.codec_identity!r}, the base "
                f"checkpoint's codecs are {expected_codec_identity!r}; re-encode the data with this checkpoint "
                "(python -m data_tools) or point data.shards at data encoded with it"
            )
        first = with_manifest[0]
        if m.codec_identity != first.manifest.codec_identity:
            raise CodecIdentityError(
                f"data.shards: {shard_set.manifest_path} was encoded by codecs {m.codec_identity!r}, "
                f"{first.manifest_path} by {first.manifest.codec_identity!r}; every shard set of one run must be "
                "encoded with the same codecs (the base checkpoint's)"
            )
    if with_manifest:
        manifest = with_manifest[0].manifest
        sample_identity = manifest.codec_identity
        available = {b for s in with_manifest for b in s.manifest.buckets}
        if cfg.buckets is not None and available:
            unknown = [b for b in cfg.buckets if b not in available]
            if unknown:
                where = shards.manifest_path if len(shards.sets) == 1 else "any shard set's manifest"
                raise ValueError(f"data.buckets {unknown} not in {where}; available: {sorted(available)}")
        spec = SampleSpec(
            video_channels=manifest.video_channels,
            audio_channels=manifest.audio_channels,
            text_dim=manifest.text_dim,
        )
    else:
        if expected_codec_identity is not None:
            logger.warning(
                "data.shards %r has no %s next to it: the codec identity is checked per sample only",
                cfg.shards,
                MANIFEST_NAME,
            )
        spec = SampleSpec()
    empty_prompts = (
        tuple(load_empty_prompt(s, spec.text_dim, text_len) for s in shards.sets)
        if cfg.caption_dropout > 0
        else ()
    )
    plan = _Plan(
        cfg=cfg,
        shards=shards,
        rank=rank,
        world_size=world_size,
        seed=seed,
        text_len=text_len,
        spec=spec,
        sample_identity=sample_identity,
        empty_prompts=empty_prompts,
    )
    known = [s.manifest.num_samples for s in shards.sets if s.manifest is not None]
    total = sum(known) if len(known) == len(shards.sets) else None
    logger.info(
        "data: rank %d/%d reads %d shard(s)%s, batch %d, %d worker(s), resample=%s, caption_dropout=%g",
        rank,
        world_size,
        len(shards.urls),
        f" ({total} samples)" if total is not None else "",
        cfg.batch_size,
        cfg.num_workers,
        cfg.resample,
        cfg.caption_dropout,
    )
    if len(shards.sets) > 1 and rank == 0:
        logger.info("data: %d shard sets: %s", len(shards.sets), shards.describe())
    return ShardLoader(plan)


def load_empty_prompt(shard_set: ShardSet, text_dim: int | None, text_len: int) -> torch.Tensor:
    """The empty-prompt text embedding [n_tokens, Dt] a shard set stores for caption dropout (manifest field
    `empty_prompt_file`, checked against its sha256). Raises LoaderError saying how to add it when it is missing."""
    where = shard_set.manifest_path or shard_set.urls[0]
    m = shard_set.manifest
    if m is None or not m.empty_prompt_file:
        folder = Path(shard_set.manifest_path).parent if shard_set.manifest_path else "SHARDS"
        raise LoaderError(
            f"data.caption_dropout needs the empty-prompt embedding, and {where} records none (shards written "
            f"before it existed, or no manifest); add it with: python -m data_tools empty-prompt {folder} "
            "--checkpoint CKPT"
        )
    path = Path(shard_set.manifest_path).parent / m.empty_prompt_file
    try:
        digest = sha256_file(path)
        if digest != m.empty_prompt_sha256:
            raise LoaderError(
                f"{path}: its sha256 differs from the one {where} records (changed since it was written); "
                "rewrite it with python -m data_tools empty-prompt"
            )
        tensors = load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise LoaderError(f"{path}: cannot read the empty-prompt embedding ({e})") from None
    text = tensors.get(EMPTY_PROMPT_TENSOR)
    if (
        text is None
        or text.ndim != 2
        or not 1 <= text.shape[0] <= text_len
        or (text_dim is not None and text.shape[1] != text_dim)
    ):
        got = None if text is None else list(text.shape)
        raise LoaderError(
            f"{path}: tensor {EMPTY_PROMPT_TENSOR!r} has shape {got}, expected [1..{text_len}, {text_dim or 'D'}]"
        )
    return text


__all__ = ["STATE_VERSION", "ShardLoader", "build_loader", "load_empty_prompt"]
