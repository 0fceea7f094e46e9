"""Block streaming (`model.offload_blocks=K`): the frozen weights of the last K blocks of each video expert live in
host memory (pinned on CUDA) and are copied to the compute device just before each use, then released.

A streamed parameter keeps its `nn.Parameter` object (PEFT, the optimizer and autograd hold it), but between uses
its `.data` is an empty placeholder on the compute device; the host copy is `host_data(p)`. Module hooks drive it:

- forward pre-hook of block j: its weights resident (waiting for a prefetch, if one is in flight), block j+1's
  copy started on a side stream (CUDA; elsewhere copies are synchronous), stale blocks released;
- forward post-hook: released; when the output needs a gradient, a hook on it makes the block resident again
  when backward reaches it (and prefetches the block before it), and a hook on the block's input releases it
  once the input's gradient is complete. A recompute under activation checkpointing runs inside backward, where
  the block is already resident and the post-hook keeps it; whatever is still resident when backward ends is
  released by a callback queued on the autograd engine.

Autograd saves a leaf parameter by reference, so a block's backward sees the weights of whenever it runs, which the
hooks make the right ones: results are bit-identical to a resident model. LoRA parameters, added after this is
applied, are not streamed. Only one block (two while a prefetch is in flight) is on the device at a time.
"""

from __future__ import annotations

import torch
from torch import nn

from ..names import EXPERTS

_HOST = "_mova_stream_host"  # attribute of a streamed parameter: its host copy


def is_streamed(p: torch.Tensor) -> bool:
    """Whether `p` is a streamed parameter (its value lives on the host; the device holds it only in flight)."""
    return hasattr(p, _HOST)


def host_data(p: torch.Tensor) -> torch.Tensor:
    """The value of `p` whether or not it is streamed (the host copy of a streamed parameter)."""
    host = getattr(p, _HOST, None)
    return p.data if host is None else host


class _Block:
    def __init__(self, module: nn.Module, params: list[nn.Parameter], nxt: int | None, prev: int | None):
        self.module, self.params, self.next, self.prev = module, params, nxt, prev
        self.tensors: list[torch.Tensor] | None = None  # device copies while resident or in flight
        self.event = None  # CUDA event recorded after the copy (side stream)


