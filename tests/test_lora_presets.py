"""LoRA presets resolve to exact module paths (tiny and full size on meta); config validation; bundles."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from mova_train.lora import (
    PRESETS,
    LoraConfig,
    LoraError,
    apply_lora,
    describe_lora,
    format_lora_table,
    lora_config_from_name,
    num_lora_params,
    resolve_targets,
    validate_lora_config,
)
from mova_train.lora.presets import summarize_paths
from mova_train.models import build_mova, get_model_config

SPEC = Path(__file__).parent / "fixtures" / "mova_spec"
CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# What each preset must select, written from the spec's key tables (ARCHITECTURE.md §3.1, §4, §5.2).
EXPECTED_WEIGHT_KEYS = {
    "self_attn": r"blocks\.\d+\.self_attn\.(q|k|v|o)\.weight",
    "text_cross_attn": r"blocks\.\d+\.cross_attn\.(q|k|v|o)\.weight",
    "ffn": r"blocks\.\d+\.ffn\.(0|2)\.weight",
    "bridge_a2v": r"audio_to_video_conditioners\.\d+\.inner\.(q|k|v|o)\.weight",
    "bridge_v2a": r"video_to_audio_conditioners\.\d+\.inner\.(q|k|v|o)\.weight",
}
EXPECTED_COUNTS_360P = {  # layers x projections, from the spec
    ("video_dit", "self_attn"): 40 * 4,
    ("video_dit", "text_cross_attn"): 40 * 4,
    ("video_dit", "ffn"): 40 * 2,
    ("audio_dit", "self_attn"): 30 * 4,
    ("audio_dit", "ffn"): 30 * 2,
    ("dual_tower_bridge", "bridge_a2v"): 30 * 4,
    ("dual_tower_bridge", "bridge_v2a"): 30 * 4,
}


def _manifest(component: str) -> dict[str, list[int]]:
    return json.loads((SPEC / f"keys_{component}_360p.json").read_text())["tensors"]


@pytest.fixture(scope="module")
def meta_360p():
    return build_mova(get_model_config("mova_360p"), device="meta")


@pytest.fixture(scope="module")
def tiny_model():
    return build_mova(get_model_config("tiny"), device="cpu", seed=0)


def test_presets_resolve_to_exact_paths_at_full_size(meta_360p):
    for name, preset in PRESETS.items():
        for component in preset.components:
            manifest = _manifest(component)
            expected = sorted(
                k[: -len(".weight")] for k in manifest if re.fullmatch(EXPECTED_WEIGHT_KEYS[name], k)
            )
            got = resolve_targets(meta_360p, LoraConfig(targets={component: [name]}))[component]
            assert got == expected, (component, name)
            if (component, name) in EXPECTED_COUNTS_360P:
                assert len(got) == EXPECTED_COUNTS_360P[(component, name)]


def test_describe_counts_match_manifest_shapes(meta_360p):
    cfg = LoraConfig(
        rank=16,
        targets={
            "video_dit": ["self_attn", "ffn"],
            "video_dit_2": ["text_cross_attn"],
            "audio_dit": ["self_attn"],
            "dual_tower_bridge": ["bridge_a2v", "bridge_v2a"],
        },
    )
    rows = {r.component: r for r in describe_lora(meta_360p, cfg)}
    for component, presets in cfg.targets.items():
        manifest = _manifest(component)
        pattern = "|".join(f"(?:{EXPECTED_WEIGHT_KEYS[p]})" for p in presets)
        shapes = [v for k, v in manifest.items() if re.fullmatch(pattern, k)]
        assert rows[component].num_modules == len(shapes)
        # a Linear weight is [out, in]; LoRA adds A [r, in] and B [out, r]
        assert rows[component].trainable_params == sum(16 * (o + i) for o, i in shapes)
        assert rows[component].base_params == sum(int(torch.Size(v).numel()) for v in manifest.values())
    text = format_lora_table(list(rows.values()), cfg)
    assert "video_dit" in text and "blocks.{0-39}.self_attn.{k,o,q,v}" in text


def test_injection_on_meta_at_full_size_matches_describe():
    model = build_mova(
        get_model_config("mova_360p"), components=("audio_dit", "dual_tower_bridge"), device="meta"
    )
    cfg = LoraConfig(
        rank=8, use_dora=True, targets={"audio_dit": ["ffn"], "dual_tower_bridge": ["bridge_v2a"]}
    )
    expected = sum(r.trainable_params for r in describe_lora(model, cfg))
    apply_lora(model, cfg)
    assert num_lora_params(model) == expected
    assert all(p.device.type == "meta" for p in model.parameters())


def test_tiny_resolution_and_layer_restriction(tiny_model):
    num_video = get_model_config("tiny").video_dit.num_layers
    cfg = LoraConfig(targets={"video_dit": ["self_attn"], "audio_dit": ["ffn"]}, layers=[0, num_video - 1])
    targets = resolve_targets(tiny_model, cfg)
    assert targets["video_dit"] == sorted(
        f"blocks.{i}.self_attn.{p}" for i in (0, num_video - 1) for p in "qkvo"
    )
    num_audio = get_model_config("tiny").audio_dit.num_layers
    assert targets["audio_dit"] == (
        ["blocks.0.ffn.0", "blocks.0.ffn.2"]
        + (
            [f"blocks.{num_video - 1}.ffn.0", f"blocks.{num_video - 1}.ffn.2"]
            if num_video - 1 < num_audio
            else []
        )
    )
    with pytest.raises(LoraError, match="lora.layers"):
        resolve_targets(tiny_model, LoraConfig(targets={"video_dit": ["self_attn"]}, layers=[0, 999]))
    with pytest.raises(LoraError, match="selects no module of audio_dit"):
        resolve_targets(
            tiny_model, LoraConfig(targets={"video_dit": ["ffn"], "audio_dit": ["ffn"]}, layers=[num_audio])
        )


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"rank": 0}, "lora.rank"),
        ({"rank": -3}, "lora.rank"),
        ({"alpha": 0.0}, "lora.alpha"),
        ({"dropout": 1.0}, "lora.dropout"),
        ({"init": "pissa"}, "lora.init"),
        ({"init": "orthogonal", "rank": 3}, "even"),
        ({"targets": {}}, "lora.targets is empty"),
        ({"targets": {"text_encoder": ["self_attn"]}}, "unknown component 'text_encoder'"),
        ({"targets": {"audio_dit": ["attention"]}}, "unknown preset 'attention'"),
        ({"targets": {"audio_dit": ["bridge_a2v"]}}, "does not apply to audio_dit"),
        (
            {"targets": {"dual_tower_bridge": ["self_attn"]}},
            "presets for dual_tower_bridge: bridge_a2v, bridge_v2a",
        ),
        ({"targets": {"audio_dit": ["ffn", "ffn"]}}, "twice"),
        ({"targets": {"audio_dit": "ffn"}}, "non-empty list"),
        ({"layers": []}, "lora.layers"),
        ({"layers": [-1]}, "lora.layers"),
    ],
)
def test_validation_names_the_field(changes, match):
    values = {"targets": {"audio_dit": ["self_attn"]}, **changes}
    with pytest.raises(LoraError, match=match):
        validate_lora_config(LoraConfig(**values))


def test_component_not_loaded_is_named():
    model = build_mova(get_model_config("tiny"), components=("video_dit_2", "audio_dit", "dual_tower_bridge"))
    with pytest.raises(LoraError, match="'video_dit'.*not loaded"):
        resolve_targets(model, LoraConfig(targets={"video_dit": ["self_attn"]}))


def test_summarize_paths():
    paths = [f"blocks.{i}.self_attn.{p}" for i in (0, 1, 2, 5) for p in "qkvo"] + ["blocks.3.ffn.0"]
    assert summarize_paths(paths) == ["blocks.{0-2,5}.self_attn.{k,o,q,v}", "blocks.{3}.ffn.0"]


def test_bundles_and_preset_names_resolve(tiny_model):
    bundles = sorted(p.stem for p in (CONFIGS / "lora").glob("*.yaml"))
    assert {"reference", "voice", "sfx", "video_style", "tiny"} <= set(bundles)
    for name in bundles:
        cfg = lora_config_from_name(name)
        targets = resolve_targets(tiny_model, cfg)
        assert set(targets) == set(cfg.targets) and all(targets.values())
    for name in sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml")):
        cfg = lora_config_from_name(name)  # composed with Hydra; its `lora` node
        assert resolve_targets(tiny_model, cfg)
    cfg = lora_config_from_name("self_attn,bridge_v2a")
    assert cfg.targets == {
        "video_dit": ["self_attn"],
        "video_dit_2": ["self_attn"],
        "audio_dit": ["self_attn"],
        "dual_tower_bridge": ["bridge_v2a"],
    }
    with pytest.raises(LoraError, match="neither a preset"):
        lora_config_from_name("no_such_thing")


def test_bundle_with_unknown_field_is_refused(tmp_path):
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "bad.yaml").write_text("rnak: 4\ntargets: {audio_dit: [ffn]}\n")
    with pytest.raises(LoraError, match="rnak"):
        lora_config_from_name("bad", config_dir=tmp_path)
