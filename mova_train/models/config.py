"""Typed configs of the MOVA diffusion components, parsed strictly from the released config.json files.

Field names follow the released configs (including the misspelled `seperated_timestep`); values the released
model does not use are rejected with a ValueError naming the field, so a config we cannot honour never loads.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from ..names import BOUNDARY_RATIO

# Diffusers ConfigMixin bookkeeping fields: present in every config.json, no effect on the architecture.
_META_FIELDS = frozenset({"_class_name", "_diffusers_version", "_name_or_path"})

BRIDGE_STRATEGIES = ("shallow_focus", "distributed", "progressive", "custom", "full")


class ConfigError(ValueError):
    """A component config that is malformed or asks for something this implementation does not support."""


class _ConfigBase:
    """Strict dict <-> dataclass conversion shared by the component configs."""

    CLASS_NAME: str | None = None  # the released `_class_name`; None accepts any
    IGNORED: frozenset[str] = frozenset()  # fields of the reference constructor with no effect here
    DEFAULT_WHERE = "config"

    @classmethod
    def from_dict(cls, raw: dict, where: str | None = None):
        """Parse a config.json dict; unknown or missing fields and unsupported values raise ConfigError."""
        where = where or cls.DEFAULT_WHERE
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: expected a JSON object, got {type(raw).__name__}")
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in raw if k not in known and k not in _META_FIELDS and k not in cls.IGNORED)
        if unknown:
            raise ConfigError(f"{where}: unknown config field(s) {unknown}; known fields: {sorted(known)}")
        missing = [
            n
            for n, f in known.items()
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and n not in raw
        ]
        if missing:
            raise ConfigError(f"{where}: missing required config field(s) {missing}")
        cls_name = raw.get("_class_name")
        if cls_name is not None and cls.CLASS_NAME not in (None, cls_name):
            raise ConfigError(f"{where}: _class_name is {cls_name!r}, expected {cls.CLASS_NAME!r}")
        cfg = cls(**{k: v for k, v in raw.items() if k in known})
        cfg.validate(where)
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return {"_class_name": self.CLASS_NAME, **dataclasses.asdict(self)}

    def validate(self, where: str | None = None) -> None:
        raise NotImplementedError

    def _need(self, where: str | None, name: str, ok: bool, allowed: str) -> None:
        if not ok:
            value = getattr(self, name, None)
            where = where or self.DEFAULT_WHERE
            raise ConfigError(f"{where}: field {name!r} = {value!r} is not supported (allowed: {allowed})")

    def _need_positive_ints(self, where: str | None, names: tuple[str, ...]) -> None:
        for name in names:
            v = getattr(self, name)
            self._need(where, name, isinstance(v, int) and not isinstance(v, bool) and v > 0, "an int > 0")

    def _need_false(self, where: str | None, names: tuple[str, ...]) -> None:
        for name in names:
            self._need(where, name, getattr(self, name) is False, "false (as released)")


@dataclass
class _DiTConfigBase(_ConfigBase):
    """Fields shared by the video and audio towers (the same WanModel-style DiT)."""

    dim: int
    in_dim: int
    ffn_dim: int
    out_dim: int
    text_dim: int
    freq_dim: int
    num_heads: int
    num_layers: int
    patch_size: list[int]
    eps: float = 1e-6
    # Present in the released configs; all must keep the value the released model uses.
    has_image_input: bool = False
    has_image_pos_emb: bool = False
    has_ref_conv: bool = False
    add_control_adapter: bool = False
    in_dim_control_adapter: int = 24  # only read when add_control_adapter is true
    seperated_timestep: bool = False  # (sic) released spelling
    require_vae_embedding: bool = True
    require_clip_embedding: bool = False
    fuse_vae_embedding_in_latents: bool = False

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def validate(self, where: str | None = None) -> None:
        ints = ("dim", "in_dim", "ffn_dim", "out_dim", "text_dim", "freq_dim", "num_heads", "num_layers")
        self._need_positive_ints(where, ints)
        self._need(where, "num_heads", self.dim % self.num_heads == 0, f"a divisor of dim={self.dim}")
        self._need(where, "num_heads", self.head_dim % 2 == 0, "dim/num_heads even (RoPE pairs)")
        self._need(where, "freq_dim", self.freq_dim % 2 == 0, "an even int")
        self._need(where, "eps", isinstance(self.eps, (int, float)) and 0 < self.eps < 1, "a float in (0, 1)")
        flags = ("has_image_input", "has_image_pos_emb", "has_ref_conv", "add_control_adapter")
        self._need_false(where, (*flags, "seperated_timestep", "require_clip_embedding"))
        self._need_false(where, ("fuse_vae_embedding_in_latents",))


@dataclass
class VideoDiTConfig(_DiTConfigBase):
    """`video_dit/config.json` and `video_dit_2/config.json` (WanModel, Wan2.2-I2V-A14B style)."""

    CLASS_NAME = "WanModel"
    DEFAULT_WHERE = "video_dit/config.json"

    def validate(self, where: str | None = None) -> None:
        super().validate(where)
        p = self.patch_size
        ok = isinstance(p, (list, tuple)) and len(p) == 3 and all(isinstance(x, int) and x > 0 for x in p)
        self._need(where, "patch_size", ok, "three positive ints (t, h, w)")
        # The bridge's cross-modal RoPE places token frame f at latent frame f.
        self._need(where, "patch_size", p[0] == 1, "[1, ph, pw]")
        self._need(where, "require_vae_embedding", self.require_vae_embedding is True, "true (I2V input)")
        self._need(
            where, "in_dim", self.in_dim > self.out_dim, f"out_dim ({self.out_dim}) + conditioning channels"
        )
        # The 3D RoPE splits head_dim d into frame | height | width parts of d - 2(d//3), d//3, d//3 real
        # dims (44/42/42 for 128); each part must hold whole complex pairs.
        third = self.head_dim // 3
        self._need(
            where, "num_heads", third > 0 and third % 2 == 0, "dim/num_heads = d with d//3 even (3D RoPE)"
        )

    @property
    def cond_dim(self) -> int:
        """Channels of the I2V conditioning input y (4 mask + 16 first-frame latent when released)."""
        return self.in_dim - self.out_dim

    @property
    def rope_split(self) -> tuple[int, int, int]:
        """Real dims of the (frame, height, width) RoPE parts: 44/42/42 for head_dim 128."""
        third = self.head_dim // 3
        return self.head_dim - 2 * third, third, third


@dataclass
class AudioDiTConfig(_DiTConfigBase):
    """`audio_dit/config.json` (WanAudioModel over 50 Hz DAC latents)."""

    vae_type: str = "dac"
    require_vae_embedding: bool = False

    CLASS_NAME = "WanAudioModel"
    DEFAULT_WHERE = "audio_dit/config.json"

    def validate(self, where: str | None = None) -> None:
        super().validate(where)
        ok = isinstance(self.patch_size, (list, tuple)) and list(self.patch_size) == [1]
        self._need(where, "patch_size", ok, "[1]")
        self._need(where, "vae_type", self.vae_type == "dac", "'dac' (the oobleck RoPE is not used)")
        self._need(where, "in_dim", self.in_dim == self.out_dim, f"equal to out_dim={self.out_dim}")


@dataclass
class BridgeConfig(_ConfigBase):
    """`dual_tower_bridge/config.json` (DualTowerConditionalBridge)."""

    visual_layers: int
    audio_layers: int
    visual_hidden_dim: int
    audio_hidden_dim: int
    head_dim: int
    audio_fps: float = 50.0
    interaction_strategy: str = "full"
    apply_cross_rope: bool = True
    apply_first_frame_bias_in_rope: bool = False
    trainable_condition_scale: bool = False
    pooled_adaln: bool = False

    CLASS_NAME = "DualTowerConditionalBridge"
    DEFAULT_WHERE = "dual_tower_bridge/config.json"
    EPS = 1e-6  # LayerNorm/RMSNorm eps of the bridge; fixed in the reference, not a config field

    def validate(self, where: str | None = None) -> None:
        self._need_positive_ints(
            where, ("visual_layers", "audio_layers", "visual_hidden_dim", "audio_hidden_dim")
        )
        self._need_positive_ints(where, ("head_dim",))
        self._need(where, "head_dim", self.head_dim % 2 == 0, "an even int")
        for name in ("visual_hidden_dim", "audio_hidden_dim"):
            self._need(
                where,
                name,
                getattr(self, name) % self.head_dim == 0,
                f"a multiple of head_dim={self.head_dim}",
            )
        self._need(
            where,
            "interaction_strategy",
            self.interaction_strategy in BRIDGE_STRATEGIES,
            ", ".join(BRIDGE_STRATEGIES),
        )
        self._need(
            where, "audio_fps", isinstance(self.audio_fps, (int, float)) and self.audio_fps > 0, "a float > 0"
        )
        self._need_false(where, ("pooled_adaln",))

    @property
    def interaction_layers(self) -> list[int]:
        """Layer indices i where bridge pair i runs before video block i and audio block i (spec §5.1)."""
        n = min(self.visual_layers, self.audio_layers)
        s = self.interaction_strategy
        if s == "full":
            return list(range(n))
        if s == "shallow_focus":
            return list(range(min(10, n // 3)))
        if s == "distributed":
            return list(range(0, n, 3))
        if s == "progressive":
            return list(range(min(8, n))) + list(range(8, n, 3))
        return [i for i in (0, 2, 4, 6, 8, 12, 16, 20) if i < n]  # custom


@dataclass
class SchedulerConfig(_ConfigBase):
    """`scheduler/scheduler_config.json` (FlowMatchPairScheduler); unsupported options must keep their defaults."""

    num_train_timesteps: int = 1000
    shift: float = 5.0
    sigma_max: float = 1.0
    sigma_min: float = 0.003 / 1.002
    extra_one_step: bool = True
    inverse_timesteps: bool = False
    reverse_sigmas: bool = False
    exponential_shift: bool = False
    shift_terminal: float | None = None

    DEFAULT_WHERE = "scheduler/scheduler_config.json"
    # Reference constructor arguments with no effect here: the step count is chosen per call, and the mu of
    # the exponential shift only matters when exponential_shift is true (rejected).
    IGNORED = frozenset({"num_inference_steps", "exponential_shift_mu"})

    def validate(self, where: str | None = None) -> None:
        self._need_positive_ints(where, ("num_train_timesteps",))
        self._need(where, "shift", isinstance(self.shift, (int, float)) and self.shift > 0, "a float > 0")
        ok = 0 <= self.sigma_min < self.sigma_max <= 1
        self._need(where, "sigma_min", ok, f"0 <= sigma_min < sigma_max <= 1 (sigma_max = {self.sigma_max})")
        self._need(where, "extra_one_step", isinstance(self.extra_one_step, bool), "true or false")
        self._need_false(where, ("inverse_timesteps", "reverse_sigmas", "exponential_shift"))
        self._need(where, "shift_terminal", self.shift_terminal is None, "null")

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "_class_name": "FlowMatchPairScheduler"}


@dataclass
class MovaConfig:
    """Everything needed to build the four diffusion components and route between the two video experts."""

    video_dit: VideoDiTConfig
    audio_dit: AudioDiTConfig
    dual_tower_bridge: BridgeConfig
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    boundary_ratio: float = BOUNDARY_RATIO
    text_len: int = 512
    name: str = "custom"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        v, a, b = self.video_dit, self.audio_dit, self.dual_tower_bridge
        v.validate()
        a.validate()
        b.validate()
        self.scheduler.validate()
        pairs = [
            ("dual_tower_bridge.visual_hidden_dim", b.visual_hidden_dim, "video_dit.dim", v.dim),
            ("dual_tower_bridge.audio_hidden_dim", b.audio_hidden_dim, "audio_dit.dim", a.dim),
            ("dual_tower_bridge.visual_layers", b.visual_layers, "video_dit.num_layers", v.num_layers),
            ("dual_tower_bridge.audio_layers", b.audio_layers, "audio_dit.num_layers", a.num_layers),
            ("dual_tower_bridge.head_dim", b.head_dim, "video_dit head_dim", v.head_dim),
            ("dual_tower_bridge.head_dim", b.head_dim, "audio_dit head_dim", a.head_dim),
            ("audio_dit.text_dim", a.text_dim, "video_dit.text_dim", v.text_dim),
        ]
        for n1, x1, n2, x2 in pairs:
            if x1 != x2:
                raise ConfigError(f"inconsistent configs: {n1} = {x1} but {n2} = {x2}")
        if not (isinstance(self.boundary_ratio, (int, float)) and 0 < self.boundary_ratio <= 1):
            raise ConfigError(f"boundary_ratio = {self.boundary_ratio!r} must be a float in (0, 1]")

    @property
    def boundary_timestep(self) -> float:
        """Expert switch point in timestep units: video_dit for t >= this, video_dit_2 below (900 released)."""
        return float(self.boundary_ratio) * self.scheduler.num_train_timesteps

    @property
    def video_latent_dim(self) -> int:
        return self.video_dit.out_dim

    @property
    def video_cond_dim(self) -> int:
        return self.video_dit.cond_dim

    @property
    def audio_latent_dim(self) -> int:
        return self.audio_dit.in_dim

    @property
    def text_dim(self) -> int:
        return self.video_dit.text_dim

    @property
    def head_dim(self) -> int:
        return self.dual_tower_bridge.head_dim


def _released_config(name: str) -> MovaConfig:
    # Values of the released config.json files (spec §2.1).
    common = dict(text_dim=4096, freq_dim=256, eps=1e-6)
    video = VideoDiTConfig(
        dim=5120,
        in_dim=36,
        ffn_dim=13824,
        out_dim=16,
        num_heads=40,
        num_layers=40,
        patch_size=[1, 2, 2],
        **common,
    )
    audio = AudioDiTConfig(
        dim=1536, in_dim=128, ffn_dim=8960, out_dim=128, num_heads=12, num_layers=30, patch_size=[1], **common
    )
    bridge = BridgeConfig(
        visual_layers=40,
        audio_layers=30,
        visual_hidden_dim=5120,
        audio_hidden_dim=1536,
        head_dim=128,
        audio_fps=50.0,
        interaction_strategy="full",
        apply_cross_rope=True,
    )
    return MovaConfig(video_dit=video, audio_dit=audio, dual_tower_bridge=bridge, name=name)


def _tiny_config() -> MovaConfig:
    # Same classes, small widths. head_dim 32 keeps the 3D RoPE split valid (12/10/10); the two towers have
    # different widths and head counts so the bridge's kv_dim != dim paths are exercised. Audio keeps the real
    # DAC latent width (128) so tiny shards match the tiny codecs.
    common = dict(text_dim=32, freq_dim=32, eps=1e-6)
    video = VideoDiTConfig(
        dim=96, in_dim=36, ffn_dim=128, out_dim=16, num_heads=3, num_layers=4, patch_size=[1, 2, 2], **common
    )
    audio = AudioDiTConfig(
        dim=64, in_dim=128, ffn_dim=96, out_dim=128, num_heads=2, num_layers=3, patch_size=[1], **common
    )
    bridge = BridgeConfig(
        visual_layers=4,
        audio_layers=3,
        visual_hidden_dim=96,
        audio_hidden_dim=64,
        head_dim=32,
        audio_fps=50.0,
        interaction_strategy="full",
        apply_cross_rope=True,
    )
    return MovaConfig(video_dit=video, audio_dit=audio, dual_tower_bridge=bridge, name="tiny")


CONFIG_PRESETS = ("tiny", "mova_360p", "mova_720p")


def get_model_config(name: str) -> MovaConfig:
    """Preset by name: `tiny` (tests), `mova_360p`, `mova_720p` (the released architecture, shared by both)."""
    if name == "tiny":
        return _tiny_config()
    if name in ("mova_360p", "mova_720p"):
        return _released_config(name)
    raise ConfigError(f"unknown model config {name!r}; allowed: {', '.join(CONFIG_PRESETS)}")


def num_tokens(
    config: MovaConfig,
    *,
    num_frames: int,
    height: int,
    width: int,
    num_audio_samples: int,
    hop: int = 960,
    vae_temporal: int = 4,
    vae_spatial: int = 8,
) -> tuple[int, int]:
    """(video tokens, audio tokens) of one clip: 43,120 and 403 for 193 frames at 352x640 with 386,000 samples."""
    pt, ph, pw = config.video_dit.patch_size
    t = (num_frames - 1) // vae_temporal + 1
    video = (t // pt) * (height // vae_spatial // ph) * (width // vae_spatial // pw)
    return video, math.ceil(num_audio_samples / hop)
