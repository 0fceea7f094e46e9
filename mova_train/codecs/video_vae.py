"""Frozen Wan2.1 video VAE (diffusers `AutoencoderKLWan`) with MOVA's per-channel latent normalisation (spec §10)
and the image-to-video conditioning channels (spec §8).

Layouts: video [B, 3, N, H, W] in [-1, 1] with N ≡ 1 (mod 4) and H, W multiples of 16; latents
[B, 16, T, h, w] with T = (N - 1)/4 + 1, h = H/8, w = W/8, normalised per channel as z_n = (z - mean)/std.
"""

from __future__ import annotations

import inspect
import logging
import os
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan

from mova_train import models
from mova_train.checkpoint_io import load_module_strict, read_json
from mova_train.codecs.errors import CodecConfigError, CodecInputError, check_tensor
from mova_train.names import CONFIG_NAME, WEIGHTS_NAME

logger = logging.getLogger(__name__)

# H and W must be multiples of 16: 8 (VAE) x 2 (DiT patch), as the reference pipeline's check_inputs enforces.
SIZE_MULTIPLE = 16
# Released config fields that are read by the pipeline, not by the AutoencoderKLWan constructor in every version.
_PIPELINE_FIELDS = {"latents_mean", "latents_std", "scale_factor_spatial", "scale_factor_temporal"}


def _constructor_fields() -> set[str]:
    return set(inspect.signature(AutoencoderKLWan.__init__).parameters) - {"self"}


def video_vae_constructor_kwargs(config: dict, *, where: str = "video_vae config") -> dict:
    """Validate a `video_vae/config.json` dict and return the AutoencoderKLWan constructor arguments.

    latents_mean/latents_std are required (no fallback to the class defaults: a wrong constant would silently make
    every cached latent wrong). Unknown fields are ignored with a warning; the strict key check at load still catches
    any architecture they would have changed.
    """
    if config.get("_class_name", "AutoencoderKLWan") != "AutoencoderKLWan":
        raise CodecConfigError(
            f"{where}: _class_name must be 'AutoencoderKLWan', got {config['_class_name']!r}"
        )
    z_dim = config.get("z_dim")
    if not isinstance(z_dim, int) or z_dim <= 0:
        raise CodecConfigError(f"{where}: z_dim must be a positive int, got {z_dim!r}")
    for name in ("latents_mean", "latents_std"):
        values = config.get(name)
        if not isinstance(values, list) or len(values) != z_dim:
            raise CodecConfigError(f"{where}: {name} must be a list of z_dim={z_dim} numbers, got {values!r}")
    if any(not (s > 0) for s in config["latents_std"]):
        raise CodecConfigError(f"{where}: latents_std must be positive, got {config['latents_std']}")
    accepted = _constructor_fields()
    unknown = sorted(k for k in config if not k.startswith("_") and k not in accepted | _PIPELINE_FIELDS)
    if unknown:
        logger.warning("%s: ignoring field(s) unknown to diffusers AutoencoderKLWan: %s", where, unknown)
    kwargs = {k: v for k, v in config.items() if k in accepted}
    if kwargs.get("is_residual") or kwargs.get("patch_size") is not None:
        raise CodecConfigError(
            f"{where}: the Wan2.2 residual/patchified VAE variant is not the MOVA video VAE"
        )
    dim_mult = kwargs.get("dim_mult", [1, 2, 4, 4])
    temporal = kwargs.get("temperal_downsample", [False, True, True])
    spatial_stride = 2 ** (len(dim_mult) - 1)
    temporal_stride = 2 ** sum(bool(t) for t in temporal)
    for name, derived in (
        ("scale_factor_spatial", spatial_stride),
        ("scale_factor_temporal", temporal_stride),
    ):
        if config.get(name, derived) != derived:
            raise CodecConfigError(f"{where}: {name}={config[name]} but the architecture gives {derived}")
    return kwargs


