"""The fake accelerator the planner runs a micro-step on: parameters and activations are `FakeTensor`s (shapes,
dtypes and lifetimes, no data, no math), and the few host-side computations the model does on values (frame
positions read with `.tolist()`) run for real.

Why a fake *CPU* device stands for the GPU: on a CPU-only torch build, fake `cuda` tensors fail inside indexing and
autograd (no CUDA device guard), so the step runs on fake `cpu` tensors; every op the model issues is the same, only
the kernel choice differs (SDPA takes its CPU flash kernel, which saves the same output + logsumexp as CUDA flash).

CUDA bf16 autocast (what accelerate's plain backend uses with trainer.mixed_precision=bf16) is emulated by real CPU
autocast, whose lower-precision list (matmuls, linear, convolutions, SDPA) matches CUDA's, plus the ops CUDA autocast
runs in fp32 and CPU autocast does not (`CUDA_FP32_OPS`: layer/group norm, softmax, ...), cast here to fp32 first.
Approximation: ops outside both lists behave as on CPU; `Fp32Linear`'s `torch.autocast(enabled=False)` is honoured.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves, tree_map

from mova_train.models import layers as model_layers
from mova_train.models.sequence import SequenceShard

# Ops CUDA autocast runs in fp32 (autocast_mode.cpp's fp32 list) that matter for this model.
CUDA_FP32_OPS = frozenset(
    {
        F.layer_norm, torch.layer_norm, F.group_norm, torch.group_norm, F.softmax, torch.softmax,
        torch.Tensor.softmax, F.log_softmax, torch.log_softmax, F.mse_loss, torch.rsqrt, torch.Tensor.rsqrt,
        torch.exp, torch.Tensor.exp, torch.log, torch.Tensor.log, torch.pow, torch.Tensor.pow, torch.sum,
        torch.Tensor.sum, torch.cumsum, torch.Tensor.cumsum, torch.norm, torch.Tensor.norm, F.rms_norm,
        torch.rms_norm,
    }
)  # fmt: skip


def _is_fake(x) -> bool:
    return isinstance(x, FakeTensor)


class HostAndAutocast(TorchFunctionMode):
    """Calls with no fake tensor among their arguments and no explicit device (host bookkeeping: the bridge's frame
    positions) run for real; with `cuda_autocast`, CUDA autocast's fp32 ops get fp32 inputs while autocast is on."""

    def __init__(self, cuda_autocast: bool):
        super().__init__()
        self.cuda_autocast = cuda_autocast

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves = [x for x in tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
        if not any(_is_fake(x) or x.is_meta for x in leaves) and (leaves or kwargs.get("device") is None):
            with unset_fake_temporarily():
                return func(*args, **kwargs)
        if self.cuda_autocast and func in CUDA_FP32_OPS and torch.is_autocast_enabled("cpu"):

            def up(x):
                low = isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != torch.float32
                return x.float() if low else x

            args, kwargs = tree_map(up, args), tree_map(up, kwargs)
        return func(*args, **kwargs)


def clear_model_caches() -> None:
    """Empty the model's memoised tables (RoPE): a table made of fake tensors must not outlive its fake mode, and
    a real one would hide the table's cost from the tracker."""
    for obj in vars(model_layers).values():
        if isinstance(obj, functools._lru_cache_wrapper):
            obj.cache_clear()


@contextlib.contextmanager
def _entered(*contexts):
    with contextlib.ExitStack() as stack:
        for c in contexts:
            stack.enter_context(c)
        yield


@contextlib.contextmanager
def _function_mode_in_recompute(make_mode):
    """torch 2.13 runs a checkpoint's recompute (inside backward) without the caller's TorchFunctionMode, so the
    autocast emulation would recompute other dtypes than the forward saved; `torch.utils.checkpoint.checkpoint` is
    wrapped for the simulation so that its recompute context also enters `make_mode()`."""
    original = torch.utils.checkpoint.checkpoint

    @functools.wraps(original)
    def checkpoint(function, *args, context_fn=torch.utils.checkpoint.noop_context_fn, **kwargs):
        def contexts():
            forward, recompute = context_fn()
            return forward, _entered(recompute, make_mode())

        return original(function, *args, context_fn=contexts, **kwargs)

    torch.utils.checkpoint.checkpoint = checkpoint
    try:
        yield
    finally:
        torch.utils.checkpoint.checkpoint = original


@contextlib.contextmanager
def fake_device(*, cuda_autocast: bool):
    """Fake tensors everywhere inside; yields the FakeTensorMode (its `from_tensor` converts real tensors)."""
    clear_model_caches()
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if cuda_autocast else contextlib.nullcontext()
    try:
        recompute = _function_mode_in_recompute(lambda: HostAndAutocast(cuda_autocast))
        with mode, HostAndAutocast(cuda_autocast), autocast, recompute:
            yield mode
    finally:
        clear_model_caches()


class _Exchange(torch.autograd.Function):
    """A collective's shape and fresh memory without communication: x -> an uninitialised tensor of `shape`;
    backward likewise back to x's shape (the adjoint collective's result)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        ctx.shape = tuple(x.shape)
        return x.new_empty(shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.new_empty(ctx.shape), None


class PlannedShard(SequenceShard):
    """One rank of a sequence-parallel group as `mova_train.training.parallel.UlyssesShard` runs it, shapes and
    memory only: the all-to-all to [B, L, H/n, d] before attention and back to [B, L/n, H*d] after, and the
    all-gather [B, L/n, ...] -> [B, L, ...] (with the full-length gradient its backward reduces)."""

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, ln, h, d = q.shape
        if h % self.size:
            raise ValueError(f"{h} heads do not split over a sequence-parallel group of {self.size}")
        full = (b, ln * self.size, h // self.size, d)
        out = model_layers.attention(*(_Exchange.apply(x, full) for x in (q, k, v)))  # [B, L, H/n * d]
        return _Exchange.apply(out, (b, ln, h * d))

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        return _Exchange.apply(x, (x.shape[0], x.shape[1] * self.size, *x.shape[2:]))
