"""The LoRA training loop for MOVA: `run(cfg)` validates, sets up (an explicit ordered list of steps), trains,
checkpoints and resumes. `train.py` calls `run`.

One micro-step runs one video expert on the whole batch (ZeRO-3 gathers that expert on every rank), with its
timesteps drawn from its own noise range; the audio tower and the bridge train in every step. The trainer composes
three components and never asks which backend it holds: a `Backend` (forward/backward/step, trainable state, its
part of a checkpoint), the `Checkpointer` (all saved state) and the `Evaluator` (renders, held-out loss).
"""

from __future__ import annotations

import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mova_train.config import (
    COMPONENTS,
    EXPERTS,
    TrainConfig,
    config_to_dict,
    required_components,
    resolve_path,
    to_train_config,
    validate_config,
)
from mova_train.data.loader import build_loader
from mova_train.lora import apply_lora, as_lora_config, load_init_adapter, set_precision
from mova_train.models import FlowMatchScheduler, set_activation_checkpointing, set_attention_backend
from mova_train.models.compile import check_compile_precision, compile_blocks
from mova_train.models.streaming import host_data
from mova_train.run_layout import list_checkpoints, samples_file
from mova_train.training import checkpointer as checkpoints
from mova_train.training.backend import build_backend, load_base
from mova_train.training.checkpointer import Checkpointer, Counters, NonFiniteTrainingError, keep_global_batch
from mova_train.training.distributed import PeerHeartbeat, barrier, build_accelerator, resolve_runtime
from mova_train.training.evaluator import Evaluator
from mova_train.training.objective import FlowMatchingObjective, batch_video_fps, tokens_per_sample
from mova_train.training.optim import build_optimizer, set_step_hyperparams
from mova_train.training.parallel import apply_sequence_parallel
from mova_train.training.signals import StopFlag
from mova_train.training.step import StepAccumulator
from mova_train.training.tracking import (
    MetricsWriter,
    ProgressBar,
    build_tracker,
    peak_memory_gb,
    setup_logging,
    write_run_files,
)
from mova_train.upstream import silence_known_warnings

logger = logging.getLogger("mova_train.training")

__all__ = ["NonFiniteTrainingError", "RunResult", "Trainer", "run", "to_train_config", "validate_config"]


@dataclass
class RunResult:
    step: int
    stopped_by_signal: bool
    run_dir: Path
    last_checkpoint: Path | None


