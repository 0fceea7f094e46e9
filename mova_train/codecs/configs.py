"""Codec config presets ("tiny", "mova_360p", "mova_720p"), written exactly as each component's config.json.

The release values are those of docs/ARCHITECTURE.md §2.1 (and the `_meta.config_used` blocks of the vendored key
manifests). The tiny preset keeps every time/space ratio of the release (VAE 8x spatial / 4x temporal, z_dim 16;
DAC rates [2,3,4,5,8] -> hop 960, latent_dim 128; 512 text tokens) with small widths.
"""

from __future__ import annotations

import copy

from mova_train.codecs.errors import CodecConfigError
from mova_train.names import CODEC_COMPONENTS

CONFIG_NAMES = ("tiny", "mova_360p", "mova_720p")

# Wan2.1 VAE latent statistics (spec §2.1); MOVA normalises z_n = (z - mean) / std per channel.
WAN_LATENTS_MEAN = [
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
]  # fmt: skip
WAN_LATENTS_STD = [
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
]  # fmt: skip

_VIDEO_VAE_RELEASE = {
    "_class_name": "AutoencoderKLWan",
    "base_dim": 96,
    "z_dim": 16,
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_scales": [],
    "temperal_downsample": [False, True, True],
    "dropout": 0.0,
    "latents_mean": WAN_LATENTS_MEAN,
    "latents_std": WAN_LATENTS_STD,
    "scale_factor_spatial": 8,
    "scale_factor_temporal": 4,
}

_AUDIO_VAE_RELEASE = {
    "_class_name": "DAC",
    "encoder_dim": 128,
    "encoder_rates": [2, 3, 4, 5, 8],
    "latent_dim": 128,
    "decoder_dim": 2048,
    "decoder_rates": [8, 5, 4, 3, 2],
    "sample_rate": 48000,
    "continuous": True,
    "use_weight_norm": False,
    # Quantiser fields exist in the released config but are unused when continuous.
    "n_codebooks": 9,
    "codebook_size": 1024,
    "codebook_dim": 8,
    "quantizer_dropout": False,
}

_TEXT_ENCODER_RELEASE = {
    "_class_name": "UMT5EncoderModel",
    "architectures": ["UMT5EncoderModel"],
    "model_type": "umt5",
    "vocab_size": 256384,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "feed_forward_proj": "gated-gelu",
    "layer_norm_epsilon": 1e-6,
    "dropout_rate": 0.1,
    "tie_word_embeddings": False,
    "pad_token_id": 0,
    "eos_token_id": 1,
}

# Tiny widths: the models engineer's tiny text_dim is 32 (agreed), so d_model is 32 here.
TINY_TEXT_DIM = 32
TINY_VOCAB_SIZE = 384

_TINY_OVERRIDES = {
    "video_vae": {"base_dim": 8, "num_res_blocks": 1},
    "audio_vae": {"encoder_dim": 4, "decoder_dim": 64},
    "text_encoder": {
        "vocab_size": TINY_VOCAB_SIZE,
        "d_model": TINY_TEXT_DIM,
        "d_kv": 8,
        "d_ff": 64,
        "num_layers": 2,
        "num_heads": 4,
    },
}

_RELEASE = {
    "video_vae": _VIDEO_VAE_RELEASE,
    "audio_vae": _AUDIO_VAE_RELEASE,
    "text_encoder": _TEXT_ENCODER_RELEASE,
}


def get_codec_config(config_name: str, component: str) -> dict:
    """The config.json content of one codec at a preset (a fresh copy, safe to modify)."""
    if config_name not in CONFIG_NAMES:
        raise CodecConfigError(f"unknown codec config {config_name!r}; allowed: {', '.join(CONFIG_NAMES)}")
    if component not in CODEC_COMPONENTS:
        raise CodecConfigError(
            f"unknown codec component {component!r}; allowed: {', '.join(CODEC_COMPONENTS)}"
        )
    config = copy.deepcopy(_RELEASE[component])
    if config_name == "tiny":
        config.update(copy.deepcopy(_TINY_OVERRIDES[component]))
    # MOVA-720p shares the 360p architecture (spec §2: identical config.json values, different weights).
    return config
