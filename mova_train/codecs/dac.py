"""DAC-VAE audio codec (HunyuanVideo-Foley's continuous DAC, 48 kHz mono, hop 960): our own implementation.

Spec: docs/ARCHITECTURE.md §11. Loads `audio_vae/` strictly in the fused layout (keys_audio_vae_*.json) or the
weight-norm layout (keys_audio_vae_weightnorm_*.json, fused to g·v/‖v‖ at load). The diffusion latent is the
posterior mean, unscaled, 50 frames per second.

Layouts: wave [B, 1, S] float in [-1, 1] at 48 kHz; latents [B, 128, L] with L = ceil(S / 960).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn

from mova_train.checkpoint_io import (
    CheckpointError,
    load_component_state,
    load_module_strict,
    read_component_header,
    read_json,
)
from mova_train.codecs.errors import CodecConfigError, check_tensor
from mova_train.names import CONFIG_NAME, WEIGHTS_NAME

logger = logging.getLogger(__name__)

# Fields of the released config that exist for the (unused) residual quantiser or for provenance.
_IGNORED_FIELDS = {"n_codebooks", "codebook_size", "codebook_dim", "quantizer_dropout", "_class_name"}
_REQUIRED_FIELDS = (
    "encoder_dim",
    "encoder_rates",
    "latent_dim",
    "decoder_dim",
    "decoder_rates",
    "sample_rate",
)


@dataclass(frozen=True)
class DacConfig:
    """Architecture of the DAC-VAE, as in `audio_vae/config.json` (spec §2.1)."""

    encoder_dim: int = 128
    encoder_rates: tuple[int, ...] = (2, 3, 4, 5, 8)
    latent_dim: int = 128
    decoder_dim: int = 2048
    decoder_rates: tuple[int, ...] = (8, 5, 4, 3, 2)
    sample_rate: int = 48000
    continuous: bool = True
    use_weight_norm: bool = False  # informational: the layout found in the weight file decides how we load

    @property
    def hop_length(self) -> int:
        return math.prod(self.encoder_rates)

    @classmethod
    def from_dict(cls, config: dict, *, where: str = "audio_vae config") -> DacConfig:
        """Validate a config.json dict. Architecture fields are required: the reference class's code defaults
        (44.1 kHz, hop 512) differ from the release, so a missing field must not fall back silently."""
        missing = [k for k in _REQUIRED_FIELDS if k not in config]
        if missing:
            raise CodecConfigError(f"{where}: missing field(s) {missing}")
        if config.get("_class_name", "DAC") != "DAC":
            raise CodecConfigError(f"{where}: _class_name must be 'DAC', got {config['_class_name']!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(
            k for k in config if k not in known and k not in _IGNORED_FIELDS and not k.startswith("_")
        )
        if unknown:
            logger.warning("%s: ignoring unknown field(s) %s", where, unknown)
        values = {k: config[k] for k in known if k in config}
        for k in ("encoder_rates", "decoder_rates"):
            rates = values[k]
            if (
                not isinstance(rates, (list, tuple))
                or not rates
                or not all(isinstance(r, int) and r > 0 for r in rates)
            ):
                raise CodecConfigError(
                    f"{where}: {k} must be a non-empty list of positive ints, got {rates!r}"
                )
            values[k] = tuple(rates)
        for k in ("encoder_dim", "latent_dim", "decoder_dim", "sample_rate"):
            if not isinstance(values[k], int) or values[k] <= 0:
                raise CodecConfigError(f"{where}: {k} must be a positive int, got {values[k]!r}")
        cfg = cls(**values)
        if not cfg.continuous:
            raise CodecConfigError(
                f"{where}: continuous must be true (MOVA uses the continuous DAC-VAE latent)"
            )
        if math.prod(cfg.decoder_rates) != cfg.hop_length:
            raise CodecConfigError(
                f"{where}: decoder_rates {list(cfg.decoder_rates)} (product {math.prod(cfg.decoder_rates)}) do not "
                f"invert encoder_rates {list(cfg.encoder_rates)} (product {cfg.hop_length})"
            )
        if cfg.decoder_dim % (2 ** len(cfg.decoder_rates)) != 0:
            raise CodecConfigError(
                f"{where}: decoder_dim {cfg.decoder_dim} must be divisible by 2**{len(cfg.decoder_rates)}"
            )
        return cfg

    def to_dict(self) -> dict:
        d = asdict(self)
        d["encoder_rates"] = list(self.encoder_rates)
        d["decoder_rates"] = list(self.decoder_rates)
        return {"_class_name": "DAC", **d}


def snake(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Snake activation x + sin²(αx)/α (α offset by 1e-9 against division by zero), per channel."""
    return x + (alpha + 1e-9).reciprocal() * torch.sin(alpha * x).pow(2)


