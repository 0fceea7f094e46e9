"""Sequence parallel (DeepSpeed-Ulysses) groups composed with data parallel: world = dp x sp.

Ranks [d*sp, (d+1)*sp) form sequence-parallel group d (neighbours, so the all-to-alls stay inside a node when sp
divides the GPUs per node). Every rank of a group reads the same samples (the loader is split by `dp_rank`) and
draws the same noise; the video tokens are split over the group inside `MovaModel.forward`.

Gradients: every rank back-propagates the same full loss, and the model's collectives have exact adjoints, so the
group's gradients sum to sp times the single-device gradient; the engines (DDP, DeepSpeed ZeRO) average over the
whole world, which divides by dp x sp: the result is the data-parallel mean, with no group of their own to set.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from mova_train.errors import ConfigValueError
from mova_train.models.layers import attention
from mova_train.models.mova import MovaModel, set_sequence_shard
from mova_train.models.sequence import SequenceShard
from mova_train.training.config import ParallelConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParallelLayout:
    """Where this rank sits: data-parallel rank among `dp_size`, sequence rank among `sp_size`."""

    rank: int
    world_size: int
    sp_size: int = 1

    @property
    def dp_size(self) -> int:
        return self.world_size // self.sp_size

    @property
    def dp_rank(self) -> int:
        return self.rank // self.sp_size

    @property
    def sp_rank(self) -> int:
        return self.rank % self.sp_size


def build_layout(sequence_parallel_size: int, *, rank: int, world_size: int) -> ParallelLayout:
    """The layout of this rank; the world size must be a multiple of `parallel.sequence_parallel_size`."""
    sp = sequence_parallel_size
    if world_size % sp:
        raise ConfigValueError(
            f"parallel.sequence_parallel_size={sp} does not divide the world size {world_size}: "
            f"launch a multiple of {sp} processes"
        )
    return ParallelLayout(rank=rank, world_size=world_size, sp_size=sp)


class _LocalAttention(nn.Module):
    """The per-rank attention DistributedAttention calls: q, k, v [B, L, H/n, d] -> [B, L, H/n, d]."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return attention(q, k, v).unflatten(-1, (q.shape[2], q.shape[3]))


class _GatherSequence(torch.autograd.Function):
    """All-gather along dim 1 over `group`; backward: the sum over the group of the gradients of this rank's part.

    Not torch.distributed.nn.functional.all_gather: on gloo its backward scatters from group ranks taken as global
    ranks (torch 2.13), which fails on every group but the first. The sum is an all-reduce and a slice, which
    every backend has (gloo has no reduce-scatter); it carries the [B, L, ...] gradient, not [B, L/n, ...].
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group, ctx.rank, ctx.length = group, dist.get_rank(group), x.shape[1]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad.narrow(1, ctx.rank * ctx.length, ctx.length), None


class UlyssesShard(SequenceShard):
    """A `SequenceShard` over a process group: DeepSpeed-Ulysses self-attention (all-to-all from sequence-split
    to head-split and back) and a differentiable all-gather (backward: sum-reduce-scatter)."""

    def __init__(self, group: dist.ProcessGroup):
        import deepspeed.comm
        from deepspeed.sequence.layer import DistributedAttention

        # Under the plain (DDP) backend DeepSpeed's comm is not set up yet: it then wraps torch's process group.
        if not deepspeed.comm.is_initialized():
            deepspeed.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False)
        super().__init__(dist.get_rank(group), dist.get_world_size(group))
        self.group = group
        # [B, L/n, H, d]: scatter the heads (dim 2), gather the sequence (dim 1); batch is dim 0
        self.ulysses = DistributedAttention(_LocalAttention(), group, scatter_idx=2, gather_idx=1)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.ulysses(q, k, v, 0).flatten(2)  # [B, L/n, H*d]

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        return _GatherSequence.apply(x, self.group)


def build_sequence_groups(layout: ParallelLayout) -> dist.ProcessGroup | None:
    """Create every sequence-parallel group (collective: all ranks create all groups, in the same order) and return
    this rank's; None when sp = 1."""
    if layout.sp_size == 1:
        return None
    mine = None
    for d in range(layout.dp_size):
        ranks = list(range(d * layout.sp_size, (d + 1) * layout.sp_size))
        group = dist.new_group(ranks)
        if layout.rank in ranks:
            mine = group
    return mine


def apply_sequence_parallel(
    model: MovaModel, cfg: ParallelConfig, rank: int, world_size: int
) -> ParallelLayout:
    """This rank's layout; `model`'s training forwards made sequence-parallel over its group (collective when
    sp > 1: every rank creates every group)."""
    layout = build_layout(cfg.sequence_parallel_size, rank=rank, world_size=world_size)
    group = build_sequence_groups(layout)
    if group is not None:
        try:
            set_sequence_shard(model, UlyssesShard(group))
        except ValueError as e:
            raise ConfigValueError(str(e)) from None
        logger.info(
            "sequence parallel: rank %d is %d/%d of its group, data-parallel rank %d/%d",
            rank, layout.sp_rank, layout.sp_size, layout.dp_rank, layout.dp_size,
        )  # fmt: skip
    return layout