class Trainer:
    """Setup is `setup()`'s ordered list; `train()` is the loop. Tests may drive both directly."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.counters = Counters()
        self.stop = StopFlag()
        self.tracker = self.metrics = self.progress = self.loader = self.heartbeat = self.checkpointer = None

    # ------------------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        self.stop.install()  # first, so a SIGTERM during setup still ends in a clean save + exit 0
        self.resolve_runtime_settings()  # precision + DeepSpeed JSON, still before any process group
        self.start_processes()  # accelerate / DeepSpeed process group, device, the Checkpointer and run dir
        self.find_resume_checkpoint()  # latest complete checkpoint, fingerprint check
        self.build_model()  # base (frozen), LoRA (seeded, same on every rank), activation checkpointing
        self.build_backend()  # optimizer over the trainable parameters; accelerate.prepare: the Backend
        self.build_data()  # shard stream of this rank, codec identity checked; the Evaluator
        self.restore()  # optimizer, adapters, RNG streams, data position, counters
        self.start_tracking()  # run files, metrics.jsonl, W&B, progress bar

    def resolve_runtime_settings(self) -> None:
        self.cfg = keep_global_batch(self.cfg, int(os.environ.get("WORLD_SIZE", "1")))  # elastic resume
        self.mixed_precision, self.ds_config = resolve_runtime(self.cfg)
        self.zero_stage = int(self.ds_config["zero_optimization"]["stage"]) if self.ds_config else 0
        gpu = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"
        set_attention_backend(self.cfg.model.attention, gpu)  # a kernel this machine lacks: one-line error

    def start_processes(self) -> None:
        if self.cfg.trainer.num_threads:
            torch.set_num_threads(self.cfg.trainer.num_threads)
        silence_known_warnings()
        self.accelerator = build_accelerator(self.cfg, self.mixed_precision, self.ds_config)
        acc = self.accelerator
        self.rank, self.world_size, self.device = acc.process_index, acc.num_processes, acc.device
        self.is_main = acc.is_main_process
        self.checkpointer = Checkpointer(
            self.cfg, rank=self.rank, world_size=self.world_size, is_main=self.is_main, device=self.device
        )
        self.run_dir = self.checkpointer.run_dir
        self.checkpointer.prepare_run_dir()
        setup_logging(self.run_dir, self.rank)
        self.heartbeat = PeerHeartbeat(self.run_dir, self.rank, self.world_size)
        self.heartbeat.start()
        logger.info(
            "rank %d/%d pid %d on %s; DeepSpeed ZeRO stage %s; mixed precision %s; run dir %s",
            self.rank, self.world_size, os.getpid(), self.device, self.zero_stage or "off", self.mixed_precision,
            self.run_dir,
        )  # fmt: skip

    def find_resume_checkpoint(self) -> None:
        cfg = self.cfg
        self.components = tuple(cfg.model.components) if cfg.model.components else required_components(cfg)
        self.checkpointer.fingerprint(components=self.components, mixed_precision=self.mixed_precision)
        self.checkpointer.find_resume()

    def build_model(self) -> None:
        cfg = self.cfg
        checkpoint = resolve_path(cfg.model.checkpoint, field_name="model.checkpoint")
        model = load_base(checkpoint, self.components, cfg.model, self.device, self.ds_config, cfg.objective)
        for p in model.parameters():
            p.requires_grad_(False)
        torch.manual_seed(cfg.trainer.seed)  # the same LoRA initialisation on every rank
        self.targets = apply_lora(model, as_lora_config(cfg.lora))
        if cfg.lora.init_from and self.checkpointer.resume_from is None:  # a resume's own adapters come first
            init = resolve_path(cfg.lora.init_from, field_name="lora.init_from")
            load_init_adapter(model, init, cfg.lora, expected_base_identity=self.checkpointer.base_identity)
        set_precision(model, cfg.model.precision)
        if cfg.model.activation_checkpointing:
            set_activation_checkpointing(model, enabled=True, offload=cfg.model.activation_offload)
        if cfg.model.compile:
            check_compile_precision(
                self.device.type, self.mixed_precision != "no" or cfg.model.dtype != "float32"
            )
            logger.info("model.compile: %d blocks and bridge conditioners compiled", compile_blocks(model))
        self.layout = apply_sequence_parallel(model, cfg.parallel, self.rank, self.world_size)
        model.train()
        self.model = model
        self.model_config = model.config
        self.objective = FlowMatchingObjective(
            cfg.objective, FlowMatchScheduler.from_config(model.config.scheduler), model.config.boundary_timestep,
            cfg.trainer.seed, cfg.trainer.gradient_accumulation_steps,
        )  # fmt: skip
        num_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        frozen = [p for p in model.parameters() if not p.requires_grad]  # streamed ones: their host copies
        num_frozen = sum(getattr(p, "ds_numel", host_data(p).numel()) for p in frozen)
        logger.info(
            "model: %s loaded (%s, %.3fB frozen); LoRA on %s: %.2fM trainable parameters",
            ", ".join(self.components), cfg.model.dtype, num_frozen / 1e9,
            ", ".join(f"{c} ({len(p)} modules)" for c, p in self.targets.items()), num_trainable / 1e6,
        )  # fmt: skip

    def build_backend(self) -> None:
        cfg = self.cfg
        self.optimizer = build_optimizer(self.model, cfg.optim)  # trainable params, a group per component
        self.backend = build_backend(
            self.accelerator, self.model, self.optimizer, ds_config=self.ds_config,
            mixed_precision=self.mixed_precision, max_grad_norm=cfg.optim.max_grad_norm, objective=cfg.objective,
        )  # fmt: skip
        self.generator = torch.Generator().manual_seed(cfg.trainer.seed * 1_000_003 + self.layout.dp_rank)
        if cfg.trainer.verify_frozen_base:
            self.checkpointer.record_base(self.backend)

    def build_data(self) -> None:
        cfg, identity = self.cfg, self.checkpointer.codec_identity
        self.loader = build_loader(
            cfg.data, rank=self.layout.dp_rank, world_size=self.layout.dp_size, seed=cfg.trainer.seed,
            text_len=self.model_config.text_len, expected_codec_identity=identity,
        )  # fmt: skip
        self.batches = iter(self.loader)
        self.evaluator = Evaluator(
            cfg, self.run_dir, self.model, self.objective, device=self.device, is_main=self.is_main,
            codec_identity=identity, stop=self.stop,
        )  # fmt: skip

    def restore(self) -> None:
        if self.checkpointer.resume_from is None:
            # Per-rank streams (LoRA dropout, ...) start from the seed; the objective has its own generator.
            seed = self.cfg.trainer.seed * 1_000_003 + self.layout.dp_rank  # a sequence group draws alike
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % 2**32)
            return
        self.counters = self.checkpointer.restore(self.backend, self.generator, self.loader)
        self.batches = iter(self.loader)

    def start_tracking(self) -> None:
        cfg = self.cfg
        self.config_dict = config_to_dict(cfg)
        resume_from = self.checkpointer.resume_from
        resume_step = self.counters.step if resume_from is not None else None
        self.sample_log = MetricsWriter(self.run_dir, resume_step, path=samples_file(self.run_dir, self.rank))
        if self.is_main:
            run_info = {
                "world_size": self.world_size, "zero_stage": self.zero_stage, "deepspeed_config": self.ds_config,
                "mixed_precision": self.mixed_precision, "targets": {c: len(p) for c, p in self.targets.items()},
                "resumed_from": str(resume_from) if resume_from else None,
            }  # fmt: skip
            write_run_files(self.run_dir, self.config_dict, run_info)
            self.metrics = MetricsWriter(self.run_dir, resume_step)
            self.tracker = build_tracker(cfg.tracking, self.run_dir, cfg.name, self.config_dict, resume_step)
            self.progress = ProgressBar(cfg.tracking.progress_bar, cfg.trainer.max_steps, self.counters.step)
        barrier()

    # ------------------------------------------------------------------------------------------ loop
    def train(self) -> RunResult:
        t = self.cfg.trainer
        cap = t.max_steps_per_run
        end = t.max_steps if cap is None else min(t.max_steps, self.counters.step + cap)
        stopped = False
        if self.counters.step >= end:
            logger.info(
                "nothing to do: step %d reached trainer.max_steps=%d", self.counters.step, t.max_steps
            )
        try:
            self.evaluator.run_at_start(self.counters.step, self.tracker)
            while self.counters.step < end and not stopped:
                row = self.train_step()
                stopped = row.pop("_stop")
                self.log_step(row)
                self.check_skips()
                saved = self.counters.step >= end or stopped or self.counters.step % t.save_every == 0
                if saved:
                    self.save_checkpoint()
                if self.evaluator.due(self.counters.step) and not stopped:
                    stopped = self.evaluator.run(self.counters.step, self.tracker)  # True: a stop signal came
                    if stopped and not saved:
                        self.save_checkpoint()
            if stopped:
                logger.info(
                    "stopped by signal %s at step %d; checkpoint saved", self.stop.signal, self.counters.step
                )
            if t.verify_frozen_base:
                self.checkpointer.verify_base(self.backend)
        except RuntimeError as e:
            raise (self.heartbeat.explain(e, t.collective_timeout_min) or e) from e
        finally:
            self.finish()
        return RunResult(self.counters.step, stopped, self.run_dir, self.checkpointer.last)

    def train_step(self) -> dict:
        """One optimizer step: `gradient_accumulation_steps` micro-steps, then a guarded update."""
        cfg, c = self.cfg, self.counters
        gas = cfg.trainer.gradient_accumulation_steps
        first_micro = c.step * gas
        experts = [self.objective.chooser.expert(first_micro + i) for i in range(gas)]
        active = set(experts) | {x for x in COMPONENTS if x not in EXPERTS}
        lr = set_step_hyperparams(self.optimizer, cfg.optim, c.step, cfg.trainer.max_steps, active)
        start = time.perf_counter()
        window = StepAccumulator(self.device, gas * cfg.data.batch_size)
        keys = []
        for i in range(gas):
            batch = self.next_batch().to(self.device)
            inputs = self.objective.prepare(
                batch.video, batch.first_frame, batch.audio, batch.text, micro_step=first_micro + i,
                generator=self.generator,
            )  # fmt: skip
            d = self.backend.input_dtype
            pred_video, pred_audio = self.backend.forward(
                inputs.noisy_video.to(d), inputs.video_cond.to(d), inputs.noisy_audio.to(d), inputs.text.to(d),
                inputs.timestep_video, inputs.timestep_audio, expert=inputs.expert,
                video_fps=batch_video_fps(batch, cfg.objective.video_fps),
            )  # fmt: skip
            loss, loss_v, loss_a = self.objective.loss(pred_video, pred_audio, inputs)
            self.backend.backward(loss, last_micro_step=i == gas - 1)
            window.add(
                loss, loss_v, loss_a, samples=len(batch), timesteps=inputs.drawn_timesteps[0],
                tokens=len(batch) * tokens_per_sample(batch, self.model_config.video_dit.patch_size),
                timesteps_audio=inputs.drawn_timesteps[1],
            )  # fmt: skip
            keys += batch.keys
        totals = window.finish(  # the one all-reduce and host read of the step
            rejected=float(self.loader.stats.get("rejected_total", 0)), stop=self.stop.signal is not None,
            grad_norm=self.backend.grad_norm(),
        )  # fmt: skip
        result = self.backend.step(force_skip=totals.nonfinite, grad_norm=totals.grad_norm)
        sums = [x / self.layout.sp_size for x in totals.sums.values()]
        elapsed = time.perf_counter() - start
        c.advance(applied=result.applied, samples=int(sums[3]))
        n_micro = gas * self.layout.dp_size  # a sequence group's ranks hold the same samples and loss
        row = {
            "step": c.step,
            "loss": sums[0] / n_micro,
            "loss_video": sums[1] / n_micro,
            "loss_audio": sums[2] / n_micro,
            "expert": experts[0] if len(set(experts)) == 1 else "+".join(experts),
            "experts": experts,
            "timesteps": totals.timesteps[:: self.layout.sp_size],  # per data-parallel rank
            "lr": lr,
            "grad_norm": result.grad_norm,
            "samples_per_s": sums[3] / elapsed,
            "tokens_per_s": sums[4] / elapsed,
            "step_time_s": elapsed,
            "mem_gb": peak_memory_gb(self.device),
            "skipped": not result.applied,
            "samples_seen": c.samples,
            "rejected_samples": int(sums[5]),  # over all ranks, since the run (or its resume) started
            "_stop": totals.stop,
            "_keys": keys,
        }
        if cfg.objective.independent_audio_timestep:
            row["timesteps_audio"] = totals.timesteps_audio[:: self.layout.sp_size]
        if not result.applied:
            logger.warning("step %d skipped on every rank: non-finite loss or gradient (%d in a row)",
                           c.step, c.consecutive_skips)  # fmt: skip
        return row

    def check_skips(self) -> None:
        """Abort after `max_consecutive_skips` non-finite steps in a row (the counter is the same on every rank),
        pointing at the newest checkpoint older than the weights that gave the first non-finite loss."""
        c, limit = self.counters, self.cfg.trainer.max_consecutive_skips
        if c.consecutive_skips < limit:
            return
        first = c.step - c.consecutive_skips + 1  # the weights after step first-1 gave its non-finite loss
        good = [p for s, p in list_checkpoints(self.run_dir) if s <= first - 2]
        advice = (
            f"resume from {good[-1]} (trainer.resume=PATH) with other settings"
            if good
            else "no checkpoint predates them: start again (trainer.resume=never) with other settings"
        )
        raise NonFiniteTrainingError(
            f"{c.consecutive_skips} optimizer steps in a row had a non-finite loss or gradient (steps {first}-{c.step});"
            f" stopping. Checkpoints from step {first - 1} on hold the weights that gave the first one: {advice} "
            f"(lower optim.lr, check the data with data.validate=true; trainer.max_consecutive_skips={limit})"
        )

    def next_batch(self):
        try:
            return next(self.batches)
        except StopIteration:  # data.resample=false: the next epoch
            self.batches = iter(self.loader)
            return next(self.batches)

    def log_step(self, row: dict) -> None:
        self.sample_log.write({"step": row["step"], "keys": row.pop("_keys")})  # every rank: its clips
        if not self.is_main:
            return
        public = {k: v for k, v in row.items() if not k.startswith("_")}
        self.metrics.write(public)
        self.tracker.log(public, step=row["step"])
        self.progress.update(public)

    def save_checkpoint(self) -> None:
        self.checkpointer.save(
            counters=self.counters, backend=self.backend, generator=self.generator,
            loader_state=self.loader.state_dict(), config_dict=self.config_dict, targets=self.targets,
        )  # fmt: skip

    def finish(self) -> None:
        self.stop.restore()
        self.heartbeat.stop()
        if getattr(self, "sample_log", None) is not None:
            self.sample_log.close()
        if self.loader is not None:
            logger.info("data on rank %d: %s", self.rank, self.loader.stats)
        if self.is_main:
            for obj in (self.progress, self.metrics, self.tracker):
                if obj is not None:
                    try:
                        (obj.finish if hasattr(obj, "finish") else obj.close)()
                    except Exception as e:  # tracking must never hide the training outcome
                        logger.warning("closing %s failed: %s", type(obj).__name__, e)
        self.checkpointer.release()


def run(cfg: Any) -> RunResult:
    """Validate (before any process group; the shards' codecs before the model loads), set up and train. `cfg`: a
    composed Hydra config or a TrainConfig. A fatal error is also written to logs/rank{N}.log, not only to stderr."""
    cfg = checkpoints.check_shard_codecs(validate_config(to_train_config(cfg)))
    trainer = Trainer(cfg)
    try:
        trainer.setup()
        return trainer.train()
    except BaseException as e:
        logger.critical(
            "training stopped by %s: %s", type(e).__name__, e, exc_info=not isinstance(e, ValueError)
        )
        raise
    finally:
        trainer.stop.restore()
        for part in (trainer.heartbeat, trainer.checkpointer):  # also when setup failed half-way
            if part is not None:
                part.close()
