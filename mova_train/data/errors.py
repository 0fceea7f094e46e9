"""The loader's error types: a data or configuration problem, the message says which and where."""

from __future__ import annotations


class LoaderError(ValueError):
    """A data-loading problem caused by the data or the configuration; the message says which and where."""


class CodecIdentityError(LoaderError):
    """The shards were encoded by other codecs than the base checkpoint's."""


class ShardReadError(LoaderError):
    """A shard that cannot be opened or read to its end (missing, truncated, corrupt)."""


class TooManyRejectedError(LoaderError):
    """More samples than `max_rejected_fraction` failed validation."""


class LoaderStateError(LoaderError):
    """A saved loader state that does not fit this loader (other config, other shards, changed files)."""