class Snake1d(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, channels, 1))  # [1, C, 1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return snake(x, self.alpha)


class ResidualUnit(nn.Module):
    """Snake -> conv k7 (dilated) -> Snake -> conv k1, plus the input (centre-cropped if lengths differ)."""

    def __init__(self, dim: int, dilation: int):
        super().__init__()
        self.block = nn.Sequential(
            Snake1d(dim),
            nn.Conv1d(dim, dim, kernel_size=7, dilation=dilation, padding=3 * dilation),
            Snake1d(dim),
            nn.Conv1d(dim, dim, kernel_size=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        crop = (x.shape[-1] - y.shape[-1]) // 2
        if crop > 0:
            x = x[..., crop:-crop]
        return x + y


class EncoderBlock(nn.Module):
    def __init__(self, dim: int, stride: int):
        super().__init__()
        half = dim // 2
        self.block = nn.Sequential(
            ResidualUnit(half, 1),
            ResidualUnit(half, 3),
            ResidualUnit(half, 9),
            Snake1d(half),
            nn.Conv1d(half, dim, kernel_size=2 * stride, stride=stride, padding=math.ceil(stride / 2)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class DecoderBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, stride: int):
        super().__init__()
        self.block = nn.Sequential(
            Snake1d(in_dim),
            nn.ConvTranspose1d(
                in_dim,
                out_dim,
                kernel_size=2 * stride,
                stride=stride,
                padding=math.ceil(stride / 2),
                output_padding=stride % 2,
            ),
            ResidualUnit(out_dim, 1),
            ResidualUnit(out_dim, 3),
            ResidualUnit(out_dim, 9),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class DacEncoder(nn.Module):
    def __init__(self, config: DacConfig):
        super().__init__()
        dim = config.encoder_dim
        layers: list[nn.Module] = [nn.Conv1d(1, dim, kernel_size=7, padding=3)]
        for stride in config.encoder_rates:
            dim *= 2
            layers.append(EncoderBlock(dim, stride))
        layers += [Snake1d(dim), nn.Conv1d(dim, config.latent_dim, kernel_size=3, padding=1)]
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class DacDecoder(nn.Module):
    def __init__(self, config: DacConfig):
        super().__init__()
        dim = config.decoder_dim
        layers: list[nn.Module] = [nn.Conv1d(config.latent_dim, dim, kernel_size=7, padding=3)]
        for stride in config.decoder_rates:
            layers.append(DecoderBlock(dim, dim // 2, stride))
            dim //= 2
        layers += [Snake1d(dim), nn.Conv1d(dim, 1, kernel_size=7, padding=3), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class DAC(nn.Module):
    """The continuous DAC-VAE. State-dict names follow the released checkpoint (fused-weight layout)."""

    def __init__(self, config: DacConfig):
        super().__init__()
        self.config = config
        self.encoder = DacEncoder(config)
        self.quant_conv = nn.Conv1d(config.latent_dim, 2 * config.latent_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv1d(config.latent_dim, config.latent_dim, kernel_size=1)
        self.decoder = DacDecoder(config)

    def encode_mean(self, wave: torch.Tensor) -> torch.Tensor:
        """Posterior mean [B, latent_dim, S/hop] of a waveform [B, 1, S] whose length is a multiple of the hop."""
        moments = self.quant_conv(self.encoder(wave))  # [B, 2*latent, L]: mean ‖ logvar
        return moments[:, : self.config.latent_dim]

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Waveform [B, 1, hop*L] in [-1, 1] from latents [B, latent_dim, L]."""
        return self.decoder(self.post_quant_conv(z))


def build_dac(config: DacConfig) -> DAC:
    """Build on the current default device (wrap in `torch.device("meta")` for a weightless skeleton)."""
    return DAC(config)


def weight_norm_layout(module: nn.Module) -> dict[str, tuple[int, ...]]:
    """Expected `{key: shape}` of the weight-norm layout: every conv inside encoder/decoder stores `weight_g`
    [dim0, 1, 1] and `weight_v` (full shape) instead of `weight`; quant_conv/post_quant_conv stay fused (spec §11)."""
    out: dict[str, tuple[int, ...]] = {}
    for key, t in module.state_dict().items():
        if key.endswith(".weight") and key.startswith(("encoder.", "decoder.")) and t.ndim == 3:
            stem = key[: -len("weight")]
            out[stem + "weight_g"] = (t.shape[0], 1, 1)
            out[stem + "weight_v"] = tuple(t.shape)
        else:
            out[key] = tuple(t.shape)
    return out


def fuse_weight_norm(state: dict[str, torch.Tensor], *, where: str = "audio_vae") -> dict[str, torch.Tensor]:
    """Replace each `p.weight_g` / `p.weight_v` pair by `p.weight = g · v / ‖v‖`, the norm over all dims but 0
    (torch.nn.utils.weight_norm with dim=0). Computed in float32, returned in v's dtype."""
    out: dict[str, torch.Tensor] = {}
    for key in sorted(state):
        if key.endswith(".weight_v"):
            continue
        if not key.endswith(".weight_g"):
            out[key] = state[key]
            continue
        stem = key[: -len("weight_g")]
        v = state.get(stem + "weight_v")
        if v is None:
            raise CheckpointError(f"{where}: {key} has no matching {stem}weight_v")
        g = state[key]
        if g.shape != (v.shape[0],) + (1,) * (v.ndim - 1):
            raise CheckpointError(
                f"{where}: {key} has shape {list(g.shape)}, expected {[v.shape[0]] + [1] * (v.ndim - 1)} "
                f"for {stem}weight_v of shape {list(v.shape)}"
            )
        v32 = v.float()
        norm = v32.flatten(1).norm(dim=1).view(g.shape)
        out[stem + "weight"] = (g.float() * v32 / norm).to(v.dtype)
    orphans = [k for k in state if k.endswith(".weight_v") and k[: -len("v")] + "g" not in state]
    if orphans:
        raise CheckpointError(f"{where}: {orphans[0]} has no matching weight_g")
    return out


def load_dac(
    folder: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> DAC:
    """Build from `folder/config.json` on meta and fill strictly from the safetensors (either layout)."""
    folder = Path(folder)
    config = DacConfig.from_dict(read_json(folder / CONFIG_NAME), where=f"{folder / CONFIG_NAME}")
    with torch.device("meta"):
        module = build_dac(config)
    header = read_component_header(folder, weights_name=WEIGHTS_NAME)
    if any(k.endswith((".weight_g", ".weight_v")) for k in header):
        state = load_component_state(
            folder,
            weights_name=WEIGHTS_NAME,
            expected=weight_norm_layout(module),
            device=device,
            component="audio_vae (weight-norm layout)",
        )
        fused = fuse_weight_norm(state, where=f"audio_vae ({folder})")
        del state
        module.load_state_dict({k: v.to(dtype) for k, v in fused.items()}, strict=True, assign=True)
    else:
        load_module_strict(
            module, folder, weights_name=WEIGHTS_NAME, dtype=dtype, device=device, component="audio_vae"
        )
    return module.eval().requires_grad_(False)


class AudioVAE:
    """Frozen DAC-VAE: 48 kHz mono waveform <-> continuous 128-dim latents at 50 frames/s (posterior mean)."""

    def __init__(self, module: DAC):
        self.module = module
        self.config = module.config

    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    @property
    def hop_length(self) -> int:
        return self.config.hop_length

    @property
    def latent_dim(self) -> int:
        return self.config.latent_dim

    @property
    def dtype(self) -> torch.dtype:
        return self.module.quant_conv.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.module.quant_conv.weight.device

    def num_latent_frames(self, num_samples: int) -> int:
        """ceil(num_samples / hop): the latent length of a waveform of that many samples (spec §11)."""
        return -(-num_samples // self.hop_length)

    @torch.no_grad()
    def encode(self, wave: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Waveform [B, 1, S] in [-1, 1] -> (latents [B, latent_dim, ceil(S/hop)] float32, pad_samples).

        The waveform is right-padded with zeros to a multiple of the hop, as in training (spec §11); `pad_samples`
        is how many samples were added, so callers can record it or trim a decode back to S samples.
        Each clip is encoded on its own, so a clip's latents do not depend on what else is in the batch.
        """
        check_tensor(
            wave,
            where="audio_vae.encode",
            name="wave",
            ndim=3,
            layout="[B, 1, num_samples] mono (mix stereo down first)",
            channels=(1, 1),
            value_range=(-1.0, 1.0),
            range_tolerance=1.0,
        )
        num_samples = wave.shape[-1]
        pad = self.num_latent_frames(num_samples) * self.hop_length - num_samples
        x = torch.nn.functional.pad(wave.to(self.device, self.dtype), (0, pad))
        latents = [self.module.encode_mean(x[i : i + 1]) for i in range(x.shape[0])]
        return torch.cat(latents).float(), pad

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, latent_dim, L] -> waveform [B, 1, hop*L] float32 in [-1, 1]."""
        check_tensor(
            latents,
            where="audio_vae.decode",
            name="latents",
            ndim=3,
            layout=f"[B, {self.latent_dim}, L]",
            channels=(1, self.latent_dim),
        )
        z = latents.to(self.device, self.dtype)
        waves = [self.module.decode_latents(z[i : i + 1]) for i in range(z.shape[0])]
        return torch.cat(waves).float()
