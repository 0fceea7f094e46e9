"""Errors and input checks shared by the frozen codecs (video VAE, audio VAE, text encoder).

Every check raises `CodecInputError` (a ValueError) naming the codec, the argument and what was expected, so a bad
clip fails at the door instead of deep inside a convolution.
"""

from __future__ import annotations

import torch


class CodecInputError(ValueError):
    """An input tensor or argument a codec cannot take; the message names the codec, argument and expectation."""


class CodecConfigError(ValueError):
    """A codec config (config.json or preset) with a missing, unknown or inconsistent field."""


def check_tensor(
    x: object,
    *,
    where: str,
    name: str,
    ndim: int,
    layout: str,
    channels: tuple[int, int] | None = None,
    value_range: tuple[float, float] | None = None,
    range_tolerance: float = 0.02,
) -> torch.Tensor:
    """Check type, rank, channel count, emptiness, finiteness and (optionally) value range of `x`.

    `channels=(dim, count)` requires `x.shape[dim] == count`. `value_range` allows `range_tolerance` beyond either
    end, because resampling filters overshoot a little; what it exists to catch is pixels in [0, 255] or audio in
    int16 units.
    """
    if not isinstance(x, torch.Tensor):
        raise CodecInputError(f"{where}: {name} must be a torch.Tensor {layout}, got {type(x).__name__}")
    if x.ndim != ndim:
        raise CodecInputError(f"{where}: {name} must be {layout} ({ndim} dims), got shape {list(x.shape)}")
    if not x.is_floating_point():
        raise CodecInputError(f"{where}: {name} must be a floating-point tensor, got {x.dtype}")
    if x.numel() == 0:
        raise CodecInputError(f"{where}: {name} is empty (shape {list(x.shape)})")
    if channels is not None:
        dim, count = channels
        if x.shape[dim] != count:
            raise CodecInputError(
                f"{where}: {name} must have {count} channels at dim {dim} ({layout}), got shape {list(x.shape)}"
            )
    if not bool(torch.isfinite(x).all()):
        num_bad = int((~torch.isfinite(x)).sum())
        raise CodecInputError(f"{where}: {name} contains {num_bad} NaN/inf value(s) (shape {list(x.shape)})")
    if value_range is not None:
        lo, hi = value_range
        tol = range_tolerance
        x_min, x_max = float(x.min()), float(x.max())
        if x_min < lo - tol or x_max > hi + tol:
            raise CodecInputError(
                f"{where}: {name} must hold values in [{lo:g}, {hi:g}], found [{x_min:.4g}, {x_max:.4g}] "
                "(pixels must be scaled to [-1, 1]; audio must be a float waveform in [-1, 1])"
            )
    return x
