"""Real-size architecture without weights: the 360p/720p builds on `meta` match the released key manifests."""

import json
import math
from pathlib import Path

import pytest

from mova_train.models import (
    COMPONENTS,
    AudioDiTConfig,
    BridgeConfig,
    VideoDiTConfig,
    build_mova,
    get_model_config,
)
from mova_train.models.config import num_tokens

SPEC = Path(__file__).parent / "fixtures" / "mova_spec"


def _manifest(component: str, variant: str) -> dict:
    return json.loads((SPEC / f"keys_{component}_{variant}.json").read_text())


@pytest.fixture(scope="module", params=["360p", "720p"])
def released(request):
    variant = request.param
    return variant, build_mova(f"mova_{variant}", device="meta")


def test_names_and_shapes_equal_manifests(released):
    variant, model = released
    for component in COMPONENTS:
        manifest = _manifest(component, variant)
        module = getattr(model, component)
        assert next(module.parameters()).is_meta
        state = {k: list(v.shape) for k, v in module.state_dict().items()}
        assert state == manifest["tensors"], component
        assert len(state) == manifest["_meta"]["num_tensors"]
        # Everything in the state dict is a parameter: no persistent buffers (RoPE tables are computed lazily).
        assert set(state) == {n for n, _ in module.named_parameters()}


def test_parameter_counts_equal_param_counts_json(released):
    _, model = released
    counts = json.loads((SPEC / "param_counts.json").read_text())
    per = counts["per_component_params"]
    n = {c: sum(p.numel() for p in getattr(model, c).parameters()) for c in COMPONENTS}
    assert n["video_dit"] == per["video_dit (high-noise expert)"]
    assert n["video_dit_2"] == per["video_dit_2 (low-noise expert)"]
    assert n["audio_dit"] == per["audio_dit"]
    assert n["dual_tower_bridge"] == per["dual_tower_bridge"]
    assert (
        sum(n.values()) == counts["total_diffusion_params (2 experts + audio_dit + bridge)"] == 32_656_733_440
    )
    active = n["video_dit"] + n["audio_dit"] + n["dual_tower_bridge"]
    assert (
        active == counts["active_diffusion_params_per_step (1 expert + audio_dit + bridge)"] == 18_367_832_256
    )


@pytest.mark.parametrize("variant", ["360p", "720p"])
def test_manifest_configs_parse_to_the_presets(variant):
    """The config each manifest was generated from uses only fields we know, with the presets' values."""
    preset = get_model_config(f"mova_{variant}")
    video = VideoDiTConfig.from_dict(_manifest("video_dit", variant)["_meta"]["config_used"])
    video2 = VideoDiTConfig.from_dict(_manifest("video_dit_2", variant)["_meta"]["config_used"])
    audio = AudioDiTConfig.from_dict(_manifest("audio_dit", variant)["_meta"]["config_used"])
    bridge = BridgeConfig.from_dict(_manifest("dual_tower_bridge", variant)["_meta"]["config_used"])
    assert video == video2 == preset.video_dit
    assert audio == preset.audio_dit
    assert bridge == preset.dual_tower_bridge
    assert preset.video_dit.rope_split == (44, 42, 42)
    assert preset.boundary_timestep == 900.0


@pytest.mark.parametrize("variant,video", [("360p", 43_120), ("720p", 176_400)])
def test_token_counts_of_the_spec_clip(variant, video):
    height, width = (352, 640) if variant == "360p" else (720, 1280)
    cfg = get_model_config(f"mova_{variant}")
    got = num_tokens(cfg, num_frames=193, height=height, width=width, num_audio_samples=48000 * 193 // 24)
    assert got == (video, 403)


def test_one_expert_build_allocates_only_what_was_asked():
    model = build_mova("mova_360p", components=("video_dit_2",), device="meta")
    assert model.video_dit is None and model.audio_dit is None and model.dual_tower_bridge is None
    assert model.components == ("video_dit_2",)
    assert sum(p.numel() for p in model.parameters()) == 14_288_901_184
    assert math.prod(model.video_dit_2.head.head.weight.shape) == 64 * 5120
