"""One optimizer step's bookkeeping with a single host sync: the micro-steps' losses are summed on the device,
the host-side counts and the timesteps (drawn on CPU) join them in one float64 vector, the non-finite and stop
flags ride along, one all-reduce sums it over the ranks and one read brings it to the host.

The sums are exactly those of the former per-micro-step `float(...)` reads (float64 additions in the same order),
so every logged figure is bit-identical. Per-rank lists (timesteps) travel in per-rank slots of the summed vector:
each rank fills its own slot and leaves the others 0, and x + 0 is exact, so the sum is a gather.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mova_train.data.batch import to_device
from mova_train.training.distributed import rank_and_world, sum_across_ranks

# Layout of the reduced vector: the sums, then the two flags, then per-rank timestep slots and counts.
SUMS = ("loss", "loss_video", "loss_audio", "samples", "tokens", "rejected")
NUM_HEAD = len(SUMS) + 2  # + stop, nonfinite


@dataclass
class StepTotals:
    """What the host learns of an optimizer step, after the one read."""

    sums: dict[str, float]  # over all ranks (a sequence group's ranks each count their shared samples once)
    stop: bool  # a stop signal reached some rank
    nonfinite: bool  # some rank had a non-finite loss, or the gradient norm is not finite
    grad_norm: float | None  # the backend's norm before clipping (None: the backend computes it in its step)
    timesteps: list[list[float]]  # per rank, in rank order
    timesteps_audio: list[list[float]]


class StepAccumulator:
    """Collects one accumulation window of one rank; `finish` does the all-reduce and the one host read."""

    def __init__(self, device: torch.device, slot_length: int):
        self.device = device
        self.slot_length = slot_length  # most timesteps one rank draws in a window (gas * batch size)
        self.losses = torch.zeros(3, dtype=torch.float64, device=device)  # loss, video, audio
        self.samples = 0
        self.tokens = 0
        self.timesteps: list[torch.Tensor] = []  # CPU tensors, as drawn
        self.timesteps_audio: list[torch.Tensor] = []

    def add(
        self,
        loss: torch.Tensor,
        loss_video: torch.Tensor,
        loss_audio: torch.Tensor,
        *,
        samples: int,
        tokens: int,
        timesteps: torch.Tensor,
        timesteps_audio: torch.Tensor,
    ) -> None:
        """One micro-step; the losses stay on the device, the timesteps on the host."""
        self.losses += torch.stack([x.detach().double() for x in (loss, loss_video, loss_audio)])
        self.samples += samples
        self.tokens += tokens
        if timesteps.device.type != "cpu" or timesteps_audio.device.type != "cpu":
            raise ValueError(
                "StepAccumulator.add: pass the timesteps as drawn, on the CPU (reading a device copy syncs)"
            )
        self.timesteps.append(timesteps)
        self.timesteps_audio.append(timesteps_audio)

    def finish(self, *, rejected: float, stop: bool, grad_norm: torch.Tensor | None) -> StepTotals:
        """The one collective and the one device->host read of the step."""
        rank, world = rank_and_world()
        n = self.slot_length
        nonfinite = ~torch.isfinite(self.losses[0])
        if grad_norm is not None:
            nonfinite = nonfinite | ~torch.isfinite(grad_norm)
        tv, ta = (
            torch.cat(ts).double()[:n] if ts else torch.zeros(0)
            for ts in (self.timesteps, self.timesteps_audio)
        )
        host = torch.zeros(4 + 2 * world * n + world, dtype=torch.float64)
        host[:4] = torch.tensor([self.samples, self.tokens, rejected, float(stop)], dtype=torch.float64)
        slots = host[4:]  # [timesteps of rank 0..world-1 | audio timesteps of rank 0..world-1 | counts]
        slots[rank * n : rank * n + len(tv)] = tv
        slots[(world + rank) * n : (world + rank) * n + len(ta)] = ta
        slots[2 * world * n + rank] = len(tv)
        host = to_device(host, self.device)  # pinned, non-blocking when the device is a GPU
        vector = torch.cat([self.losses, host[:4], nonfinite.double().view(1), host[4:]])
        vector = sum_across_ranks(vector)
        if grad_norm is not None:
            vector = torch.cat([vector, grad_norm.detach().double().view(1)])
        values = vector.tolist()  # the step's one host sync
        head, rest = values[:NUM_HEAD], values[NUM_HEAD:]
        norm = rest.pop() if grad_norm is not None else None
        counts = [int(c) for c in rest[2 * world * n :]]
        per_rank = [rest[r * n : r * n + counts[r]] for r in range(world)]
        per_rank_audio = [rest[(world + r) * n : (world + r) * n + counts[r]] for r in range(world)]
        return StepTotals(
            sums=dict(zip(SUMS, head[: len(SUMS)])),
            stop=head[len(SUMS)] > 0,
            nonfinite=head[len(SUMS) + 1] > 0,
            grad_norm=norm,
            timesteps=per_rank,
            timesteps_audio=per_rank_audio,
        )
