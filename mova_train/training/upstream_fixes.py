"""Workarounds for upstream library behaviour, each with the version it was written against.

Keep every such patch here so it is easy to drop when the upstream fix lands.
"""

from __future__ import annotations

import warnings


def silence_known_warnings() -> None:
    """torch 2.13 + DeepSpeed 0.19.8: every ZeRO collective warns that `all_gather_into_tensor` /
    `reduce_scatter_tensor` are deprecated (a FutureWarning per call, per rank), burying the training log."""
    warnings.filterwarnings(
        "ignore",
        message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
        category=FutureWarning,
    )


def clear_zero3_stale_grads(engine) -> None:
    """DeepSpeed 0.19.8, ZeRO stage 3 without optimizer offload.

    ZeRO-3 keeps reduced gradient partitions in one flat buffer and, after an optimizer step, only overwrites the
    slices of parameters that take part in the next backward. A parameter that sits out a step (the idle video
    expert of the MoE) keeps its previous gradient: it counts again in the global grad norm (and a non-finite one
    makes every following step overflow). Zeroing the buffer after each optimizer step restores the semantics of
    ZeRO-2 and plain PyTorch (an unused parameter has no gradient).
    """
    if (
        engine is None
        or not hasattr(engine, "zero_optimization_stage")
        or engine.zero_optimization_stage() != 3
    ):
        return
    optimizer = getattr(engine, "optimizer", None)
    buffer = getattr(optimizer, "grad_partitions_flat_buffer", None)
    if buffer is not None:
        buffer.zero_()
