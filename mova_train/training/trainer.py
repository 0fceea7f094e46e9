"""The LoRA training loop for MOVA: `run(cfg)` validates, sets up (an explicit ordered list of steps), trains,
checkpoints and resumes. `train.py` calls `run`.

One micro-step runs one video expert on the whole batch (ZeRO-3 gathers that expert on every rank), with its
timesteps drawn from its own noise range; the audio tower and the bridge train in every step.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mova_train.config import (
    COMPONENTS,
    EXPERTS,
    ConfigValueError,
    TrainConfig,
    config_to_dict,
    required_components,
    resolve_path,
    to_train_config,
    validate_config,
)
from mova_train.training import checkpoint as ckpt_io
from mova_train.training.distributed import (
    DeepSpeedStepper,
    PlainStepper,
    all_gather_floats,
    all_reduce,
    barrier,
    broadcast_object,
    build_accelerator,
    build_deepspeed_config,
    resolve_mixed_precision,
)
from mova_train.training.objective import FlowMatchingObjective
from mova_train.training.optim import build_optimizer, set_step_hyperparams
from mova_train.training.tracking import (
    MetricsWriter,
    ProgressBar,
    WandbTracker,
    peak_memory_gb,
    setup_logging,
    write_run_files,
)
from mova_train.upstream import silence_known_warnings

logger = logging.getLogger("mova_train.training")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class NonFiniteTrainingError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


@dataclass
class Counters:
    """Progress saved in trainer_state.json."""

    step: int = 0  # optimizer steps done, skipped ones included (the LR schedule and data follow it)
    applied_steps: int = 0
    consecutive_skips: int = 0
    samples: int = 0  # samples consumed over all ranks


@dataclass
class RunResult:
    step: int
    stopped_by_signal: bool
    run_dir: Path
    last_checkpoint: Path | None


class _StopFlag:
    """Set by SIGTERM/SIGUSR1; every rank reports its flag each step and all stop together."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def base_weights_sha256(model: torch.nn.Module) -> str:
    """sha256 over the frozen base weights this rank holds, by canonical name (PEFT's `base_layer.` removed), in
    sorted order, as raw bytes. Under ZeRO-3 each rank hashes its own partitions."""
    h = hashlib.sha256()
    named = []
    for name, p in model.named_parameters():
        if p.requires_grad:
            continue
        data = getattr(p, "ds_tensor", None)
        data = p.data if data is None else data
        named.append((name.replace("base_layer.", "").removeprefix("module."), data))
    for name, data in sorted(named, key=lambda x: x[0]):
        h.update(name.encode())
        h.update(str(data.dtype).encode())
        h.update(data.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class Trainer:
    """Setup is `setup()`'s ordered list; `train()` is the loop. Tests may drive both directly."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.counters = Counters()
        self.stop = _StopFlag()
        self.resume_from: Path | None = None
        self.last_checkpoint: Path | None = None
        self.tracker = self.metrics = self.progress = None
        self.codecs = None

    # ------------------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        self.stop.install()  # first, so a SIGTERM during setup still ends in a clean save + exit 0
        self.resolve_runtime_settings()  # precision + DeepSpeed JSON, still before any process group
        self.start_processes()  # accelerate / DeepSpeed process group, device
        self.prepare_run_dir()  # one run dir for all ranks, per-rank logs
        self.find_resume_checkpoint()  # latest complete checkpoint, fingerprint check
        self.build_model()  # base (frozen), LoRA (seeded, same on every rank), activation checkpointing
        self.build_optimizer()  # trainable parameters only, one group per component
        self.wrap_distributed()  # accelerate.prepare: DeepSpeed engine or DDP; the Stepper
        self.build_data()  # shard stream of this rank, codec identity checked
        self.restore()  # optimizer, adapters, RNG streams, data position, counters
        self.start_tracking()  # run files, metrics.jsonl, W&B, progress bar

    def resolve_runtime_settings(self) -> None:
        cfg = self.cfg
        self.mixed_precision = resolve_mixed_precision(cfg)
        self.ds_config = build_deepspeed_config(cfg, self.mixed_precision)
        self.zero_stage = int(self.ds_config["zero_optimization"]["stage"]) if self.ds_config else 0
        if cfg.model.dtype != "float32" and self.mixed_precision == "no":
            raise ConfigValueError(
                f"model.dtype={cfg.model.dtype!r} with trainer.mixed_precision resolved to 'no': the fp32 adapters "
                "and the low-precision base need bf16 autocast (trainer.mixed_precision=bf16), or use model.dtype=float32"
            )
        if cfg.eval.every > 0 and self.zero_stage == 3:
            raise ConfigValueError(
                "eval.every > 0 with DeepSpeed ZeRO-3 is not supported (renders would need every rank); "
                "use ZeRO-2 or render checkpoints with `python -m mova_train.sample`"
            )

    def start_processes(self) -> None:
        if self.cfg.trainer.num_threads:
            torch.set_num_threads(self.cfg.trainer.num_threads)
        silence_known_warnings()
        self.accelerator = build_accelerator(self.cfg, self.mixed_precision, self.ds_config)
        acc = self.accelerator
        self.rank, self.world_size, self.device = acc.process_index, acc.num_processes, acc.device
        self.is_main = acc.is_main_process

    def prepare_run_dir(self) -> None:
        self.run_dir = resolve_path(self.cfg.trainer.run_dir, field_name="trainer.run_dir", must_exist=False)
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            ckpt_io.remove_stale_tmp(self.run_dir)
        barrier()
        setup_logging(self.run_dir, self.rank)
        logger.info(
            "rank %d/%d pid %d on %s; DeepSpeed ZeRO stage %s; mixed precision %s; run dir %s",
            self.rank,
            self.world_size,
            os.getpid(),
            self.device,
            self.zero_stage or "off",
            self.mixed_precision,
            self.run_dir,
        )

    def fingerprint(self) -> dict:
        """What a checkpoint must share with this run to be resumed (differences are named on refusal)."""
        from mova_train.data.loader import resolve_shards
        from mova_train.lora import as_lora_config, base_identity, lora_config_to_dict

        cfg = self.cfg
        if self.is_main:
            # Always over all four diffusion components, whatever this run loads: export --format merged and the
            # sampler check adapters against the identity of the whole base.
            ident = base_identity(resolve_path(cfg.model.checkpoint, field_name="model.checkpoint"))
            shards = resolve_shards(cfg.data.shards).fingerprint()
        else:
            ident = shards = None
        ident, shards = broadcast_object((ident, shards))
        self.base_identity = ident
        return flatten(
            {
                "world_size": self.world_size,
                "zero_stage": self.zero_stage,
                "mixed_precision": self.mixed_precision,
                "model_dtype": cfg.model.dtype,
                "components": list(self.components),
                "base_identity": ident,
                "lora": lora_config_to_dict(as_lora_config(cfg.lora)),
                "data_shards": shards,
                "batch_size": cfg.data.batch_size,
                "num_workers": cfg.data.num_workers,
                "gradient_accumulation_steps": cfg.trainer.gradient_accumulation_steps,
                "seed": cfg.trainer.seed,
            }
        )

    def find_resume_checkpoint(self) -> None:
        cfg = self.cfg
        self.components = tuple(cfg.model.components) if cfg.model.components else required_components(cfg)
        self.fingerprint_now = self.fingerprint()
        self.resume_from = ckpt_io.resolve_resume(cfg.trainer.resume, self.run_dir)
        existing = ckpt_io.list_checkpoints(self.run_dir)
        if cfg.trainer.resume == "never" and existing:
            logger.warning(
                "trainer.resume=never in a run dir with checkpoints up to step %d: this new run replaces them "
                "as it reaches their steps (use another trainer.run_dir to keep them)", existing[-1][0],
            )  # fmt: skip
        if self.resume_from is None:
            logger.info(
                "starting a new run (no complete checkpoint in %s)", self.run_dir / ckpt_io.CHECKPOINTS_DIR
            )
            return
        self.saved_state = ckpt_io.read_trainer_state(self.resume_from)
        ckpt_io.check_fingerprint(
            self.saved_state["fingerprint"], self.fingerprint_now, where=str(self.resume_from)
        )
        logger.info("resuming from %s (step %d)", self.resume_from, self.saved_state["counters"]["step"])

    def build_model(self) -> None:
        from mova_train.lora import apply_lora, as_lora_config
        from mova_train.models import FlowMatchScheduler, set_activation_checkpointing
        from mova_train.models.checkpoint import load_mova

        cfg = self.cfg
        checkpoint = resolve_path(cfg.model.checkpoint, field_name="model.checkpoint")
        model = load_mova(checkpoint, components=self.components, dtype=DTYPES[cfg.model.dtype], device="cpu")
        for p in model.parameters():
            p.requires_grad_(False)
        torch.manual_seed(cfg.trainer.seed)  # the same LoRA initialisation on every rank
        self.targets = apply_lora(model, as_lora_config(cfg.lora))
        if cfg.model.activation_checkpointing:
            set_activation_checkpointing(model, enabled=True)
        model.train()
        self.model = model
        self.model_config = model.config
        self.objective = FlowMatchingObjective(
            cfg.objective,
            FlowMatchScheduler.from_config(model.config.scheduler),
            model.config.boundary_timestep,
            cfg.trainer.seed,
        )
        num_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        num_frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
        logger.info(
            "model: %s loaded (%s, %.3fB frozen); LoRA on %s: %.2fM trainable parameters",
            ", ".join(self.components),
            cfg.model.dtype,
            num_frozen / 1e9,
            ", ".join(f"{c} ({len(p)} modules)" for c, p in self.targets.items()),
            num_trainable / 1e6,
        )

    def build_optimizer(self) -> None:
        self.optimizer = build_optimizer(self.model, self.cfg.optim)

    def wrap_distributed(self) -> None:
        cfg = self.cfg
        prepared_model, prepared_opt = self.accelerator.prepare(self.model, self.optimizer)
        if self.ds_config is not None:
            self.stepper = DeepSpeedStepper(
                self.accelerator, prepared_model, self.optimizer, cfg.optim.max_grad_norm
            )
        else:
            if self.world_size > 1 and not isinstance(
                prepared_model, torch.nn.parallel.DistributedDataParallel
            ):
                raise RuntimeError(
                    f"{self.world_size} processes without DeepSpeed, but accelerate did not wrap the model in DDP "
                    f"(distributed type {self.accelerator.distributed_type}): the replicas would diverge"
                )
            self.stepper = PlainStepper(
                self.accelerator, prepared_model, self.optimizer, prepared_opt, cfg.optim.max_grad_norm
            )
        # Inputs follow the weights' dtype where no autocast does it (DeepSpeed bf16 casts the module).
        self.input_dtype = (
            torch.bfloat16 if (self.ds_config and self.mixed_precision == "bf16") else torch.float32
        )
        self.generator = torch.Generator().manual_seed(cfg.trainer.seed * 1_000_003 + self.rank)
        if cfg.trainer.verify_frozen_base:
            self.base_hash_start = base_weights_sha256(self.model)

    def build_data(self) -> None:
        from mova_train.checkpoint_io import CheckpointError
        from mova_train.data.loader import build_loader

        cfg = self.cfg
        identity = None
        if self.is_main:
            try:
                from mova_train.codecs import codec_identity

                identity = codec_identity(resolve_path(cfg.model.checkpoint, field_name="model.checkpoint"))
            except (CheckpointError, ImportError) as e:
                logger.warning(
                    "the base checkpoint's codec identity is unknown (%s): shards are not checked", e
                )
        identity = self.codec_identity = broadcast_object(identity)
        self.loader = build_loader(
            cfg.data,
            rank=self.rank,
            world_size=self.world_size,
            seed=cfg.trainer.seed,
            text_len=self.model_config.text_len,
            expected_codec_identity=identity,
        )
        self.batches = iter(self.loader)

    def restore(self) -> None:
        cfg = self.cfg
        if self.resume_from is None:
            # Per-rank streams (LoRA dropout, ...) start from the seed; the objective has its own generator.
            seed = cfg.trainer.seed * 1_000_003 + self.rank
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % 2**32)
            return
        ckpt = self.resume_from
        if isinstance(self.stepper, DeepSpeedStepper):
            path, _ = self.stepper.engine.load_checkpoint(
                str(ckpt / "deepspeed"),
                tag="state",
                load_module_strict=False,
                load_optimizer_states=True,
                load_lr_scheduler_states=False,
            )
            if path is None:
                raise ckpt_io.ResumeError(f"{ckpt / 'deepspeed'}: DeepSpeed found no checkpoint to load")
        else:
            from mova_train.lora import load_adapters, load_lora_state_dict

            state, _, _ = load_adapters(ckpt / "adapter")
            load_lora_state_dict(self.model, state, source=str(ckpt / "adapter"))
            ckpt_io.load_optimizer_state(ckpt, self.optimizer)
        self.loader.load_state_dict(ckpt_io.load_rank_state(ckpt, self.rank, self.generator))
        self.batches = iter(self.loader)
        self.counters = Counters(**self.saved_state["counters"])
        self.last_checkpoint = ckpt
        barrier()

    def start_tracking(self) -> None:
        cfg = self.cfg
        self.config_dict = config_to_dict(cfg)
        resume_step = self.counters.step if self.resume_from is not None else None
        if self.is_main:
            write_run_files(
                self.run_dir,
                self.config_dict,
                {
                    "world_size": self.world_size,
                    "zero_stage": self.zero_stage,
                    "deepspeed_config": self.ds_config,
                    "mixed_precision": self.mixed_precision,
                    "targets": {c: len(p) for c, p in self.targets.items()},
                    "resumed_from": str(self.resume_from) if self.resume_from else None,
                },
            )
            self.metrics = MetricsWriter(self.run_dir, resume_step)
            self.tracker = WandbTracker(cfg.tracking, self.run_dir, cfg.name, self.config_dict, resume_step)
            self.progress = ProgressBar(cfg.tracking.progress_bar, cfg.trainer.max_steps, self.counters.step)
        barrier()

    # ------------------------------------------------------------------------------------------ loop
    def train(self) -> RunResult:
        t = self.cfg.trainer
        end = (
            t.max_steps
            if t.max_steps_per_run is None
            else min(t.max_steps, self.counters.step + t.max_steps_per_run)
        )
        stopped = False
        if self.counters.step >= end:
            logger.info(
                "nothing to do: step %d reached trainer.max_steps=%d", self.counters.step, t.max_steps
            )
        try:
            while self.counters.step < end and not stopped:
                row = self.train_step()
                stopped = row.pop("_stop")
                self.log_step(row)
                self.check_skips()
                done = self.counters.step >= end
                if done or stopped or self.counters.step % t.save_every == 0:
                    self.save_checkpoint()
                if self.cfg.eval.every and self.counters.step % self.cfg.eval.every == 0 and not stopped:
                    self.evaluate()
            if stopped:
                logger.info(
                    "stopped by signal %s at step %d; checkpoint saved", self.stop.signal, self.counters.step
                )
            if t.verify_frozen_base:
                self.verify_frozen_base()
        finally:
            self.finish()
        return RunResult(self.counters.step, stopped, self.run_dir, self.last_checkpoint)

    def train_step(self) -> dict:
        """One optimizer step: `gradient_accumulation_steps` micro-steps, then a guarded update."""
        cfg, c = self.cfg, self.counters
        gas = cfg.trainer.gradient_accumulation_steps
        first_micro = c.step * gas
        experts = [self.objective.chooser.expert(first_micro + i) for i in range(gas)]
        active = set(experts) | {x for x in COMPONENTS if x not in EXPERTS}
        lr = set_step_hyperparams(self.optimizer, cfg.optim, c.step, cfg.trainer.max_steps, active)
        start = time.perf_counter()
        local = {"loss": 0.0, "loss_video": 0.0, "loss_audio": 0.0, "samples": 0.0, "tokens": 0.0}
        nonfinite, timesteps, timesteps_audio = False, [], []
        for i in range(gas):
            batch = self.next_batch().to(self.device)
            inputs = self.objective.prepare(
                batch.video,
                batch.first_frame,
                batch.audio,
                batch.text,
                micro_step=first_micro + i,
                generator=self.generator,
            )
            d = self.input_dtype
            pred_video, pred_audio = self.stepper.forward(
                inputs.noisy_video.to(d),
                inputs.video_cond.to(d),
                inputs.noisy_audio.to(d),
                inputs.text.to(d),
                inputs.timestep_video,
                inputs.timestep_audio,
                expert=inputs.expert,
                video_fps=self.video_fps(batch),
            )
            loss, loss_v, loss_a = self.objective.loss(pred_video, pred_audio, inputs)
            nonfinite |= not bool(torch.isfinite(loss))
            self.stepper.backward(loss, last_micro_step=i == gas - 1)
            local["loss"] += float(loss.detach())
            local["loss_video"] += float(loss_v)
            local["loss_audio"] += float(loss_a)
            local["samples"] += len(batch)
            local["tokens"] += len(batch) * self.tokens_per_sample(batch)
            timesteps += inputs.timestep_video.tolist()
            timesteps_audio += inputs.timestep_audio.tolist()
        stop_flag, any_nonfinite = all_reduce(
            [float(self.stop.signal is not None), float(nonfinite)], "max", self.device
        )
        result = self.stepper.step(force_skip=any_nonfinite > 0)
        sums = all_reduce(list(local.values()), "sum", self.device)
        elapsed = time.perf_counter() - start
        all_timesteps = all_gather_floats(timesteps, self.device, gas * cfg.data.batch_size)
        c.step += 1
        c.samples += int(sums[3])
        if result.applied:
            c.applied_steps += 1
            c.consecutive_skips = 0
        else:
            c.consecutive_skips += 1
        n_micro = gas * self.world_size
        row = {
            "step": c.step,
            "loss": sums[0] / n_micro,
            "loss_video": sums[1] / n_micro,
            "loss_audio": sums[2] / n_micro,
            "expert": experts[0] if len(set(experts)) == 1 else "+".join(experts),
            "experts": experts,
            "timesteps": all_timesteps,
            "lr": lr,
            "grad_norm": result.grad_norm,
            "samples_per_s": sums[3] / elapsed,
            "tokens_per_s": sums[4] / elapsed,
            "step_time_s": elapsed,
            "mem_gb": peak_memory_gb(self.device),
            "skipped": not result.applied,
            "samples_seen": c.samples,
            "rejected_samples": int(self.loader.stats.get("rejected_total", 0)),
            "_stop": stop_flag > 0,
        }
        if cfg.objective.independent_audio_timestep:
            row["timesteps_audio"] = all_gather_floats(
                timesteps_audio, self.device, gas * cfg.data.batch_size
            )
        if not result.applied:
            logger.warning(
                "step %d skipped on every rank: non-finite loss or gradient (%d in a row)",
                c.step,
                c.consecutive_skips,
            )
        return row

    def check_skips(self) -> None:
        """Abort after `max_consecutive_skips` non-finite steps in a row (the counter is the same on every rank)."""
        c, limit = self.counters, self.cfg.trainer.max_consecutive_skips
        if c.consecutive_skips >= limit:
            raise NonFiniteTrainingError(
                f"{c.consecutive_skips} optimizer steps in a row had a non-finite loss or gradient (last at step "
                f"{c.step}); stopping. Lower optim.lr, check the data (data.validate=true), or resume from "
                f"{self.last_checkpoint or 'a checkpoint'} with other settings (trainer.max_consecutive_skips={limit})"
            )

    def next_batch(self):
        try:
            return next(self.batches)
        except StopIteration:  # data.resample=false: the next epoch
            self.batches = iter(self.loader)
            return next(self.batches)

    def video_fps(self, batch) -> float:
        if self.cfg.objective.video_fps is not None:
            return float(self.cfg.objective.video_fps)
        rates = {float(m["fps"]) for m in batch.meta if "fps" in m}
        if len(rates) > 1:
            raise ValueError(f"batch {batch.keys} mixes frame rates {sorted(rates)}; set objective.video_fps")
        return rates.pop() if rates else 24.0

    def tokens_per_sample(self, batch) -> int:
        _, _, t, h, w = batch.video.shape
        pt, ph, pw = self.model_config.video_dit.patch_size
        return (t // pt) * (h // ph) * (w // pw) + batch.audio.shape[-1]

    def log_step(self, row: dict) -> None:
        if not self.is_main:
            return
        public = {k: v for k, v in row.items() if not k.startswith("_")}
        self.metrics.write(public)
        self.tracker.log(public, step=row["step"])
        self.progress.update(public)

    # ------------------------------------------------------------------------------------------ state
    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Canonical adapter state with full fp32 values on every rank (collective under DeepSpeed)."""
        from mova_train.lora import extract_lora_state

        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if isinstance(self.stepper, DeepSpeedStepper):
            from deepspeed.utils import safe_get_full_fp32_param

            values = {n: safe_get_full_fp32_param(p).detach().float().cpu() for n, p in named}
        else:
            values = {n: p.detach().float().cpu() for n, p in named}
        return extract_lora_state(values)

    def save_checkpoint(self) -> None:
        """Collective. Written aside, renamed when complete; never with non-finite trainable values."""
        from mova_train.lora import META_BASE_IDENTITY, META_STEP, META_TRAINING_CONFIG, save_adapters

        step = self.counters.step
        state = self.trainable_state()
        finite = all(bool(torch.isfinite(v).all()) for v in state.values())
        (bad,) = all_reduce([0.0 if finite else 1.0], "max", self.device)
        if bad:
            raise NonFiniteTrainingError(
                f"the adapter weights hold non-finite values at step {step}; no checkpoint was written "
                f"(last good one: {self.last_checkpoint})"
            )
        # Every rank must hold the same adapter; a difference means the replicas stopped synchronising.
        checksum = sum(float(v.double().abs().sum()) for v in state.values())
        high, neg_low = all_reduce([checksum, -checksum], "max", self.device)
        if high != -neg_low:
            raise RuntimeError(f"the ranks' adapters differ at step {step} (checksums {-neg_low} .. {high})")
        tmp = ckpt_io.begin_checkpoint(self.run_dir, step) if self.is_main else None
        tmp = Path(broadcast_object(str(tmp) if tmp else None))
        barrier()
        if isinstance(self.stepper, DeepSpeedStepper):
            self.stepper.engine.save_checkpoint(
                str(tmp / "deepspeed"), tag="state", exclude_frozen_parameters=True, save_latest=False
            )
        elif self.is_main:
            ckpt_io.save_optimizer_state(tmp, self.optimizer)
        ckpt_io.save_rank_state(tmp, self.rank, self.generator, self.loader.state_dict())
        if self.is_main:
            from omegaconf import OmegaConf

            save_adapters(
                tmp / "adapter",
                None,
                self.cfg.lora,
                state_dict=state,
                metadata={
                    META_STEP: str(step),
                    META_BASE_IDENTITY: self.base_identity,
                    META_TRAINING_CONFIG: OmegaConf.to_yaml(OmegaConf.create(self.config_dict)),
                },
            )
        barrier()
        if self.is_main:
            ckpt_io.write_trainer_state(
                tmp,
                {
                    "step": step,
                    "counters": asdict(self.counters),
                    "fingerprint": self.fingerprint_now,
                    "base_identity": self.base_identity,
                    "lora": config_to_dict(self.cfg)["lora"],
                    "world_size": self.world_size,
                    "zero_stage": self.zero_stage,
                    "targets": self.targets,
                },
            )
            final = ckpt_io.commit_checkpoint(tmp, self.cfg.trainer.keep_last)
            logger.info("saved checkpoint %s", final)
        self.last_checkpoint = Path(broadcast_object(str(tmp).replace(ckpt_io._TMP_PREFIX, "step-")))
        barrier()

    def verify_frozen_base(self) -> None:
        end = base_weights_sha256(self.model)
        (changed,) = all_reduce([float(end != self.base_hash_start)], "max", self.device)
        if self.is_main:
            from mova_train.checkpoint_io import write_json_atomic

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

    def evaluate(self) -> None:
        """Renders and held-out loss on the main process (the others wait); no training RNG stream is touched."""
        if self.is_main:
            ev, step = self.cfg.eval, self.counters.step
            row: dict[str, Any] = {"step": step}
            py, nps = random.getstate(), np.random.get_state()
            was_training = self.model.training
            self.model.eval()
            try:
                with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                    if ev.prompts:
                        row.update(self.render_prompts(step))
                    if ev.heldout_shards:
                        row.update({f"heldout_{k}": v for k, v in self.heldout_loss().items()})
            finally:
                self.model.train(was_training)
                random.setstate(py)
                np.random.set_state(nps)
            logger.info("eval at step %d: %s", step, {k: v for k, v in row.items() if k != "step"})
            (self.run_dir / "eval").mkdir(exist_ok=True)
            with open(self.run_dir / "eval" / "eval.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(row, sort_keys=True) + "\n")
            if self.tracker is not None and self.tracker.run is not None:
                self.tracker.log_media({f"eval/{k}": v for k, v in row.items() if k != "step"}, step=step)
        barrier()

    def render_prompts(self, step: int) -> dict:
        from mova_train.codecs import load_codecs
        from mova_train.sampling.evaluate import log_renders_to_wandb, render_eval, sync_summary

        ev = self.cfg.eval
        if self.codecs is None:
            checkpoint = resolve_path(self.cfg.model.checkpoint, field_name="model.checkpoint")
            self.codecs = load_codecs(checkpoint, device=self.device)
        records = render_eval(
            self.model, self.codecs, list(ev.prompts), self.run_dir / "eval", step=step, seed=ev.seed,
            negative_prompt=ev.negative_prompt, num_frames=ev.num_frames, height=ev.height, width=ev.width,
            steps=ev.steps, cfg_scale=ev.cfg_scale,
        )  # fmt: skip
        if self.tracker is not None and self.tracker.run is not None:
            log_renders_to_wandb(records, step=step, run=self.tracker.run)
        return {"renders": len(records), **sync_summary(records)}

    def heldout_loss(self) -> dict:
        from mova_train.data.loader import DataConfig, build_loader
        from mova_train.sampling.evaluate import heldout_loss
        from mova_train.training.objective import build_i2v_condition

        ev = self.cfg.eval
        data = DataConfig(
            shards=ev.heldout_shards, batch_size=self.cfg.data.batch_size, num_workers=0, shuffle_buffer=0,
            shuffle_shards=False, resample=False,
        )  # fmt: skip
        loader = build_loader(
            data, rank=0, world_size=1, seed=0, text_len=self.model_config.text_len,
            expected_codec_identity=self.codec_identity,
        )  # fmt: skip
        return heldout_loss(
            self.model, iter(loader), build_condition=build_i2v_condition, scheduler=self.objective.scheduler,
            max_batches=ev.heldout_batches, video_fps=float(self.cfg.objective.video_fps or 24.0),
        )  # fmt: skip

    def finish(self) -> None:
        self.stop.restore()
        if getattr(self, "loader", None) is not None:
            logger.info("data on rank %d: %s", self.rank, self.loader.stats)
        if self.is_main:
            for obj in (self.progress, self.metrics, self.tracker):
                if obj is not None:
                    try:
                        (obj.finish if hasattr(obj, "finish") else obj.close)()
                    except Exception as e:  # tracking must never hide the training outcome
                        logger.warning("closing %s failed: %s", type(obj).__name__, e)


def run(cfg: Any) -> RunResult:
    """Validate (before any process group), set up and train. `cfg`: a composed Hydra config or a TrainConfig."""
    cfg = validate_config(to_train_config(cfg))
    trainer = Trainer(cfg)
    try:
        trainer.setup()
    except BaseException:
        trainer.stop.restore()
        raise
    return trainer.train()
