"""Component configs: strict parsing of config.json dicts, cross-checks between components, bridge layer sets."""

import dataclasses

import pytest

from mova_train.models import (
    AudioDiTConfig,
    BridgeConfig,
    ConfigError,
    MovaConfig,
    SchedulerConfig,
    VideoDiTConfig,
    get_model_config,
)


def _video_raw(**over):
    raw = get_model_config("mova_360p").video_dit.to_dict()
    raw["_diffusers_version"] = "0.33.1"
    raw.update(over)
    return raw


def test_released_config_round_trips_through_dict():
    cfg = get_model_config("mova_360p")
    assert VideoDiTConfig.from_dict(_video_raw()) == cfg.video_dit
    assert AudioDiTConfig.from_dict(cfg.audio_dit.to_dict()) == cfg.audio_dit
    assert BridgeConfig.from_dict(cfg.dual_tower_bridge.to_dict()) == cfg.dual_tower_bridge
    assert SchedulerConfig.from_dict(cfg.scheduler.to_dict()) == cfg.scheduler


def test_unknown_field_is_named():
    with pytest.raises(ConfigError, match="unknown config field.*'dims'"):
        VideoDiTConfig.from_dict(_video_raw(dims=3), "video_dit/config.json")


def test_missing_required_field_is_named():
    raw = _video_raw()
    del raw["ffn_dim"]
    with pytest.raises(ConfigError, match=r"video_dit/config.json.*missing.*ffn_dim"):
        VideoDiTConfig.from_dict(raw, "video_dit/config.json")


@pytest.mark.parametrize(
    "field,value",
    [("has_image_input", True), ("seperated_timestep", True), ("patch_size", [1, 2]), ("num_heads", 7)],
)
def test_unsupported_values_are_rejected(field, value):
    with pytest.raises(ConfigError, match=field):
        VideoDiTConfig.from_dict(_video_raw(**{field: value}))


def test_wrong_class_name_is_rejected():
    with pytest.raises(ConfigError, match="WanAudioModel"):
        VideoDiTConfig.from_dict(_video_raw(_class_name="WanAudioModel"))


def test_audio_and_bridge_options_outside_the_release_are_rejected():
    raw = get_model_config("mova_360p").audio_dit.to_dict()
    with pytest.raises(ConfigError, match="vae_type"):
        AudioDiTConfig.from_dict({**raw, "vae_type": "oobleck"})
    braw = get_model_config("mova_360p").dual_tower_bridge.to_dict()
    with pytest.raises(ConfigError, match="pooled_adaln"):
        BridgeConfig.from_dict({**braw, "pooled_adaln": True})
    with pytest.raises(ConfigError, match="interaction_strategy"):
        BridgeConfig.from_dict({**braw, "interaction_strategy": "sparse"})


def test_scheduler_options_outside_the_release_are_rejected():
    raw = SchedulerConfig().to_dict()
    assert SchedulerConfig.from_dict({**raw, "num_inference_steps": 100}).shift == 5.0  # accepted, unused
    with pytest.raises(ConfigError, match="inverse_timesteps"):
        SchedulerConfig.from_dict({**raw, "inverse_timesteps": True})
    with pytest.raises(ConfigError, match="unknown config field.*'shfit'"):
        SchedulerConfig.from_dict({**raw, "shfit": 3})


def test_components_must_agree():
    cfg = get_model_config("tiny")
    with pytest.raises(ConfigError, match="visual_hidden_dim"):
        MovaConfig(
            video_dit=cfg.video_dit,
            audio_dit=cfg.audio_dit,
            dual_tower_bridge=dataclasses.replace(cfg.dual_tower_bridge, visual_hidden_dim=64),
        )


def test_head_dim_must_allow_the_3d_rope_split():
    # head_dim 16: 16//3 = 5 real dims per spatial axis is not a whole number of pairs.
    with pytest.raises(ConfigError, match="3D RoPE"):
        VideoDiTConfig.from_dict(_video_raw(dim=32, num_heads=2))


def test_unknown_preset():
    with pytest.raises(ConfigError, match="mova_360p"):
        get_model_config("mova_1080p")


def test_interaction_strategies_follow_the_spec_table():
    def layers(strategy):
        cfg = dataclasses.replace(
            get_model_config("mova_360p").dual_tower_bridge, interaction_strategy=strategy
        )
        return cfg.interaction_layers

    assert layers("full") == list(range(30))
    assert layers("shallow_focus") == list(range(10))
    assert layers("distributed") == list(range(0, 30, 3))
    assert layers("progressive") == list(range(8)) + list(range(8, 30, 3))
    assert layers("custom") == [0, 2, 4, 6, 8, 12, 16, 20]
