"""Loading the frozen codecs of a MOVA checkpoint (`load_codecs`) and building them at a preset."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from mova_train.checkpoint_io import CheckpointError, read_json
from mova_train.codecs.configs import CONFIG_NAMES, get_codec_config
from mova_train.codecs.dac import AudioVAE, DacConfig, build_dac, load_dac
from mova_train.codecs.errors import CodecConfigError
from mova_train.codecs.identity import codec_identity
from mova_train.codecs.text_encoder import TextEncoder, build_text_encoder_module, load_text_encoder
from mova_train.codecs.video_vae import VideoVAE, build_i2v_condition, build_video_vae_module, load_wan_vae
from mova_train.names import CODEC_COMPONENTS, MODEL_INDEX_NAME, TOKENIZER_DIR


@dataclass
class Codecs:
    """The loaded codecs of one checkpoint; a codec not asked for is None."""

    checkpoint_dir: Path
    components: tuple[str, ...]
    video_vae: VideoVAE | None = None
    audio_vae: AudioVAE | None = None
    text_encoder: TextEncoder | None = None
    _identity: str | None = field(default=None, repr=False)

    @property
    def identity(self) -> str:
        """sha256 over the configs, weights (and tokenizer) of the loaded codecs, computed from the files on first
        use (streams the files once: a few seconds for the released 11 GB text encoder)."""
        if self._identity is None:
            self._identity = codec_identity(self.checkpoint_dir, self.components)
        return self._identity

    def _need(self, component: str, what: str):
        codec = getattr(self, component)
        if codec is None:
            raise CodecConfigError(
                f"{what} needs the {component} codec, which was not loaded (components=...)"
            )
        return codec

    @property
    def sample_rate(self) -> int:
        return self._need("audio_vae", "sample_rate").sample_rate

    @property
    def audio_hop(self) -> int:
        return self._need("audio_vae", "audio_hop").hop_length

    @property
    def audio_latent_dim(self) -> int:
        return self._need("audio_vae", "audio_latent_dim").latent_dim

    @property
    def video_temporal_stride(self) -> int:
        return self._need("video_vae", "video_temporal_stride").temporal_stride

    @property
    def video_spatial_stride(self) -> int:
        return self._need("video_vae", "video_spatial_stride").spatial_stride

    @property
    def text_dim(self) -> int:
        return self._need("text_encoder", "text_dim").dim

    @property
    def text_len(self) -> int:
        return self._need("text_encoder", "text_len").text_len

    @staticmethod
    def build_i2v_condition(cond_latent: torch.Tensor) -> torch.Tensor:
        """[B, 16, T, h, w] first-frame latent -> y [B, 20, T, h, w] = mask(4) ‖ cond (spec §8)."""
        return build_i2v_condition(cond_latent)


def _check_components(components) -> tuple[str, ...]:
    if isinstance(components, str):
        components = (components,)
    components = tuple(components)
    bad = [c for c in components if c not in CODEC_COMPONENTS]
    if bad or not components:
        raise CodecConfigError(
            f"codec components must be a non-empty subset of {', '.join(CODEC_COMPONENTS)}; got {list(components)}"
        )
    return tuple(c for c in CODEC_COMPONENTS if c in components)


def load_codecs(
    checkpoint_dir: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    components: tuple[str, ...] = CODEC_COMPONENTS,
    audio_dtype: torch.dtype | None = torch.float32,
) -> Codecs:
    """Load the codecs of a MOVA checkpoint folder strictly (built on meta, filled from safetensors).

    `dtype` is the compute/storage dtype of the video VAE and text encoder (bf16 as in the reference, or fp32).
    The DAC runs in `audio_dtype` (fp32 by default, as the reference and SGLang do; None = follow `dtype`).
    Every codec returns float32 outputs; callers choose how to store them.
    """
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {checkpoint_dir}")
    components = _check_components(components)
    index_path = checkpoint_dir / MODEL_INDEX_NAME
    if index_path.is_file():
        audio_type = read_json(index_path).get("audio_vae_type", "dac")
        if "audio_vae" in components and audio_type != "dac":
            raise CodecConfigError(f"{index_path}: audio_vae_type is {audio_type!r}; only 'dac' is supported")
    codecs = Codecs(checkpoint_dir=checkpoint_dir, components=components)
    if "video_vae" in components:
        module, config = load_wan_vae(checkpoint_dir / "video_vae", dtype=dtype, device=device)
        codecs.video_vae = VideoVAE(module, config)
    if "audio_vae" in components:
        codecs.audio_vae = AudioVAE(
            load_dac(checkpoint_dir / "audio_vae", dtype=audio_dtype or dtype, device=device)
        )
    if "text_encoder" in components:
        codecs.text_encoder, _ = load_text_encoder(
            checkpoint_dir / "text_encoder", checkpoint_dir / TOKENIZER_DIR, dtype=dtype, device=device
        )
    return codecs


def build_codec_modules(
    config_name: str, device: str | torch.device = "meta", components: tuple[str, ...] = CODEC_COMPONENTS
) -> dict[str, nn.Module]:
    """The raw codec modules at a preset ("tiny" | "mova_360p" | "mova_720p"), randomly initialised unless on meta.

    Used by `python -m mova_train.cli.inspect` (names, shapes, parameter counts) and by the tiny-checkpoint writer.
    """
    if config_name not in CONFIG_NAMES:
        raise CodecConfigError(f"unknown codec config {config_name!r}; allowed: {', '.join(CONFIG_NAMES)}")
    builders = {
        "video_vae": build_video_vae_module,
        "audio_vae": lambda cfg: build_dac(DacConfig.from_dict(cfg)),
        "text_encoder": build_text_encoder_module,
    }
    out: dict[str, nn.Module] = {}
    with torch.device(device):
        for component in _check_components(components):
            out[component] = builders[component](get_codec_config(config_name, component))
    return out
