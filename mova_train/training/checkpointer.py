"""The Checkpointer: everything a run saves and restores, as typed, versioned state, in the layout of
`mova_train.run_layout`. It owns the run directory's checkpoints, the fingerprint that decides whether a
checkpoint may be resumed, and the frozen-base check; the backend writes and reads its own part.

What one checkpoint holds: the adapters (consolidated, written by rank 0), the backend's part (optimizer state;
the DeepSpeed engine's files under DeepSpeed), each rank's RNG streams and data position, and `TrainerState`
(counters, fingerprint, base identity, LoRA config, layout, the expert schedule and its phase) written last, which
marks the checkpoint complete.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from mova_train import run_layout as layout
from mova_train.checkpoint_io import CheckpointError, write_json_atomic
from mova_train.codecs import codec_identity
from mova_train.config import ConfigValueError, TrainConfig, config_to_dict, resolve_path
from mova_train.data.errors import CodecIdentityError
from mova_train.data.shards import resolve_shards
from mova_train.lora import (
    META_BASE_IDENTITY,
    META_STEP,
    META_TRAINING_CONFIG,
    as_lora_config,
    base_identity,
    lora_config_to_dict,
    read_init_adapter,
    save_adapters,
)
from mova_train.training import checkpoint as ckpt_io
from mova_train.training.backend import Backend
from mova_train.training.distributed import all_reduce, barrier, broadcast_object
from mova_train.training.objective import ExpertChooser
from mova_train.training.run_lock import RunDirLockedError, RunLock

logger = logging.getLogger("mova_train.training")


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, permissions); the previous ones are intact."""


def _tree_bytes(path: Path | None) -> int:
    """Bytes of the files under `path`; files removed meanwhile (rank 0 clears a failed save) count as 0."""
    total = 0
    for p in path.rglob("*") if path is not None and path.exists() else ():
        with contextlib.suppress(OSError):
            total += p.stat().st_size if p.is_file() else 0
    return total


