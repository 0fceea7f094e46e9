"""Hydra group `data`: where the shards are and how to stream them, and the validation of its fields
(ConfigValueError naming the `data.*` field)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from mova_train.errors import ConfigValueError


@dataclass
class DataConfig:
    """Hydra group `data`: where the shards are and how to stream them."""

    # A folder with manifest.json, or a brace-expanded URL list "dir/shard-{000..003}.tar"; or a list of such shard
    # sets mixed into one stream, each `{path: DIR, repeats: N}` (read N times per epoch) or `{path: DIR, weight: W}`
    # (share W of the samples) -- one of the two per list (see shards.normalize_shard_spec).
    shards: Any = ""
    batch_size: int = 1
    num_workers: int = 0
    shuffle_buffer: int = 64  # samples held per reader for shuffling; 0 or 1 = read order
    shuffle_shards: bool = True
    resample: bool = True  # infinite multi-epoch stream; false = one epoch per iter()
    buckets: list[str] | None = None  # keep only these buckets ("HxW"), None = all
    validate: bool = True
    verify_checksums: bool = (
        True  # each shard's sha256 against the manifest, once per process, before reading it
    )
    max_rejected_fraction: float = 0.1
    # Probability that a sample's text embedding is replaced by the empty-prompt embedding its shard set stores
    # (empty_prompt.safetensors); decided per sample by a hash of the seed and its stream position.
    caption_dropout: float = 0.0

    # Named `validated`, not `validate`: `validate` is the data.validate field above.
    def validated(self, *, check_shards: bool = False) -> DataConfig:
        """This config with bucket names stripped; raises ConfigValueError naming the first data.* field that
        cannot work. `check_shards` also resolves data.shards (manifest and shard files present, no sample read),
        as the training config's validation does before any run folder exists."""
        from mova_train.data.shards import normalize_shard_spec  # torch: imported on use (fast --help)

        try:
            shards = normalize_shard_spec(_plain(self.shards))
        except ValueError as e:
            raise ConfigValueError(str(e)) from None
        for name in ("batch_size", "num_workers", "shuffle_buffer"):
            value = getattr(self, name)
            low = 1 if name == "batch_size" else 0
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigValueError(f"data.{name} must be an integer >= {low}, got {value!r}")
        for name in ("shuffle_shards", "resample", "validate", "verify_checksums"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigValueError(f"data.{name} must be true or false, got {getattr(self, name)!r}")
        frac = self.max_rejected_fraction
        if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0.0 <= frac <= 1.0:
            raise ConfigValueError(f"data.max_rejected_fraction must be in [0, 1], got {frac!r}")
        p = self.caption_dropout
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
            raise ConfigValueError(f"data.caption_dropout must be in [0, 1), got {p!r}")
        cfg = replace(self, shards=shards, caption_dropout=float(p))
        if self.buckets is not None:
            buckets = list(self.buckets)
            if not buckets:
                raise ConfigValueError(
                    "data.buckets must be null (all buckets) or a non-empty list of 'HxW' strings"
                )
            for b in buckets:
                if not isinstance(b, str):
                    raise ConfigValueError(f"data.buckets entries must be 'HxW' strings, got {b!r}")
                from mova_train.data.contract import parse_bucket  # torch: imported on use (fast --help)

                try:
                    parse_bucket(b)
                except ValueError as e:
                    raise ConfigValueError(f"data.buckets: {e}") from None
            cfg = replace(cfg, buckets=[b.strip() for b in buckets])
        if check_shards:
            check_shard_spec("data.shards", shards)
        return cfg


def _plain(value: Any) -> Any:
    """An OmegaConf list/dict (data.shards given on the command line) as plain Python containers."""
    if hasattr(value, "_metadata"):
        from omegaconf import OmegaConf

        return OmegaConf.to_container(value, resolve=True)
    return value


def check_data_config(cfg: DataConfig | Mapping[str, Any]) -> DataConfig:
    """Return `cfg` as a validated DataConfig (accepts a dict or an OmegaConf DictConfig too)."""
    if not isinstance(cfg, DataConfig):
        if hasattr(cfg, "_metadata"):  # OmegaConf container; imported lazily to keep this module light
            from omegaconf import OmegaConf

            cfg = OmegaConf.to_container(cfg, resolve=True)
        if not isinstance(cfg, Mapping):
            raise ConfigValueError(f"data config must be a DataConfig or a mapping, got {type(cfg).__name__}")
        known = {f.name for f in fields(DataConfig)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ConfigValueError(f"data: unknown field(s) {unknown}; known: {sorted(known)}")
        cfg = DataConfig(**dict(cfg))
    return cfg.validated()


def check_shard_spec(name: str, spec: Any) -> None:
    """The shards `spec` names exist: manifest and shard files present (headers only; no sample is read).
    Raises ConfigValueError naming the config field `name` (data.shards, eval.heldout_shards)."""
    from mova_train.data.shards import resolve_shards  # torch: imported on use (fast --help)

    try:
        resolve_shards(spec)
    except ValueError as e:
        message = str(e)
        raise ConfigValueError(
            message if message.startswith(name) else f"{name}={spec!r}: {message}"
        ) from None


__all__ = ["DataConfig", "check_data_config", "check_shard_spec"]
