"""Validation and preparation of sampler inputs: sizes, the I2V reference image, prompt files, `--lora` specs."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

# The negative prompt of the reference `scripts/inference_single.py` (spec §9).
DEFAULT_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
    "丑陋的，残缺的，多余的手指"
)

SIZE_MULTIPLE = 16  # VAE stride 8 x patch 2 (spec §10)


class SamplingError(ValueError):
    """Bad sampler input: sizes, frame count, image, prompts, adapters."""


@dataclass(frozen=True)
class SampleShape:
    """Pixel and latent sizes of one render."""

    num_frames: int
    height: int
    width: int
    fps: float
    latent_frames: int  # (N - 1) / 4 + 1
    latent_height: int
    latent_width: int
    num_audio_samples: int  # floor(sr * N / fps), the clip's duration
    audio_latent_len: int  # ceil(num_audio_samples / hop)


def check_sample_shape(
    num_frames: int,
    height: int,
    width: int,
    fps: float,
    *,
    temporal_stride: int = 4,
    spatial_stride: int = 8,
    sample_rate: int = 48000,
    audio_hop: int = 960,
) -> SampleShape:
    """Validate the render size (spec §13.1) and derive the latent shapes (spec §14)."""
    for name, value in (("num_frames", num_frames), ("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value <= 0:
            raise SamplingError(f"{name} must be a positive integer, got {value!r}")
    if (num_frames - 1) % temporal_stride:
        lower = num_frames - (num_frames - 1) % temporal_stride
        raise SamplingError(
            f"num_frames must be 1 mod {temporal_stride} (the video VAE's causal temporal stride), got "
            f"{num_frames}; try {lower} or {lower + temporal_stride}"
        )
    for name, value in (("height", height), ("width", width)):
        if value % SIZE_MULTIPLE:
            raise SamplingError(
                f"{name} must be a multiple of {SIZE_MULTIPLE} (VAE stride 8 x patch 2), got {value}; "
                f"e.g. 352x640 for 360p, 720x1280 for 720p"
            )
    if not (isinstance(fps, int | float) and math.isfinite(fps) and fps > 0):
        raise SamplingError(f"fps must be a positive number, got {fps!r}")
    num_audio_samples = int(math.floor(sample_rate * num_frames / fps))
    return SampleShape(
        num_frames=int(num_frames),
        height=int(height),
        width=int(width),
        fps=float(fps),
        latent_frames=(num_frames - 1) // temporal_stride + 1,
        latent_height=height // spatial_stride,
        latent_width=width // spatial_stride,
        num_audio_samples=num_audio_samples,
        audio_latent_len=max(1, math.ceil(num_audio_samples / audio_hop)),
    )


def parse_size(text: str) -> tuple[int, int]:
    """'352x640' -> (352, 640) (height x width)."""
    parts = text.lower().replace("×", "x").split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise SamplingError(f"size must be HEIGHTxWIDTH such as 352x640, got {text!r}")
    return int(parts[0]), int(parts[1])


def load_reference_image(image, height: int, width: int) -> torch.Tensor:
    """The I2V reference as [1, 3, H, W] in [-1, 1]: centre-cropped to the target aspect, resized (spec §8.1).

    `image` is a file path, a PIL image, a uint8 array [H, W, 3], or a float tensor [3, H, W] / [1, 3, H, W]
    already in [-1, 1] (used as is when it has the target size, else cropped and resized like a picture).
    """
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, str | os.PathLike):
        path = Path(image)
        if not path.is_file():
            raise SamplingError(f"reference image not found: {path}")
        try:
            with Image.open(path) as opened:
                picture = opened.convert("RGB")
        except (UnidentifiedImageError, OSError) as exc:
            raise SamplingError(f"cannot read reference image {path}: {exc}") from exc
    elif isinstance(image, Image.Image):
        picture = image.convert("RGB")
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise SamplingError(
                f"reference image array must be uint8 [H, W, 3], got {image.dtype} {image.shape}"
            )
        picture = Image.fromarray(image, mode="RGB")
    elif isinstance(image, torch.Tensor):
        tensor = image.detach().float().cpu()
        if tensor.ndim == 3:
            tensor = tensor[None]
        if tensor.ndim != 4 or tensor.shape[:2] != (1, 3):
            raise SamplingError(
                f"reference image tensor must be [3, H, W] in [-1, 1], got {tuple(image.shape)}"
            )
        if tensor.shape[-2:] == (height, width):
            return tensor.clamp(-1.0, 1.0)
        array = ((tensor[0].clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
        picture = Image.fromarray(array, mode="RGB")
    else:
        raise SamplingError(f"unsupported reference image type {type(image).__name__}")
    # centre crop to the target aspect ratio, then resize with PIL's default filter (as the reference does)
    src_w, src_h = picture.size
    target = width / height
    if src_w / src_h > target:
        crop_w = max(1, round(src_h * target))
        left = (src_w - crop_w) // 2
        picture = picture.crop((left, 0, left + crop_w, src_h))
    else:
        crop_h = max(1, round(src_w / target))
        top = (src_h - crop_h) // 2
        picture = picture.crop((0, top, src_w, top + crop_h))
    picture = picture.resize((width, height))
    array = np.asarray(picture, dtype=np.float32)  # [H, W, 3]
    return torch.from_numpy(array / 127.5 - 1.0).permute(2, 0, 1)[None].contiguous()


def grey_reference(height: int, width: int) -> torch.Tensor:
    """A mid-grey reference [1, 3, H, W] (all zeros in [-1, 1]) for renders without an image."""
    return torch.zeros(1, 3, height, width)


@dataclass
class PromptItem:
    """One render request from a prompts file."""

    prompt: str
    image: str | None = None
    negative_prompt: str | None = None
    seed: int | None = None


def load_prompts_file(path: str | os.PathLike) -> list[PromptItem]:
    """Prompts from a file.

    `.txt`: one prompt per line (blank lines and lines starting with '#' skipped).
    `.json` (a list) or `.jsonl` (one per line): strings, or objects with "prompt" and optional "image" (relative
    paths are taken from the file's folder), "negative_prompt", "seed".
    """
    path = Path(path)
    if not path.is_file():
        raise SamplingError(f"prompts file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SamplingError(f"cannot read prompts file {path}: {exc}") from exc
    suffix = path.suffix.lower()
    if suffix in (".json", ".jsonl"):
        try:
            if suffix == ".json":
                entries = json.loads(text)
                if not isinstance(entries, list):
                    raise SamplingError(f"{path}: expected a JSON list of prompts")
            else:
                entries = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise SamplingError(f"{path}: invalid JSON ({exc})") from exc
        items = [_prompt_item(entry, path, i) for i, entry in enumerate(entries)]
    else:
        items = [
            PromptItem(line.strip())
            for line in text.splitlines()
            if line.strip() and not line.startswith("#")
        ]
    if not items:
        raise SamplingError(f"prompts file {path} has no prompts")
    return items


def _prompt_item(entry, path: Path, index: int) -> PromptItem:
    if isinstance(entry, str):
        entry = {"prompt": entry}
    if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str) or not entry["prompt"].strip():
        raise SamplingError(f"{path}: entry {index} needs a non-empty string field 'prompt'")
    unknown = set(entry) - {"prompt", "image", "negative_prompt", "seed"}
    if unknown:
        raise SamplingError(
            f"{path}: entry {index} has unknown fields {sorted(unknown)}; allowed: prompt, image, negative_prompt, seed"
        )
    image = entry.get("image")
    if image is not None:
        image = str(image if Path(image).is_absolute() else path.parent / image)
    seed = entry.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise SamplingError(f"{path}: entry {index} field 'seed' must be an integer, got {seed!r}")
    return PromptItem(entry["prompt"], image, entry.get("negative_prompt"), seed)


@dataclass(frozen=True)
class LoraSpec:
    """One `--lora DIR[:SCALE]` argument."""

    path: str
    scale: float = 1.0


def parse_lora_spec(text: str) -> LoraSpec:
    """'DIR' or 'DIR:SCALE' -> LoraSpec. A trailing ':x' that is not a number belongs to the path."""
    path, scale = text, 1.0
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            scale = float(tail)
            path = head
        except ValueError:
            path, scale = text, 1.0
    if not math.isfinite(scale):
        raise SamplingError(f"--lora {text!r}: scale must be a finite number")
    if not path:
        raise SamplingError(f"--lora {text!r}: missing adapter path")
    return LoraSpec(path, scale)