def build_video_vae_module(config: dict) -> AutoencoderKLWan:
    """Build on the current default device (wrap in `torch.device("meta")` for a weightless skeleton)."""
    return AutoencoderKLWan(**video_vae_constructor_kwargs(config))


def load_wan_vae(
    folder: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[AutoencoderKLWan, dict]:
    """Build from `folder/config.json` on meta and fill strictly; returns (module, config dict).

    Key names: the released checkpoint follows diffusers 0.36 naming, which equals the installed diffusers' names
    (tests/test_codecs_meta.py checks this against the manifest), so no key map is needed.
    """
    folder = Path(folder)
    config = read_json(folder / CONFIG_NAME)
    kwargs = video_vae_constructor_kwargs(config, where=str(folder / CONFIG_NAME))
    with torch.device("meta"):
        module = AutoencoderKLWan(**kwargs)
    load_module_strict(
        module, folder, weights_name=WEIGHTS_NAME, dtype=dtype, device=device, component="video_vae"
    )
    return module.eval().requires_grad_(False), config


def build_i2v_condition(cond_latent: torch.Tensor) -> torch.Tensor:
    """y = [mask(4) ‖ cond_latent(16)] -> [B, 20, T, h, w] (spec §8): mask is 1 on latent frame 0, else 0.

    Checks `cond_latent` (CodecInputError), then builds y with `mova_train.models.build_i2v_condition`.
    """
    check_tensor(
        cond_latent, where="build_i2v_condition", name="cond_latent", ndim=5, layout="[B, 16, T, h, w]"
    )
    return models.build_i2v_condition(cond_latent)


class VideoVAE:
    """Frozen Wan2.1 VAE: pixels <-> normalised latents (posterior mode), causal in time, optionally tiled in space.

    Long clips: the Wan VAE encodes 1 + 4k frames as a causal stream (first frame, then 4 at a time, with a feature
    cache), so activation memory does not grow with the clip length. Large frames: `enable_tiling` splits H×W into
    overlapping tiles that are blended (changes results slightly at seams, so record it if you cache latents).
    Batches are processed one clip at a time, so a clip's latents do not depend on its batch.
    """

    def __init__(self, module: AutoencoderKLWan, config: dict):
        self.module = module
        self.config = config
        self.z_dim = int(config["z_dim"])
        self.spatial_stride = 2 ** (len(module.config.dim_mult) - 1)
        self.temporal_stride = 2 ** sum(bool(t) for t in module.config.temperal_downsample)
        # [1, C, 1, 1, 1] float32: normalisation is applied in fp32 whatever the VAE dtype
        self._mean = torch.tensor(config["latents_mean"], dtype=torch.float32).view(1, -1, 1, 1, 1)
        self._std = torch.tensor(config["latents_std"], dtype=torch.float32).view(1, -1, 1, 1, 1)

    def _stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) on the VAE's current device (the module may have been moved after construction)."""
        if self._mean.device != self.device:
            self._mean, self._std = self._mean.to(self.device), self._std.to(self.device)
        return self._mean, self._std

    @property
    def dtype(self) -> torch.dtype:
        return self.module.quant_conv.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.module.quant_conv.weight.device

    @property
    def tiling(self) -> bool:
        return bool(self.module.use_tiling)

    def enable_tiling(self, tile_sample_min_size: int = 256, tile_sample_stride: int = 192) -> None:
        """Spatial tiling for frames larger than `tile_sample_min_size` (pixels; tiles overlap by min - stride)."""
        if tile_sample_min_size % self.spatial_stride or tile_sample_stride % self.spatial_stride:
            raise CodecInputError(
                f"video_vae.enable_tiling: tile sizes must be multiples of {self.spatial_stride}, got "
                f"min {tile_sample_min_size}, stride {tile_sample_stride}"
            )
        if not 0 < tile_sample_stride <= tile_sample_min_size:
            raise CodecInputError(
                f"video_vae.enable_tiling: need 0 < stride <= min, got min {tile_sample_min_size}, "
                f"stride {tile_sample_stride}"
            )
        self.module.enable_tiling(
            tile_sample_min_height=tile_sample_min_size,
            tile_sample_min_width=tile_sample_min_size,
            tile_sample_stride_height=tile_sample_stride,
            tile_sample_stride_width=tile_sample_stride,
        )

    def disable_tiling(self) -> None:
        self.module.use_tiling = False

    def num_latent_frames(self, num_frames: int) -> int:
        """(N - 1)/4 + 1 for N ≡ 1 (mod 4); any other N is refused (the causal VAE needs 1 + 4k frames)."""
        if not isinstance(num_frames, int) or num_frames < 1 or (num_frames - 1) % self.temporal_stride:
            raise CodecInputError(
                f"video_vae: num_frames must be 1 + {self.temporal_stride}k (e.g. 1, 5, ..., 193), got {num_frames}"
            )
        return (num_frames - 1) // self.temporal_stride + 1

    def _check_size(self, height: int, width: int, where: str) -> None:
        if height % SIZE_MULTIPLE or width % SIZE_MULTIPLE:
            raise CodecInputError(
                f"{where}: height and width must be multiples of {SIZE_MULTIPLE} (VAE stride {self.spatial_stride} x "
                f"DiT patch 2), got {height}x{width}; e.g. 352x640 for 360p"
            )

    def _encode_mode(self, video: torch.Tensor) -> torch.Tensor:
        """Normalised posterior mode of one already-checked clip [1, 3, N, H, W] -> [1, z, T, h, w] float32."""
        posterior = self.module.encode(video.to(self.device, self.dtype)).latent_dist
        mean, std = self._stats()
        return (posterior.mode().float() - mean) / std

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Video [B, 3, N, H, W] in [-1, 1] -> normalised latents [B, 16, (N-1)/4+1, H/8, W/8] float32."""
        check_tensor(
            video,
            where="video_vae.encode",
            name="video",
            ndim=5,
            layout="[B, 3, num_frames, H, W]",
            channels=(1, 3),
            value_range=(-1.0, 1.0),
        )
        self.num_latent_frames(video.shape[2])
        self._check_size(video.shape[3], video.shape[4], "video_vae.encode")
        return torch.cat([self._encode_mode(video[i : i + 1]) for i in range(video.shape[0])])

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents [B, 16, T, h, w] -> video [B, 3, 4(T-1)+1, 8h, 8w] float32, clamped to [-1, 1]."""
        check_tensor(
            latents,
            where="video_vae.decode",
            name="latents",
            ndim=5,
            layout=f"[B, {self.z_dim}, T, h, w]",
            channels=(1, self.z_dim),
        )
        mean, std = self._stats()
        z = (latents.to(self.device, torch.float32) * std + mean).to(self.dtype)
        return torch.cat([self.module.decode(z[i : i + 1]).sample.float() for i in range(z.shape[0])])

    @torch.no_grad()
    def encode_condition(self, image: torch.Tensor, num_frames: int) -> torch.Tensor:
        """Reference image [B, 3, H, W] in [-1, 1] -> normalised latents [B, 16, T, H/8, W/8] of the clip
        [image, grey, ..., grey] (N frames; grey = 0 in [-1, 1]), as the reference does (spec §8).

        Latent frames 1..T-1 are encodings of grey frames that follow the image, not zeros.
        """
        check_tensor(
            image,
            where="video_vae.encode_condition",
            name="image",
            ndim=4,
            layout="[B, 3, H, W]",
            channels=(1, 3),
            value_range=(-1.0, 1.0),
        )
        self.num_latent_frames(num_frames)
        self._check_size(image.shape[2], image.shape[3], "video_vae.encode_condition")
        out = []
        for i in range(image.shape[0]):
            clip = torch.zeros(1, 3, num_frames, *image.shape[2:], dtype=self.dtype, device=self.device)
            clip[:, :, 0] = image[i : i + 1].to(self.device, self.dtype)
            out.append(self._encode_mode(clip))
        return torch.cat(out)
