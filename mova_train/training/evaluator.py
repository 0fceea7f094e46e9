"""The Evaluator: renders of `eval.prompts` and the held-out loss during training, without touching any training
RNG stream or training state. Writes `<run_dir>/eval/eval.jsonl` and logs to W&B, from the main process only.

Who computes: on the main process alone (the others wait), except under DeepSpeed ZeRO-3, where every rank takes
part in every forward (ZeRO-3 gathers each module's parameters from all ranks as it runs, so all ranks must run the
same forwards in the same order). Then only the main process loads the codecs: it prepares each render's inputs
(noise, first-frame condition, prompt embeddings; tens of MB) and broadcasts them, every rank runs the same denoising
steps through the live PEFT model (adapters active, nothing merged into the partitioned weights), and the main
process decodes, writes the files and logs. The held-out loss reads the same batches on every rank.

A stop signal (the trainer's StopFlag) abandons a render at its next denoising step; `run` then tells every rank to
stop, so the trainer saves a checkpoint and exits at once rather than after the evaluation. In a collective
evaluation the ranks agree on stopping before each denoising step (and each held-out batch), one tiny all-reduce,
so all of them abandon the same step whichever rank got the signal."""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mova_train import codecs as codec_loading  # lazy: the codecs (diffusers) load on the first render only
from mova_train import run_layout as layout
from mova_train.config import TrainConfig, resolve_path
from mova_train.data.config import DataConfig
from mova_train.data.loader import build_loader
from mova_train.sampling.control import RenderInterrupted
from mova_train.sampling.defaults import sampling_defaults
from mova_train.sampling.evaluate import heldout_loss, render_eval, sync_summary
from mova_train.training.distributed import all_reduce, broadcast_object
from mova_train.training.objective import FlowMatchingObjective
from mova_train.training.signals import StopFlag

logger = logging.getLogger("mova_train.training")


