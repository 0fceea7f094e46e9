"""Real-size codecs without weights: names/shapes at the released configs equal the vendored key manifests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mova_train.codecs import build_codec_modules
from mova_train.codecs.configs import get_codec_config
from mova_train.codecs.dac import DacConfig, weight_norm_layout
from mova_train.codecs.errors import CodecConfigError

SPEC = Path(__file__).parent / "fixtures" / "mova_spec"


def _manifest(name: str) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v) for k, v in json.loads((SPEC / f"keys_{name}.json").read_text())["tensors"].items()}


def _param_count(label_start: str) -> int:
    counts = json.loads((SPEC / "param_counts.json").read_text())["per_component_params"]
    (value,) = [v for k, v in counts.items() if k.startswith(label_start)]
    return value


def _shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


@pytest.fixture(scope="module", params=["360p", "720p"])
def release(request):
    return request.param, build_codec_modules(f"mova_{request.param}", device="meta")


def test_video_vae_matches_manifest(release):
    variant, modules = release
    vae = modules["video_vae"]
    assert _shapes(vae) == _manifest(f"video_vae_{variant}")
    assert sum(p.numel() for p in vae.parameters()) == _param_count("video_vae")
    assert next(vae.parameters()).is_meta


def test_audio_vae_matches_both_layouts(release):
    variant, modules = release
    dac = modules["audio_vae"]
    assert _shapes(dac) == _manifest(f"audio_vae_{variant}")
    assert sum(p.numel() for p in dac.parameters()) == _param_count("audio_vae")
    # The weight-norm layout we accept at load is exactly the alternative manifest.
    assert weight_norm_layout(dac) == _manifest(f"audio_vae_weightnorm_{variant}")


def test_text_encoder_matches_manifest_with_tied_embedding(release):
    """The manifest lists both tied names (shared.weight, encoder.embed_tokens.weight); so does state_dict(), which
    reports tied parameters under every name. The unique parameter count must equal the spec's count, which only
    holds if the two names are one tensor (counting both would add 256384*4096)."""
    variant, modules = release
    te = modules["text_encoder"]
    assert _shapes(te) == _manifest(f"text_encoder_{variant}")
    assert te.shared.weight is te.encoder.embed_tokens.weight
    assert sum(p.numel() for p in te.parameters()) == _param_count("text_encoder")


def test_release_time_axes_from_configs():
    dac = DacConfig.from_dict(get_codec_config("mova_360p", "audio_vae"))
    assert dac.hop_length == 960 and dac.sample_rate // dac.hop_length == 50
    # 193 frames at 24 fps -> floor(48000*193/24) samples -> ceil(/960) latent frames (spec §11, §14)
    num_samples = 48000 * 193 // 24
    assert num_samples == 386_000
    assert -(-num_samples // dac.hop_length) == 403
    vae = get_codec_config("mova_360p", "video_vae")
    assert 2 ** (len(vae["dim_mult"]) - 1) == vae["scale_factor_spatial"] == 8
    assert 2 ** sum(vae["temperal_downsample"]) == vae["scale_factor_temporal"] == 4


def test_latent_normalisation_constants_match_the_spec():
    """The per-channel constants of the release preset (and so of every tiny checkpoint) are the spec's §2.1."""
    spec = (Path(__file__).parents[1] / "docs" / "ARCHITECTURE.md").read_text()
    for name in ("latents_mean", "latents_std"):
        (line,) = [ln for ln in spec.splitlines() if ln.startswith(f"{name} = [")]
        expected = json.loads(line.split("=", 1)[1])
        assert len(expected) == 16
        for preset in ("mova_360p", "mova_720p", "tiny"):
            assert get_codec_config(preset, "video_vae")[name] == expected


def test_tiny_preset_keeps_release_ratios():
    modules = build_codec_modules("tiny", device="meta")
    assert set(modules) == {"video_vae", "audio_vae", "text_encoder"}
    assert modules["audio_vae"].config.hop_length == 960
    assert modules["audio_vae"].config.latent_dim == 128
    assert modules["video_vae"].config.z_dim == 16
    assert modules["text_encoder"].config.d_model == 32


def test_unknown_preset_is_refused():
    with pytest.raises(CodecConfigError, match="mova_360p"):
        build_codec_modules("mova_1080p")
    with pytest.raises(CodecConfigError, match="video_vae"):
        build_codec_modules("tiny", components=("vae",))