class NonFiniteTrainingError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient, or the adapters went non-finite."""


@dataclass
class Counters:
    """Progress of a run."""

    step: int = 0  # optimizer steps done, skipped ones included (the LR schedule and data follow it)
    applied_steps: int = 0
    consecutive_skips: int = 0
    samples: int = 0  # samples consumed over all ranks

    def advance(self, *, applied: bool, samples: int) -> None:
        """One optimizer step done (applied, or skipped on every rank)."""
        self.step += 1
        self.samples += samples
        self.applied_steps += int(applied)
        self.consecutive_skips = 0 if applied else self.consecutive_skips + 1


@dataclass
class TrainerState:
    """`trainer_state.json`, version `checkpoint.STATE_VERSION`; written last, so its presence marks completion."""

    step: int
    counters: Counters
    fingerprint: dict[str, Any]
    base_identity: str
    lora: dict[str, Any]
    world_size: int
    zero_stage: int
    targets: dict[str, list[str]] = field(default_factory=dict)
    # ExpertChooser.state_at(step): the settings that choose the expert and the phase at `step`; None in
    # checkpoints written before objective.expert_switch_every existed (they all switched every micro-step)
    expert_schedule: dict[str, Any] | None = None

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def read(cls, ckpt: Path) -> TrainerState:
        raw = ckpt_io.read_trainer_state(ckpt)  # checks the version
        try:
            fields = {k: raw[k] for k in cls.__dataclass_fields__ if k != "expert_schedule"}
            fields["expert_schedule"] = raw.get("expert_schedule")
            fields["counters"] = Counters(**raw["counters"])
        except (KeyError, TypeError) as e:
            raise ckpt_io.ResumeError(f"{ckpt / layout.STATE_FILE}: missing or malformed field {e}") from None
        return cls(**fields)


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def keep_global_batch(cfg: TrainConfig, world_size: int) -> TrainConfig:
    """Before any process group: when the checkpoint this run will resume from was saved by another number of
    ranks, the config with the gradient accumulation that keeps its global batch (data.batch_size x accumulation x
    ranks); refused, with the numbers, when no whole number of accumulation steps does."""
    run_dir = resolve_path(cfg.trainer.run_dir, field_name="trainer.run_dir", must_exist=False)
    try:
        ckpt = ckpt_io.resolve_resume(cfg.trainer.resume, run_dir)
        state = ckpt_io.read_trainer_state(ckpt) if ckpt is not None else None
    except (ckpt_io.ResumeError, CheckpointError):
        return cfg  # reported with the verified lookup, once the processes run
    if state is None or state.get("world_size") == world_size or cfg.parallel.sequence_parallel_size > 1:
        return cfg  # (sequence parallel: find_resume refuses another number of ranks)
    saved_global = state.get("fingerprint", {}).get("global_batch")
    if saved_global is None:
        return cfg  # a checkpoint of an older version: its fingerprint names the differing fields
    per_step = cfg.data.batch_size * world_size
    if saved_global % per_step:
        raise ConfigValueError(
            f"{ckpt} was trained with a global batch of {saved_global} samples on {state['world_size']} rank(s); "
            f"{world_size} rank(s) x data.batch_size={cfg.data.batch_size} cannot make it up with whole "
            "gradient accumulation steps: choose a number of ranks (or data.batch_size) that divides it"
        )
    gas = saved_global // per_step
    if gas != cfg.trainer.gradient_accumulation_steps:
        logger.warning(
            "resuming %s (global batch %d, %d rank(s)) on %d rank(s): trainer.gradient_accumulation_steps %d -> %d",
            ckpt, saved_global, state["world_size"], world_size, cfg.trainer.gradient_accumulation_steps, gas,
        )  # fmt: skip
        cfg = replace(cfg, trainer=replace(cfg.trainer, gradient_accumulation_steps=gas))
    return cfg


@functools.lru_cache(maxsize=4)
def checkpoint_codec_identity(checkpoint: Path) -> str | None:
    """The codec identity of a base checkpoint (hashes the codec weights: computed once per process), or None with a
    warning when it cannot be computed (then shards are not checked against it)."""
    try:
        return codec_identity(checkpoint)
    except CheckpointError as e:
        logger.warning("the base checkpoint's codec identity is unknown (%s): shards are not checked", e)
        return None


def check_shard_codecs(cfg: TrainConfig) -> TrainConfig:
    """Before any process group, model load or run dir: the shards' manifest names the codecs of model.checkpoint
    (`doctor`'s check). Rank 0 only (hashing the codecs once); the loader checks every rank again later."""
    if os.environ.get("RANK", "0") != "0":
        return cfg
    manifest = resolve_shards(cfg.data.shards).manifest
    if manifest is None:  # a URL list without a manifest: nothing recorded to compare
        return cfg
    checkpoint = resolve_path(cfg.model.checkpoint, field_name="model.checkpoint")
    expected = checkpoint_codec_identity(checkpoint)
    if expected is not None and manifest.codec_identity != expected:
        raise CodecIdentityError(
            f"data.shards={cfg.data.shards!r}: the shards were encoded by codecs {manifest.codec_identity!r}, the "
            f"base checkpoint's codecs are {expected!r} (model.checkpoint={cfg.model.checkpoint!r}); re-encode the "
            "data with this checkpoint (python -m data_tools prepare) or point data.shards at data encoded with it"
        )
    return cfg


class Checkpointer:
    """Saves and restores a run's state; every method is collective (all ranks call it) unless it says not."""

    def __init__(self, cfg: TrainConfig, *, rank: int, world_size: int, is_main: bool, device: torch.device):
        self.cfg = cfg
        self.rank, self.world_size, self.is_main, self.device = rank, world_size, is_main, device
        self.run_dir = resolve_path(cfg.trainer.run_dir, field_name="trainer.run_dir", must_exist=False)
        self.resume_from: Path | None = None
        self.saved: TrainerState | None = None
        self.last: Path | None = None  # the newest complete checkpoint of this run
        self.base_hash_start: str | None = None
        self.lock: RunLock | None = None

    def prepare_run_dir(self) -> None:
        """One run dir for all ranks, locked by this job; only then are leftovers of an interrupted save removed.
        A run dir held by another live job ends every rank with RunDirLockedError naming the holder."""
        refused = None
        if self.is_main:
            self.lock = RunLock(self.run_dir, stale_after=self.cfg.trainer.lock_stale_after_s)
            try:
                self.lock.acquire()
            except RunDirLockedError as e:
                self.lock, refused = None, str(e)
            else:
                ckpt_io.remove_stale_tmp(self.run_dir)
        refused = broadcast_object(refused)
        if refused:
            raise RunDirLockedError(refused)
        barrier()

    def release(self) -> None:
        """Give the run dir back (main process; a no-op elsewhere). Idempotent."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    close = release

    def fingerprint(self, *, components: tuple[str, ...], mixed_precision: str) -> dict:
        """What a checkpoint must share with this run to be resumed (differences are named on refusal)."""
        cfg = self.cfg
        if self.is_main:
            # Always over all four diffusion components, whatever this run loads: export --format merged and the
            # sampler check adapters against the identity of the whole base.
            checkpoint = resolve_path(cfg.model.checkpoint, field_name="model.checkpoint")
            ident, codecs = base_identity(checkpoint), checkpoint_codec_identity(checkpoint)
            shards = resolve_shards(cfg.data.shards).fingerprint()
            init = None
            if cfg.lora.init_from:  # its content, not its path, decides whether a run may resume
                init = read_init_adapter(resolve_path(cfg.lora.init_from, field_name="lora.init_from")).sha256
        else:
            ident = codecs = shards = init = None
        # base_identity / codec_identity: what adapters and shards are checked against (rank 0 reads, all get it)
        self.base_identity, self.codec_identity, shards, init_sha = broadcast_object(
            (ident, codecs, shards, init)
        )
        sp = cfg.parallel.sequence_parallel_size
        self.fingerprint_now = flatten(
            {
                # Not the ZeRO stage, the world size or the loader workers: the saved state is consolidated and
                # the data position re-split, so a run may resume under another stage or number of GPUs. The global
                # batch must stay (keep_global_batch adjusts the gradient accumulation to it).
                "global_batch": cfg.data.batch_size
                * cfg.trainer.gradient_accumulation_steps
                * (self.world_size // sp),  # data-parallel ranks: a sequence group shares its samples
                "mixed_precision": mixed_precision,
                "model_dtype": cfg.model.dtype,
                "components": list(components),
                "base_identity": self.base_identity,
                "lora": lora_config_to_dict(as_lora_config(cfg.lora)),
                "lora_init_from_sha256": init_sha,  # the adapter the run started from (lora.init_from)
                "data_shards": shards,
                "batch_size": cfg.data.batch_size,
                "seed": cfg.trainer.seed,
                # only when used, so fingerprints of data-parallel runs stay as they were
                **({"sequence_parallel_size": sp} if sp > 1 else {}),
                # fp8 storage changes the numbers; model.offload_blocks does not, so it may change on resume
                **({"model_base_dtype": cfg.model.base_dtype} if cfg.model.base_dtype else {}),
                # reference precision computes other bf16 bits than lean (the default, absent as before)
                **({"model_precision": cfg.model.precision} if cfg.model.precision != "lean" else {}),
            }
        )
        return self.fingerprint_now

    def find_resume(self) -> TrainerState | None:
        """The checkpoint to resume from per `trainer.resume`, refused if its fingerprint differs from this run's."""
        resume = self.cfg.trainer.resume
        if resume == "never":
            self.move_aside_old_checkpoints()
        found = self.find_intact(resume) if self.is_main else None
        found = broadcast_object(found)
        if isinstance(found, str) and found.startswith("error:"):
            raise ckpt_io.ResumeError(found.removeprefix("error:"))
        self.resume_from = Path(found) if found else None
        if self.resume_from is None:
            logger.info(
                "starting a new run (no complete checkpoint in %s)", layout.checkpoints_dir(self.run_dir)
            )
            return None
        self.saved = TrainerState.read(self.resume_from)
        ckpt_io.check_fingerprint(self.saved.fingerprint, self.fingerprint_now, where=str(self.resume_from))
        self.check_expert_schedule()
        logger.info("resuming from %s (step %d)", self.resume_from, self.saved.step)
        if self.saved.world_size != self.world_size and self.fingerprint_now.get("sequence_parallel_size"):
            raise ckpt_io.ResumeError(
                f"cannot resume from {self.resume_from}: it was saved by {self.saved.world_size} rank(s), this run "
                f"has {self.world_size}; with parallel.sequence_parallel_size="
                f"{self.fingerprint_now['sequence_parallel_size']} the saved data positions and RNG streams are per "
                "sequence group, so resume with the same number of ranks"
            )
        if self.saved.world_size != self.world_size:
            logger.warning(
                "elastic resume: saved by %d rank(s), continued by %d with trainer.gradient_accumulation_steps=%d, "
                "which keeps the global batch of %s", self.saved.world_size, self.world_size,
                self.cfg.trainer.gradient_accumulation_steps, self.fingerprint_now["global_batch"],
            )  # fmt: skip
        return self.saved

    def expert_chooser(self) -> ExpertChooser:
        t = self.cfg.trainer
        return ExpertChooser(self.cfg.objective, t.seed, t.gradient_accumulation_steps)

    def check_expert_schedule(self) -> None:
        """Refuse a resume whose expert schedule differs from the checkpoint's: the phase it was in would not
        continue (a different expert, or a phase of another length, from the resumed step on)."""
        assert self.saved is not None
        chooser = self.expert_chooser()
        now = chooser.state_at(self.saved.step)
        # A checkpoint older than the setting switched every micro-step.
        saved = self.saved.expert_schedule or {"expert_switch_every": 1}
        keys = ["expert", "expert_switch_every", "high_noise_ratio"]
        if chooser.switch_every > 1:  # with 1 the phase is the micro-step, which an elastic resume re-counts
            keys += ["phase", "phase_expert"]
        named = {"phase": "phase", "phase_expert": "expert of the phase"}
        diffs = [
            f"{named.get(k, 'objective.' + k)}: checkpoint has {saved.get(k)!r}, this run has {now.get(k)!r}"
            for k in keys
            if (k in saved or self.saved.expert_schedule is not None) and saved.get(k) != now.get(k)
        ]
        if diffs:
            raise ckpt_io.ResumeError(
                f"cannot resume from {self.resume_from}: its expert schedule differs ({'; '.join(diffs)}), so the "
                "phase at its step would not continue; resume with the checkpoint's objective settings, or start "
                "anew with trainer.resume=never"
            )

    def find_intact(self, resume: str) -> str | None:
        """(Main process.) The checkpoint `resume` names, verified against its commit.json. With `auto`, a damaged
        newest checkpoint is named in the log and the newest intact one before it is taken instead."""
        try:
            chosen = ckpt_io.resolve_resume(resume, self.run_dir)
        except ckpt_io.ResumeError as e:
            return f"error:{e}"
        if chosen is None:
            return None
        candidates = [chosen]
        if resume == "auto":
            candidates += [p for _, p in reversed(layout.list_checkpoints(self.run_dir)) if p != chosen]
        problems = []
        for ckpt in candidates:
            problem = ckpt_io.verify_checkpoint(ckpt)
            if problem is None:
                if problems:
                    logger.warning("resuming from %s, the newest intact checkpoint", ckpt)
                return str(ckpt)
            logger.error("checkpoint %s is damaged: %s", ckpt, problem)
            problems.append(problem)
        return "error:" + (
            f"no intact checkpoint to resume from ({'; '.join(problems)}); use another trainer.run_dir or "
            "trainer.resume=never"
        )

    def move_aside_old_checkpoints(self) -> None:
        """`resume=never` in a run dir with checkpoints: they move to checkpoints.replaced-<time>/, untouched, so
        the new run neither resumes from them nor prunes them (nor its own in their place)."""
        moved = None
        old = layout.checkpoints_dir(self.run_dir)
        if self.is_main and old.is_dir() and any(old.iterdir()):
            stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
            moved = layout.replaced_checkpoints_dir(self.run_dir, stamp)
            os.replace(old, moved)
            moved = str(moved)
        moved = broadcast_object(moved)
        if moved:
            logger.warning(
                "trainer.resume=never: the earlier checkpoints of this run dir were moved to %s", moved
            )

    def restore(self, backend: Backend, generator: torch.Generator, loader) -> Counters:
        """Load the resume checkpoint into the backend, this rank's RNG streams and the loader; its counters.

        Saved by as many ranks with as many loader workers: everything continues exactly. Saved by another number
        of ranks or workers (elastic resume): the adapters and optimizer load the same (they are consolidated),
        the epoch's remaining samples are shared out anew over the ranks (none skipped, none twice), and each
        rank's RNG streams start from (seed, step, rank): the run goes on, not bit for bit as it would have."""
        ckpt, saved = self.resume_from, self.saved
        assert ckpt is not None and saved is not None
        backend.load(ckpt)
        same_workers = (
            ckpt_io.read_loader_state(ckpt, 0)["layout"]["num_workers"] == self.cfg.data.num_workers
        )
        if saved.world_size == self.world_size and same_workers:
            loader.load_state_dict(ckpt_io.load_rank_state(ckpt, self.rank, generator))
        else:
            loader.load_resplit_state([ckpt_io.read_loader_state(ckpt, r) for r in range(saved.world_size)])
            seed = self.cfg.trainer.seed * 1_000_003 + saved.step * 7919 + self.rank
            generator.manual_seed(seed)
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % 2**32)
            logger.warning(
                "elastic resume: %s was saved by %d rank(s), this run has %d (data.num_workers %s): the epoch's "
                "remaining samples were shared out anew and the RNG streams reseeded",
                ckpt, saved.world_size, self.world_size, "unchanged" if same_workers else "changed",
            )  # fmt: skip
        self.last = ckpt
        barrier()
        return Counters(**asdict(saved.counters))

    def save(
        self,
        *,
        counters: Counters,
        backend: Backend,
        generator: torch.Generator,
        loader_state: dict,
        config_dict: dict,
        targets: dict[str, list[str]],
    ) -> Path:
        """Written aside, renamed when complete; never with non-finite or rank-divergent trainable values."""
        step = counters.step
        state = backend.trainable_state()
        finite = all(bool(torch.isfinite(v).all()) for v in state.values())
        (bad,) = all_reduce([0.0 if finite else 1.0], "max", self.device)
        if bad:
            raise NonFiniteTrainingError(
                f"the adapter weights hold non-finite values at step {step}; no checkpoint was written "
                f"(last good one: {self.last})"
            )
        # Every rank must hold the same adapter; a difference means the replicas stopped synchronising.
        checksum = sum(float(v.double().abs().sum()) for v in state.values())
        high, neg_low = all_reduce([checksum, -checksum], "max", self.device)
        if high != -neg_low:
            raise RuntimeError(f"the ranks' adapters differ at step {step} (checksums {-neg_low} .. {high})")
        tmp = ckpt_io.begin_checkpoint(self.run_dir, step) if self.is_main else None
        tmp = Path(broadcast_object(str(tmp) if tmp else None))
        barrier()
        failure: BaseException | None = None
        try:
            backend.save(tmp, is_main=self.is_main)
            ckpt_io.save_rank_state(tmp, self.rank, generator, loader_state)
            if self.is_main:
                meta = {
                    META_STEP: str(step),
                    META_BASE_IDENTITY: self.base_identity,
                    META_TRAINING_CONFIG: OmegaConf.to_yaml(OmegaConf.create(config_dict)),
                }
                save_adapters(layout.adapter_dir(tmp), None, self.cfg.lora, state_dict=state, metadata=meta)
        except (
            OSError,
            RuntimeError,
        ) as e:  # every rank learns of a failed write, so none waits for the others
            failure = e
        (failed,) = all_reduce([float(failure is not None)], "max", self.device)
        if failed:
            raise self.write_failed(step, tmp, failure, state)
        if self.is_main:
            trainer_state = TrainerState(
                step=step, counters=counters, fingerprint=self.fingerprint_now, base_identity=self.base_identity,
                lora=config_to_dict(self.cfg)["lora"], world_size=self.world_size, zero_stage=backend.zero_stage,
                targets=targets, expert_schedule=self.expert_chooser().state_at(step),
            )  # fmt: skip
            try:
                ckpt_io.write_trainer_state(tmp, trainer_state.to_json())
                ckpt_io.write_commit_manifest(tmp)
            except OSError as e:
                raise self.write_failed(step, tmp, e, state) from e
            final = ckpt_io.commit_checkpoint(tmp, self.cfg.trainer.keep_last)
            logger.info("saved checkpoint %s", final)
        self.last = layout.final_dir(tmp)
        barrier()
        return self.last

    def write_failed(
        self, step: int, tmp: Path, error: BaseException | None, state: dict[str, torch.Tensor]
    ) -> CheckpointWriteError:
        """The error to end the run with after a failed checkpoint write; the partial folder is removed (main)."""
        folder = tmp.parent
        written = _tree_bytes(tmp)
        # About what a checkpoint takes: the last complete one, else the adapters plus two Adam moments in fp32.
        need = (
            _tree_bytes(self.last)
            if self.last is not None
            else written + 3 * sum(v.numel() * 4 for v in state.values())
        )
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        free = shutil.disk_usage(folder if folder.exists() else self.run_dir).free
        detail = f"{type(error).__name__}: {error}" if error is not None else "on another rank (see its log)"
        nothing_lost = (
            f"Nothing was lost: the partial checkpoint was removed and the last complete one is {self.last or 'none yet'}; "
            "resume with the same command once there is room (or lower trainer.keep_last)."
        )
        if isinstance(error, OSError) and error.errno == errno.ENOSPC or free < need:
            return CheckpointWriteError(
                f"no space left on the device of {folder} while writing the checkpoint of step {step}: it needs about "
                f"{need:,} bytes and {free:,} are free ({detail}). {nothing_lost}"
            )
        return CheckpointWriteError(
            f"writing the checkpoint of step {step} to {folder} failed: {detail}. {nothing_lost}"
        )

    # ------------------------------------------------------------------------------------- frozen base
    def record_base(self, backend: Backend) -> None:
        self.base_hash_start = backend.frozen_base_sha256()

    def verify_base(self, backend: Backend) -> None:
        """The frozen base weights are bit-identical to those at the start (`base_weights.json` says so)."""
        end = backend.frozen_base_sha256()
        (changed,) = all_reduce([float(end != self.base_hash_start)], "max", self.device)
        if self.is_main:
            write_json_atomic(
                self.run_dir / "base_weights.json",
                {
                    "sha256_start_rank0": self.base_hash_start,
                    "sha256_end_rank0": end,
                    "unchanged": not changed,
                },
            )
        if changed:
            raise RuntimeError("the frozen base weights changed during training (see base_weights.json)")
        logger.info("frozen base weights verified bit-identical (sha256 %s… on rank 0)", end[:16])
