"""The Evaluator: renders of `eval.prompts` and the held-out loss during training, on the main process (the others
wait), without touching any training RNG stream. Writes `<run_dir>/eval/eval.jsonl` and logs to W&B."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mova_train import run_layout as layout
from mova_train.codecs import load_codecs
from mova_train.config import TrainConfig, resolve_path
from mova_train.data.config import DataConfig
from mova_train.data.loader import build_loader
from mova_train.sampling.evaluate import heldout_loss, log_renders_to_wandb, render_eval, sync_summary
from mova_train.training.distributed import barrier
from mova_train.training.objective import FlowMatchingObjective

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
    ):
        self.cfg, self.ev = cfg, cfg.eval
        self.out_dir = Path(run_dir) / layout.EVAL_DIR
        self.model, self.objective = model, objective
        self.device, self.is_main = device, is_main
        self.codec_identity = codec_identity
        self.codecs = None  # loaded at the first render

    def due(self, step: int) -> bool:
        return bool(self.ev.every) and step % self.ev.every == 0

    def run(self, step: int, tracker=None) -> None:
        """Collective: rank 0 evaluates, every rank waits for it."""
        if self.is_main:
            row: dict[str, Any] = {"step": step}
            py, nps = random.getstate(), np.random.get_state()
            was_training = self.model.training
            self.model.eval()
            try:
                with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                    if self.ev.prompts:
                        row.update(self.render_prompts(step, tracker))
                    if self.ev.heldout_shards:
                        row.update({f"heldout_{k}": v for k, v in self.heldout_loss().items()})
            finally:
                self.model.train(was_training)
                random.setstate(py)
                np.random.set_state(nps)
            logger.info("eval at step %d: %s", step, {k: v for k, v in row.items() if k != "step"})
            self.out_dir.mkdir(exist_ok=True)
            with open(self.out_dir / "eval.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(row, sort_keys=True) + "\n")
            if tracker is not None and tracker.run is not None:
                tracker.log_media({f"eval/{k}": v for k, v in row.items() if k != "step"}, step=step)
        barrier()

    def render_prompts(self, step: int, tracker=None) -> dict:
        ev = self.ev
        if self.codecs is None:
            checkpoint = resolve_path(self.cfg.model.checkpoint, field_name="model.checkpoint")
            self.codecs = load_codecs(checkpoint, device=self.device)
        records = render_eval(
            self.model, self.codecs, list(ev.prompts), self.out_dir, step=step, seed=ev.seed,
            negative_prompt=ev.negative_prompt, num_frames=ev.num_frames, height=ev.height, width=ev.width,
            steps=ev.steps, cfg_scale=ev.cfg_scale,
        )  # fmt: skip
        if tracker is not None and tracker.run is not None:
            log_renders_to_wandb(records, step=step, run=tracker.run)
        return {"renders": len(records), **sync_summary(records)}

    def heldout_loss(self) -> dict:
        """The objective's loss (weights included) at fixed timesteps with fixed-seed noise, over the held-out shards."""
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
        )  # fmt: skip
