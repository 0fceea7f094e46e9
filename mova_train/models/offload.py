"""Activation offload: the inputs of each activation-checkpoint region kept in (pinned) host memory, copied back
for the region's recompute in backward, the previous region's inputs prefetched on a side stream meanwhile.

A checkpoint region (non-reentrant `torch.utils.checkpoint`) saves its tensor inputs for backward outside its own
saved-tensor hooks, so hooks pushed around the `checkpoint` call see exactly those inputs and nothing the region
computes (the region's hooks, innermost, take its internal saves). On CUDA the copies go to pinned memory,
asynchronously both ways on a side stream; on a CPU the same path runs with plain host copies, so the tests (which
have no GPU) exercise all but the streams.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch


class _HostCopy:
    """One saved region input: its host copy, where it came from, and a device copy prefetched for backward."""

    __slots__ = ("host", "device", "region", "copied", "prefetched", "ready")

    def __init__(self, host: torch.Tensor, device: torch.device, region: int, copied) -> None:
        self.host = host
        self.device = device
        self.region = region
        self.copied = copied  # CUDA event after the device-to-host copy (None on a CPU)
        self.prefetched: torch.Tensor | None = None
        self.ready = None  # CUDA event after the prefetch's host-to-device copy


class OffloadedForward:
    """The offloaded region inputs of one forward, by region in forward order.

    Forward copies each region's inputs out on a side stream while the compute stream goes on. Backward recomputes
    the regions in reverse order; when region i's inputs are fetched back, region i-1's start their host-to-device
    copy on the side stream, so they are on the device when its recompute begins (at most one region's inputs are
    prefetched at a time).
    """

    # The context host copies are allocated in; the planner (`mova_train.plan`), whose fake device is the CPU,
    # sets it to count them as host memory.
    host_allocation = staticmethod(nullcontext)

    def __init__(self, stats: dict | None = None) -> None:
        self.regions: list[list[_HostCopy]] = []
        self.stats = stats  # counters for tests and benchmarks: tensors, bytes, devices of the host copies
        self._side_stream = None

    @contextmanager
    def region(self):
        """Around one `checkpoint(...)` call: its saved inputs go to host memory."""
        copies: list[_HostCopy] = []
        self.regions.append(copies)
        index = len(self.regions) - 1

        def pack(t: torch.Tensor):
            if t.numel() == 0:  # checkpoint's own empty marker tensors
                return t
            cuda = t.is_cuda
            # empty_like keeps a dense tensor's strides (e.g. a transposed patch embedding), so the recompute
            # sees the layout the forward saw and gives the same bits
            with self.host_allocation():
                host = torch.empty_like(t, device="cpu", pin_memory=cuda)
            copied = None
            if cuda:  # copied out on the side stream, so the forward's kernels go on meanwhile
                stream = self._stream(t.device)
                stream.wait_stream(torch.cuda.current_stream(t.device))
                with torch.cuda.stream(stream):
                    host.copy_(t, non_blocking=True)
                    copied = torch.cuda.Event()
                    copied.record(stream)
                t.record_stream(stream)  # its memory is not reused before the copy is done
            else:
                host.copy_(t)
            copy = _HostCopy(host, t.device, index, copied)
            copies.append(copy)
            if self.stats is not None:
                self.stats["tensors"] = self.stats.get("tensors", 0) + 1
                self.stats["bytes"] = self.stats.get("bytes", 0) + host.numel() * host.element_size()
                self.stats.setdefault("devices", set()).add(str(host.device))
            return copy

        with torch.autograd.graph.saved_tensors_hooks(pack, self._unpack):
            yield

    def _stream(self, device: torch.device):
        """The side stream of the copies (one per forward: out in forward, back in backward)."""
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream(device=device)
        return self._side_stream

    def _unpack(self, copy):
        if not isinstance(copy, _HostCopy):
            return copy
        if copy.region > 0:
            self._prefetch(self.regions[copy.region - 1])
        return self._fetch(copy)

    def _prefetch(self, copies: list[_HostCopy]) -> None:
        for copy in copies:
            if copy.device.type != "cuda" or copy.prefetched is not None:
                continue
            stream = self._stream(copy.device)
            with torch.cuda.stream(stream):
                stream.wait_event(copy.copied)
                copy.prefetched = copy.host.to(copy.device, non_blocking=True)
                copy.ready = torch.cuda.Event()
                copy.ready.record(stream)

    @staticmethod
    def _fetch(copy: _HostCopy) -> torch.Tensor:
        if copy.device.type != "cuda":
            return copy.host if copy.device.type == "cpu" else copy.host.to(copy.device)
        current = torch.cuda.current_stream(copy.device)
        if copy.prefetched is None:
            current.wait_event(copy.copied)
            return copy.host.to(copy.device, non_blocking=True)
        current.wait_event(copy.ready)
        t, copy.prefetched = copy.prefetched, None
        t.record_stream(current)  # allocated on the side stream, used on this one
        return t
