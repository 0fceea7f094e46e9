"""Flow-matching scheduler of MOVA (spec §12) and the expert routing rule (spec §7), shared by trainer and sampler.

Timesteps t are in [0, num_train_timesteps] (t = 1000·σ after the shift), the unit the model and the routing use.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..names import EXPERTS
from .config import SchedulerConfig


def expert_for_timestep(t: float | torch.Tensor, boundary: float = 900.0) -> str:
    """`video_dit` (high-noise expert) when t >= boundary, else `video_dit_2`. A tensor must route one way."""
    if isinstance(t, torch.Tensor):
        if t.numel() == 0:
            raise ValueError("expert_for_timestep: empty timestep tensor")
        high = t >= boundary
        if bool(high.all()):
            return EXPERTS[0]
        if not bool(high.any()):
            return EXPERTS[1]
        raise ValueError(
            f"expert_for_timestep: timesteps {t.tolist()} straddle the boundary {boundary}; "
            "one call runs one expert, so split the batch by expert"
        )
    return EXPERTS[0] if float(t) >= boundary else EXPERTS[1]


def float32_linspace(start: float, end: float, steps: int) -> torch.Tensor:
    """`torch.linspace(start, end, steps)` in float32 as the reference computes it on GPU, on any CPU.

    The step is a float32 division; the first half counts up from `start`, the second half down from `end`, each
    value one fused multiply-add (`start + step·i` rounded once). ATen's CPU kernel gives these values only when it
    vectorises with FMA (AVX2), so the grid is built here in float64, where `step·i` and the sum are exact, and
    rounded once to float32.
    """
    if steps < 1:
        raise ValueError(f"linspace needs at least 1 point, got {steps}")
    start32 = torch.tensor(start, dtype=torch.float32)
    end32 = torch.tensor(end, dtype=torch.float32)
    if steps == 1:
        return start32.reshape(1)
    step32 = (end32 - start32) / torch.tensor(steps - 1, dtype=torch.float32)
    idx = torch.arange(steps, dtype=torch.float64)
    step = step32.double()
    up = start32.double() + step * idx
    down = end32.double() - step * (steps - 1 - idx)
    return torch.where(idx < steps // 2, up, down).float()


class FlowMatchScheduler:
    """σ grid, noising, velocity target and Euler step; σ lookups snap to the 1000-entry training table."""

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 5.0,
        extra_one_step: bool = True,
        sigma_min: float = 0.003 / 1.002,
        sigma_max: float = 1.0,
    ):
        self.config = SchedulerConfig(
            num_train_timesteps=num_train_timesteps,
            shift=shift,
            extra_one_step=extra_one_step,
            sigma_min=sigma_min,
            sigma_max=sigma_max,
        )
        self.config.validate("FlowMatchScheduler")
        self.num_train_timesteps = num_train_timesteps
        self.shift = float(shift)
        self.extra_one_step = extra_one_step
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        # The training table, float32 as the reference builds it; σ lookups snap to it (spec §12).
        self.train_sigmas = self._sigmas(num_train_timesteps)  # float32 [num_train_timesteps]
        self.train_timesteps = self._timesteps(self.train_sigmas)  # 1000.0 .. 19.64

    @classmethod
    def from_config(cls, config: dict | SchedulerConfig) -> FlowMatchScheduler:
        """From a `scheduler_config.json` dict (validated; unsupported options raise) or a SchedulerConfig."""
        cfg = config if isinstance(config, SchedulerConfig) else SchedulerConfig.from_dict(config)
        return cls(
            num_train_timesteps=cfg.num_train_timesteps,
            shift=cfg.shift,
            extra_one_step=cfg.extra_one_step,
            sigma_min=cfg.sigma_min,
            sigma_max=cfg.sigma_max,
        )

    def _sigmas(self, n: int) -> torch.Tensor:
        """σ grid of n steps in float32, in the reference's order: linspace, then the shift, each op in float32."""
        if n < 1:
            raise ValueError(f"number of steps must be >= 1, got {n}")
        sigma_start = self.sigma_min + (self.sigma_max - self.sigma_min) * 1.0  # denoising strength 1
        if self.extra_one_step:
            s = float32_linspace(sigma_start, self.sigma_min, n + 1)[:-1]
        else:
            s = float32_linspace(sigma_start, self.sigma_min, n)
        return self.shift * s / (1 + (self.shift - 1) * s)

    def _timesteps(self, sigmas: torch.Tensor) -> torch.Tensor:
        return sigmas * self.num_train_timesteps  # float32, as the reference

    def sampling_timesteps(self, num_steps: int) -> torch.Tensor:
        """Timesteps of an n-step sampling run, high to low (float32); with 50 steps every 20th training entry."""
        return self._timesteps(self._sigmas(num_steps))

    def sigma_for(self, t: float | torch.Tensor) -> torch.Tensor:
        """σ of the nearest training-table timestep (float32, same shape as t), compared in float32 as the
        reference does; the table's own timesteps map to their σ exactly."""
        t = torch.as_tensor(t).to(torch.float32)
        grid = self.train_timesteps.to(t.device)
        idx = (grid[None, :] - t.reshape(-1, 1)).abs().argmin(dim=1)
        return self.train_sigmas.to(t.device)[idx].reshape(t.shape)

    @staticmethod
    def _bcast(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """σ scalar or [B] -> broadcastable against like [B, ...]."""
        sigma = sigma.to(like.device)
        if sigma.dim() == 0:
            return sigma
        if sigma.shape[0] != like.shape[0]:
            raise ValueError(
                f"timesteps have batch size {sigma.shape[0]} but the tensor has shape {list(like.shape)}"
            )
        return sigma.reshape(-1, *([1] * (like.dim() - 1)))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        """x_t = (1-σ)·x0 + σ·noise with σ = σ(t) per sample; computed in fp32, returned in x0's dtype."""
        if x0.shape != noise.shape:
            raise ValueError(f"add_noise: x0 {list(x0.shape)} and noise {list(noise.shape)} differ in shape")
        sigma = self._bcast(self.sigma_for(t), x0)
        return ((1 - sigma) * x0.float() + sigma * noise.float()).to(x0.dtype)

    @staticmethod
    def target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Velocity target v* = noise - x0."""
        return noise - x0

    @staticmethod
    def loss(
        pred_video: torch.Tensor,
        pred_audio: torch.Tensor,
        target_video: torch.Tensor,
        target_audio: torch.Tensor,
        *,
        weight_video: float = 1.0,
        weight_audio: float = 1.0,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The training loss (spec §16: plain MSE of the velocities, in fp32): (weighted total, video, audio).
        The one formula that training and the held-out evaluation both use."""
        loss_v = F.mse_loss(pred_video.float(), target_video)
        loss_a = F.mse_loss(pred_audio.float(), target_audio)
        return weight_video * loss_v + weight_audio * loss_a, loss_v, loss_a

    def step(
        self,
        v: torch.Tensor,
        t_from: float | torch.Tensor,
        t_to: float | torch.Tensor | None,
        x: torch.Tensor,
    ) -> torch.Tensor:
        """Euler step x + v·(σ(t_to) - σ(t_from)); t_to None is the last step (σ = 0). fp32 math, x's dtype out."""
        s_from = self.sigma_for(t_from)
        s_to = torch.zeros_like(s_from) if t_to is None else self.sigma_for(t_to)
        delta = self._bcast(s_to - s_from, x)
        return (x.float() + v.float() * delta).to(x.dtype)

    def boundary_timestep(self, ratio: float) -> float:
        """Expert boundary in timestep units: ratio · num_train_timesteps (900 for the released 0.9)."""
        return float(ratio) * self.num_train_timesteps

    def train_boundary_index(self, boundary: float) -> int:
        """#training-table entries with t >= boundary (359 for 900 with extra_one_step: index boundary 0.359)."""
        return int((self.train_timesteps >= boundary).sum())

    def expert_index_range(self, expert: str, boundary: float) -> tuple[int, int]:
        """Training-table index range [lo, hi) an expert is trained on (spec §7: [0, 359) and [359, 1000))."""
        b = self.train_boundary_index(boundary)
        if expert == EXPERTS[0]:
            return 0, b
        if expert == EXPERTS[1]:
            return b, self.num_train_timesteps
        raise ValueError(f"unknown expert {expert!r}; allowed: {', '.join(EXPERTS)}")

    def sample_training_timesteps(
        self,
        expert: str,
        batch_size: int,
        boundary: float,
        *,
        generator: torch.Generator | None = None,
        device: str | torch.device = "cpu",
    ) -> torch.Tensor:
        """Uniform draw of training-table timesteps [batch_size] from the expert's index range."""
        lo, hi = self.expert_index_range(expert, boundary)
        if hi <= lo:
            raise ValueError(f"expert {expert!r} owns no training timesteps at boundary {boundary}")
        idx = torch.randint(lo, hi, (batch_size,), generator=generator)
        return self.train_timesteps[idx].to(device)
