"""What one simulated micro-step costs: live tensor bytes (and their peak), the kernel count and the bytes moved by
non-matmul kernels and the FLOPs, seen as aten ops under a `TorchDispatchMode`.

FLOPs use torch's formulas (`torch.utils.flop_counter`) in the same pass.

Live bytes: every storage an op returns is counted once, when it first appears, and uncounted by a weakref finalizer
when it dies, so views and in-place results are free and a tensor lives exactly as long as autograd, checkpointing and
the model keep it. The mode sits above `FakeTensorMode`, so it sees the same ops on fake tensors as on real ones.
"""

from __future__ import annotations

import contextlib
import weakref
from collections import defaultdict

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

aten = torch.ops.aten

# Matrix products and attention: counted as kernels and in FLOPs, not in "bytes moved by non-matmul ops".
MATMUL_OPS = frozenset(
    {
        aten.mm, aten.addmm, aten.bmm, aten.baddbmm, aten.convolution, aten.convolution_backward,
        aten._convolution, aten._scaled_dot_product_flash_attention_for_cpu,
        aten._scaled_dot_product_flash_attention_for_cpu_backward, aten._scaled_dot_product_flash_attention,
        aten._scaled_dot_product_flash_attention_backward, aten._scaled_dot_product_efficient_attention,
        aten._scaled_dot_product_efficient_attention_backward, aten._scaled_dot_product_cudnn_attention,
        aten._scaled_dot_product_cudnn_attention_backward, aten._flash_attention_forward,
        aten._flash_attention_backward, aten._efficient_attention_forward, aten._efficient_attention_backward,
    }
)  # fmt: skip
# Allocation and metadata ops: no kernel runs (views are recognised by their schema).
NO_KERNEL_OPS = frozenset(
    {
        aten.empty, aten.empty_strided, aten.empty_like, aten.new_empty, aten.new_empty_strided, aten.detach,
        aten.alias, aten.lift_fresh, aten._local_scalar_dense, aten._unsafe_view, aten._reshape_alias,
        aten.set_, aten.resize_, aten.sym_size, aten.sym_stride, aten.sym_numel, aten.sym_storage_offset,
        aten.promote_types, aten.result_type,
    }
)  # fmt: skip


# aten ops, and the model's own ops (`mova_train.models.kernels`), each one kernel on CUDA
KERNEL_NAMESPACES = frozenset({"aten", "mova"})


def _accumulating_grad() -> bool:
    node = torch._C._current_autograd_node()
    return node is not None and node.name().endswith("AccumulateGrad")


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def flop_formulas() -> dict:
    """torch's FLOP formulas (`torch.utils.flop_counter`, as FlopCounterMode counts), plus the CPU flash-attention
    ops it lacks, counted as CUDA flash attention is."""
    from torch.utils import flop_counter as fc

    @fc.shape_wrapper
    def forward(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return fc.sdpa_flop_count(query, key, value)

    @fc.shape_wrapper
    def backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
        return fc.sdpa_backward_flop_count(grad_out, query, key, value)

    return {
        **fc.flop_registry,
        aten._scaled_dot_product_flash_attention_for_cpu: forward,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: backward,
    }


class StepTracker(TorchDispatchMode):
    """Live bytes per device (now and peak) of the storages created while active, the FLOPs, the kernel count, and
    the bytes read + written by non-matmul kernels."""

    def __init__(self):
        super().__init__()
        self.live: dict[str, int] = defaultdict(int)
        self.peak: dict[str, int] = defaultdict(int)
        self.kernels = 0  # all kernels, matmul and attention included
        self.matmul_kernels = 0
        self.non_matmul_bytes = 0
        # of those: gradients added into existing .grad (AccumulateGrad), which the first micro-step of an optimizer
        # step does not run (the gradients were set to None) and later ones do
        self.accumulate_kernels = 0
        self.accumulate_bytes = 0
        self.flops = 0
        self._flop_formulas = flop_formulas()
        self._tracked: dict[int, tuple[str, int]] = {}
        self._host = 0  # > 0 inside host_scope(): new storages are host memory (the fake device is the CPU)

    @contextlib.contextmanager
    def host_scope(self):
        """Storages created inside count as pinned host memory ("host"), not the GPU's: the activation offload's
        copies (`models.offload.OffloadedForward.host_allocation`)."""
        self._host += 1
        try:
            yield
        finally:
            self._host -= 1

    def _free(self, key: int) -> None:
        device, n = self._tracked.pop(key, (None, 0))
        if device is not None:
            self.live[device] -= n

    def track(self, t: torch.Tensor) -> None:
        """Count `t`'s storage from now until it dies (once, however many views of it appear)."""
        storage = t.untyped_storage()
        key = id(storage)
        if key in self._tracked:
            return
        device, n = ("host" if self._host else t.device.type), storage.nbytes()
        self._tracked[key] = (device, n)
        weakref.finalize(storage, self._free, key)
        self.live[device] += n
        if self.live[device] > self.peak[device]:
            self.peak[device] = self.live[device]

    def reset_peak(self) -> None:
        self.peak = defaultdict(int, self.live)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.namespace not in KERNEL_NAMESPACES or func.is_view:
            return out  # a view allocates nothing and runs no kernel
        outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        packet = func.overloadpacket
        formula = self._flop_formulas.get(packet)
        if formula is not None:
            self.flops += int(formula(*args, **kwargs, out_val=out))
        if packet not in NO_KERNEL_OPS:
            self.kernels += 1
            if packet in MATMUL_OPS:
                self.matmul_kernels += 1
            else:
                moved = sum(_nbytes(t) for t in inputs) + sum(_nbytes(t) for t in outputs)
                self.non_matmul_bytes += moved
                if packet is aten.add_ and _accumulating_grad():
                    self.accumulate_kernels += 1
                    self.accumulate_bytes += moved
        # in-place and out= results are their inputs' storage: nothing new is allocated
        written = {id(t.untyped_storage()) for t in inputs} if func._schema.is_mutable else ()
        for t in outputs:
            if id(t.untyped_storage()) not in written:
                self.track(t)
        return out