class BlockStreamer:
    """Streams the frozen parameters of `blocks` (each list in execution order) between host and `device`."""

    def __init__(self, towers: list[list[nn.Module]], device: torch.device | str):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda" and torch.cuda.is_available()
        self.side_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.blocks: list[_Block] = []
        self.in_backward = False
        self.max_resident = 0  # most blocks on the device at once (for tests and the planner)
        self._handles = []
        for tower in towers:
            first = len(self.blocks)
            for i, module in enumerate(tower):
                index = first + i
                nxt = index + 1 if i + 1 < len(tower) else None
                prev = index - 1 if i > 0 else None
                self.blocks.append(_Block(module, self._offload(module), nxt, prev))
                self._handles.append(module.register_forward_pre_hook(self._make_pre_forward(index)))
                self._handles.append(module.register_forward_hook(self._make_post_forward(index)))

    def _offload(self, module: nn.Module) -> list[nn.Parameter]:
        named = list(module.named_parameters())
        if any(".lora_" in name for name, _ in named):
            raise ValueError("block streaming moves the frozen base only: apply it before LoRA is injected")
        params = [p for _, p in named]
        for p in params:
            host = p.data.to("cpu")
            if self.cuda:
                host = host.pin_memory()
            setattr(p, _HOST, host)
            p.data = self._placeholder(host)
        return params

    def _placeholder(self, host: torch.Tensor) -> torch.Tensor:
        return torch.empty(0, dtype=host.dtype, device=self.device)

    # ------------------------------------------------------------------ moving weights
    @property
    def resident(self) -> list[int]:
        """Indices of the blocks whose weights are on the device (or on their way)."""
        return [i for i, b in enumerate(self.blocks) if b.tensors is not None]

    def prefetch(self, index: int | None) -> None:
        """Start copying block `index` to the device (on the side stream on CUDA)."""
        if index is None or self.blocks[index].tensors is not None:
            return
        block = self.blocks[index]
        hosts = [getattr(p, _HOST) for p in block.params]
        if self.cuda:
            with torch.cuda.stream(self.side_stream):
                block.tensors = [h.to(self.device, non_blocking=True) for h in hosts]
                block.event = torch.cuda.Event()
                block.event.record(self.side_stream)
        else:  # a real copy even host -> host, so that releasing frees it as on an accelerator
            block.tensors = [torch.empty_like(h, device=self.device).copy_(h) for h in hosts]
        self.max_resident = max(self.max_resident, len(self.resident))

    def use(self, index: int) -> None:
        """Make block `index`'s weights its parameters' data (copying now if no prefetch was started)."""
        block = self.blocks[index]
        self.prefetch(index)
        if block.event is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(block.event)
            for t in block.tensors:
                t.record_stream(stream)  # allocated on the side stream, used on this one
            block.event = None
        for p, t in zip(block.params, block.tensors):
            p.data = t

    def release(self, index: int | None) -> None:
        """Give block `index`'s device copies back (None: nothing)."""
        if index is None or self.blocks[index].tensors is None:
            return
        block = self.blocks[index]
        for p in block.params:
            p.data = self._placeholder(getattr(p, _HOST))
        block.tensors = block.event = None

    def release_all(self) -> None:
        for i in self.resident:
            self.release(i)

    # ------------------------------------------------------------------ hooks
    def _make_pre_forward(self, index: int):
        def hook(module, args):
            # -1 outside any backward (private; torch 2.13, used by torch's checkpoint and FSDP2 alike)
            if self.in_backward and torch._C._current_graph_task_id() == -1:
                self._end_backward()  # the last backward raised before its end callback: start afresh
            if self.in_backward:
                # a recompute under activation checkpointing: resident since its backward began
                self.use(index)
                return None
            for i in self.resident:
                if i not in (index, self.blocks[index].next):
                    self.release(i)
            self.use(index)
            self.prefetch(self.blocks[index].next)
            x = args[0] if args else None
            if isinstance(x, torch.Tensor) and x.requires_grad and torch.is_grad_enabled():
                # runs once x's gradient is complete, so after this block's backward. A hook, not an identity node:
                # a node would change the order in which autograd sums the gradients of tensors with several uses.
                x.register_hook(lambda grad: self.release(index))
            return None

        return hook

    def _make_post_forward(self, index: int):
        def hook(module, args, output):
            if self.in_backward:
                return None
            self.release(index)
            if isinstance(output, torch.Tensor) and output.requires_grad:
                output.register_hook(lambda grad: self._pre_backward(index))
            return None

        return hook

    def _pre_backward(self, index: int) -> None:
        if not self.in_backward:
            self.in_backward = True
            # the autograd engine's end-of-backward callback, as torch's FSDP2 uses it (private; torch 2.13)
            torch.autograd.Variable._execution_engine.queue_callback(self._end_backward)
        # the next block's input is this block's output, whose gradient is complete now: its backward is done
        self.release(self.blocks[index].next)
        self.use(index)
        self.prefetch(self.blocks[index].prev)

    def _end_backward(self) -> None:
        self.in_backward = False
        self.release_all()


def streamed_blocks(model: nn.Module, num_blocks: int) -> list[list[nn.Module]]:
    """The last `num_blocks` blocks of each loaded video expert, in execution order."""
    towers = []
    for name in EXPERTS:
        tower = getattr(model, name, None)
        if tower is None:
            continue
        blocks = list(tower.blocks)
        if num_blocks > len(blocks):
            raise ValueError(
                f"model.offload_blocks={num_blocks} is more than the {len(blocks)} blocks of {name}"
            )
        towers.append(blocks[len(blocks) - num_blocks :])
    return towers


def apply_block_streaming(model: nn.Module, num_blocks: int, device: torch.device | str) -> BlockStreamer:
    """Stream the frozen weights of the last `num_blocks` blocks of each video expert of `model` to `device`
    (the rest of the model is moved there as usual by the caller). Apply before LoRA is injected."""
    streamer = BlockStreamer(streamed_blocks(model, num_blocks), device)
    model.block_streamer = streamer  # a plain attribute: not a module, so no state_dict entry
    return streamer
