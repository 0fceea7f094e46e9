"""Frozen codecs of a MOVA checkpoint: Wan2.1 video VAE, DAC-VAE audio codec, UMT5 text encoder + tokenizer.

`load_codecs` is the one place that loads them (all or a subset) strictly from a checkpoint folder; data_tools
encodes clips with them and the sampler decodes with them. `codec_identity` names them for shard manifests.

The names below are imported on first use (PEP 562): the trainer needs only `codec_identity` unless it renders, so a
training process does not import diffusers (the video VAE) or the UMT5 model at start.
"""

from __future__ import annotations

from mova_train.lazy import lazy_exports

_HOMES = {
    "TEXT_LEN": ".text_encoder",
    "AudioVAE": ".dac",
    "CodecConfigError": ".errors",
    "CodecInputError": ".errors",
    "Codecs": ".loading",
    "TextEncoder": ".text_encoder",
    "VideoVAE": ".video_vae",
    "build_codec_modules": ".loading",
    "build_i2v_condition": ".video_vae",
    "codec_identity": ".identity",
    "load_codecs": ".loading",
}

__all__ = sorted(_HOMES)
__getattr__, __dir__ = lazy_exports(__name__, _HOMES, globals())