class Evaluator:
    def __init__(
        self,
        cfg: TrainConfig,
        run_dir: Path,
        model: torch.nn.Module,
        objective: FlowMatchingObjective,
        *,
        device: torch.device,
        is_main: bool,
        codec_identity: str | None,
        stop: StopFlag | None = None,
    ):
        self.cfg, self.ev = cfg, cfg.eval
        self.out_dir = Path(run_dir) / layout.EVAL_DIR
        self.model, self.objective = model, objective
        self.device, self.is_main = device, is_main
        self.codec_identity = codec_identity
        self.codecs = None  # loaded at the first render
        self.stop = stop

    def stopping(self) -> bool:
        return self.stop is not None and self.stop.signal is not None

    def due(self, step: int) -> bool:
        return bool(self.ev.every) and step % self.ev.every == 0

    def run_at_start(self, step: int, tracker=None) -> None:
        """The step-0 baseline (eval.at_start) of a run that starts from scratch; a resumed run has had its own.
        A stop signal during it is honoured by the first training step, which saves and stops."""
        if self.ev.at_start and step == 0:
            self.run(0, tracker)

    def collective(self) -> bool:
        """True when every rank must take part in the evaluation's forwards (ZeRO-3 partitioned weights)."""
        return partitioned_by_zero3(self.model)

    def stop_check(self, collective: bool):
        """The `should_stop` of renders and the held-out loss: this rank's stop flag, or, when the evaluation is
        collective, whether any rank got a stop signal (asked the same number of times on every rank)."""
        return any_rank(self.stopping, self.device) if collective else self.stopping

    def run(self, step: int, tracker=None) -> bool:
        """Collective: rank 0 evaluates (under ZeRO-3 every rank computes, rank 0 writes), every rank waits for it.
        True when a stop signal reached any rank (a render under way is then abandoned at its next denoising step):
        the trainer saves and stops."""
        collective = self.collective()
        if self.is_main or collective:
            row = self.evaluate(step, tracker, collective)
            if self.is_main:
                logger.info("eval at step %d: %s", step, {k: v for k, v in row.items() if k != "step"})
                self.out_dir.mkdir(exist_ok=True)
                with open(self.out_dir / "eval.jsonl", "a", encoding="utf-8") as f:
                    f.write(json.dumps(row, sort_keys=True) + "\n")
                if tracker is not None and tracker.run is not None:
                    tracker.log_media(
                        {f"eval/{k}": v for k, v in row.items() if k not in ("step", "interrupted")},
                        step=step,
                    )
        return all_reduce([float(self.stopping())], "max", self.device)[0] > 0

    def evaluate(self, step: int, tracker, collective: bool) -> dict[str, Any]:
        """Renders and held-out loss in eval mode with every RNG stream (Python, NumPy, torch CPU and CUDA) put
        back as it was; the row of eval.jsonl (meaningful on the main process)."""
        row: dict[str, Any] = {"step": step}
        should_stop = self.stop_check(collective)
        py, nps = random.getstate(), np.random.get_state()
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                if self.ev.prompts:
                    row.update(self.render_prompts(step, tracker, should_stop, collective))
                if self.ev.heldout_shards:
                    row.update({f"heldout_{k}": v for k, v in self.heldout_loss(should_stop).items()})
        except RenderInterrupted as e:
            signal = self.stop.signal if self.stop is not None else None
            row["interrupted"] = f"stop signal {signal if signal is not None else 'on another rank'}: {e}"
        finally:
            self.model.train(was_training)
            random.setstate(py)
            np.random.set_state(nps)
        return row

    def sampling_options(self) -> dict:
        """eval.* sizes and steps, those left null from the checkpoint (sampling.defaults)."""
        ev = self.ev
        fitting = sampling_defaults(self.model.config)
        chosen = {"num_frames": ev.num_frames, "height": ev.height, "width": ev.width, "steps": ev.steps}
        return {k: getattr(fitting, k) if v is None else v for k, v in chosen.items()}

    def prompt_items(self) -> list:
        """eval.prompts with each image resolved like every config path (working directory, then project root)."""
        items = []
        for i, entry in enumerate(self.ev.prompts):
            if isinstance(entry, dict) and entry.get("image") is not None:
                where = f"eval.prompts[{i}].image"
                entry = {**entry, "image": str(resolve_path(entry["image"], field_name=where))}
            items.append(entry)
        return items

    def render_prompts(self, step: int, tracker=None, should_stop=None, collective: bool = False) -> dict:
        """Render eval.prompts; only the main process loads the codecs, writes the files and logs them (the others,
        in a collective evaluation, get the inputs from it, run the same forwards and write nothing)."""
        ev = self.ev
        if self.codecs is None and self.is_main:
            checkpoint = resolve_path(self.cfg.model.checkpoint, field_name="model.checkpoint")
            logger.info("eval: loading the codecs of %s (text encoder, video and audio VAEs)", checkpoint)
            self.codecs = codec_loading.load_codecs(checkpoint, device=self.device)
        records = render_eval(
            self.model, self.codecs, self.prompt_items(), self.out_dir, step=step, seed=ev.seed,
            negative_prompt=ev.negative_prompt, cfg_scale=ev.cfg_scale,
            should_stop=self.stopping if should_stop is None else should_stop, write=self.is_main,
            share=broadcast_object if collective else None,
            **self.sampling_options(),
        )  # fmt: skip
        if not self.is_main:
            return {}
        if tracker is not None and tracker.run is not None:
            tracker.log_renders(records, step=step)
        return {"renders": len(records), **sync_summary(records)}

    def heldout_loss(self, should_stop=None) -> dict:
        """The objective's loss (weights included) at fixed timesteps with fixed-seed noise, over the held-out shards
        (all of them on every rank that computes, so a collective evaluation runs the same forwards everywhere)."""
        ev = self.ev
        data = DataConfig(
            shards=ev.heldout_shards, batch_size=self.cfg.data.batch_size, num_workers=0, shuffle_buffer=0,
            shuffle_shards=False, resample=False,
        )  # fmt: skip
        loader = build_loader(
            data, rank=0, world_size=1, seed=0, text_len=self.model.config.text_len,
            expected_codec_identity=self.codec_identity,
        )  # fmt: skip
        return heldout_loss(
            self.model, iter(loader), scheduler=self.objective.scheduler, max_batches=ev.heldout_batches,
            video_fps=float(self.cfg.objective.video_fps or 24.0), loss_weights=self.objective.loss_weights,
            should_stop=self.stopping if should_stop is None else should_stop,
        )  # fmt: skip


def any_rank(check: Callable[[], bool], device: torch.device) -> Callable[[], bool]:
    """`check` asked on this rank, answered for all: True on every rank when it is True on any. One all-reduce per
    call, so every rank must ask as often (before each denoising step, each held-out batch)."""
    return lambda: all_reduce([float(check())], "max", device)[0] > 0


def partitioned_by_zero3(model: torch.nn.Module) -> bool:
    """DeepSpeed ZeRO-3 gives each parameter it partitions a `ds_id` (ZeRO-1/2 and DDP leave parameters whole)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())
