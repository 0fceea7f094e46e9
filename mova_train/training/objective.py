"""Flow-matching objective of MOVA training (spec §7, §8, §12, §16): which expert a micro-step trains, its
timesteps, the noised inputs and the weighted video + audio velocity loss.

Timesteps are always entries of the scheduler's 1000-entry shifted training table, in t units (t = 1000·σ),
and the expert that owns them is decided by the one router `mova_train.models.expert_for_timestep`.
Layouts: video latents [B, 16, T, h, w], first-frame latent [B, 16, T, h, w], audio latents [B, Ca, L].
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from mova_train.data.batch import to_device
from mova_train.models import FlowMatchScheduler, build_i2v_condition, expert_for_timestep
from mova_train.names import EXPERTS
from mova_train.training.config import ObjectiveConfig


class ExpertChooser:
    """Picks the video expert of each micro-step, identically on every rank.

    Every rank must run the same expert in a micro-step (ZeRO-3 gathers the expert's weights collectively), so
    `ratio` draws from a stream seeded by the run seed only. With `expert_switch_every` = 1 (the reference) the
    choice is per micro-step; with N > 1 it is per phase of N optimizer steps (N x gradient_accumulation_steps
    micro-steps), so a phase trains one expert and the idle one is swapped in once per phase. Either way the choice
    is a pure function of (seed, micro-step): a resume continues the phase exactly, with nothing to restore.
    """

    def __init__(self, cfg: ObjectiveConfig, seed: int, gradient_accumulation_steps: int = 1):
        self.mode = cfg.expert
        self.ratio = float(cfg.high_noise_ratio)
        self.seed = int(seed)
        self.switch_every = int(cfg.expert_switch_every)
        self.gas = int(gradient_accumulation_steps)

    def phase(self, micro_step: int) -> int:
        """Index of the phase holding global micro-step `micro_step` (a phase = one choice of expert)."""
        if self.switch_every == 1:
            return micro_step
        return micro_step // (self.switch_every * self.gas)

    def expert(self, micro_step: int) -> str:
        """Expert for global micro-step `micro_step` (0-based, counts every micro-batch, as the reference)."""
        if self.mode.startswith("only:"):
            return self.mode.split(":", 1)[1]
        phase = self.phase(micro_step)
        if self.mode == "alternate":
            return EXPERTS[phase % 2]  # reference: even -> high-noise expert
        # ratio: a pure function of (seed, phase); switch_every=1 keeps the reference's per-micro-step key
        key = (
            f"{self.seed}:{phase}"
            if self.switch_every == 1
            else f"{self.seed}:phase{self.switch_every}:{phase}"
        )
        return EXPERTS[0] if random.Random(key).random() < self.ratio else EXPERTS[1]

    def schedule(self) -> dict:
        """The settings that decide the choice (saved with a checkpoint; a resume must keep them)."""
        out = {"expert": self.mode, "expert_switch_every": self.switch_every}
        if self.mode == "ratio":
            out["high_noise_ratio"] = self.ratio
        return out

    def state_at(self, step: int) -> dict:
        """The schedule and the phase at optimizer step `step` (what a checkpoint of that step records)."""
        micro = step * self.gas
        return {**self.schedule(), "phase": self.phase(micro), "phase_expert": self.expert(micro)}


@dataclass
class TimestepSampler:
    """Draws training-table timesteps inside an expert's range (uniform over entries, or logit-normal)."""

    scheduler: FlowMatchScheduler
    boundary: float  # timestep units, e.g. 900
    sampling: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0

    def index_range(self, expert: str | None) -> tuple[int, int]:
        """[lo, hi) of table indices; expert None = the whole table (independent audio timesteps)."""
        if expert is None:
            return 0, self.scheduler.num_train_timesteps
        return self.scheduler.expert_index_range(expert, self.boundary)

    def sample(self, expert: str | None, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """[batch_size] float32 timesteps; with an expert, every one routes to that expert."""
        lo, hi = self.index_range(expert)
        if hi <= lo:
            raise ValueError(f"expert {expert!r} owns no training timesteps at boundary {self.boundary}")
        if self.sampling == "uniform":
            idx = torch.randint(lo, hi, (batch_size,), generator=generator)
        else:
            # Position u in (0, 1) inside the range, logit-normal (SD3-style) around the range's middle.
            z = torch.randn(batch_size, generator=generator, dtype=torch.float64)
            u = torch.sigmoid(z * self.logit_std + self.logit_mean)
            idx = (lo + torch.floor(u * (hi - lo)).long()).clamp(lo, hi - 1)
        t = self.scheduler.train_timesteps[idx].float()
        if expert is not None:
            routed = expert_for_timestep(t, self.boundary)
            assert routed == expert, f"drew timesteps {t.tolist()} for {expert} that route to {routed}"
        return t


@dataclass
class MicroStepInputs:
    """Everything one forward needs, plus the targets; built from a batch with this rank's generator."""

    expert: str
    noisy_video: torch.Tensor  # [B, 16, T, h, w]
    video_cond: torch.Tensor  # [B, 20, T, h, w]
    noisy_audio: torch.Tensor  # [B, Ca, L]
    text: torch.Tensor  # [B, N, Dt]
    timestep_video: torch.Tensor  # [B]
    timestep_audio: torch.Tensor  # [B]
    drawn_timesteps: tuple[torch.Tensor, torch.Tensor]  # (video, audio) [B] each, as drawn, on the CPU
    target_video: torch.Tensor  # noise - x0, [B, 16, T, h, w]
    target_audio: torch.Tensor  # [B, Ca, L]


class FlowMatchingObjective:
    """Builds a micro-step's inputs and computes its loss; the randomness comes from the caller's generator."""

    def __init__(
        self,
        cfg: ObjectiveConfig,
        scheduler: FlowMatchScheduler,
        boundary: float,
        seed: int,
        gradient_accumulation_steps: int = 1,
    ):
        self.cfg = cfg
        self.scheduler = scheduler
        self.boundary = float(boundary)
        self.chooser = ExpertChooser(cfg, seed, gradient_accumulation_steps)
        self.timesteps = TimestepSampler(
            scheduler, self.boundary, cfg.timestep_sampling, cfg.logit_normal_mean, cfg.logit_normal_std
        )

    def prepare(
        self,
        video: torch.Tensor,
        first_frame: torch.Tensor,
        audio: torch.Tensor,
        text: torch.Tensor,
        *,
        micro_step: int,
        generator: torch.Generator,
    ) -> MicroStepInputs:
        """Draw expert, timesteps and independent video/audio noise (fp32, on the generator's device = CPU)."""
        expert = self.chooser.expert(micro_step)
        b = video.shape[0]
        tv = self.timesteps.sample(expert, b, generator)
        ta = self.timesteps.sample(None, b, generator) if self.cfg.independent_audio_timestep else tv.clone()
        # Noise is drawn on CPU in fp32 so it is the same on every device type; then moved next to the data
        # (pinned, non-blocking to a GPU).
        noise_v = to_device(torch.randn(video.shape, generator=generator, dtype=torch.float32), video.device)
        noise_a = to_device(torch.randn(audio.shape, generator=generator, dtype=torch.float32), audio.device)
        x0_v, x0_a = video.float(), audio.float()
        return MicroStepInputs(
            expert=expert,
            noisy_video=self.scheduler.add_noise(x0_v, noise_v, tv),
            video_cond=build_i2v_condition(first_frame.float()),
            noisy_audio=self.scheduler.add_noise(x0_a, noise_a, ta),
            text=text,
            timestep_video=to_device(tv, video.device),
            timestep_audio=to_device(ta, video.device),
            drawn_timesteps=(tv, ta),
            target_video=self.scheduler.target(x0_v, noise_v),
            target_audio=self.scheduler.target(x0_a, noise_a),
        )

    def loss(
        self, pred_video: torch.Tensor, pred_audio: torch.Tensor, inputs: MicroStepInputs
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(weighted total, video MSE, audio MSE), each a scalar computed in fp32 (spec §16: plain MSE)."""
        total, loss_v, loss_a = self.scheduler.loss(
            pred_video, pred_audio, inputs.target_video, inputs.target_audio, **self.loss_weights
        )
        return total, loss_v.detach(), loss_a.detach()

    @property
    def loss_weights(self) -> dict[str, float]:
        return {"weight_video": self.cfg.loss_weight_video, "weight_audio": self.cfg.loss_weight_audio}


def batch_video_fps(batch, override: float | None) -> float:
    """The frame rate the model is told (RoPE time scale): `objective.video_fps`, else the batch's own (one rate)."""
    if override is not None:
        return float(override)
    rates = {float(m["fps"]) for m in batch.meta if "fps" in m}
    if len(rates) > 1:
        raise ValueError(f"batch {batch.keys} mixes frame rates {sorted(rates)}; set objective.video_fps")
    return rates.pop() if rates else 24.0


def tokens_per_sample(batch, patch_size: tuple[int, int, int]) -> int:
    """Video patches + audio latent frames of one sample of `batch`."""
    _, _, t, h, w = batch.video.shape
    pt, ph, pw = patch_size
    return (t // pt) * (h // ph) * (w // pw) + batch.audio.shape[-1]
