"""mova_train.names: standard library only, and the names it holds are the ones the code and the layout use."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import mova_train.names as names
from mova_train.checkpoint_io import list_weight_files
from mova_train.models import MovaModel, build_mova
from mova_train.models.dit import WanAudioDiT, WanVideoDiT

NAMES_PY = Path(names.__file__)


def test_names_imports_only_the_standard_library_statically():
    tree = ast.parse(NAMES_PY.read_text(encoding="utf-8"))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"relative import in names.py: {ast.unparse(node)}"
            imported.add(node.module.split(".")[0])
    assert imported <= set(sys.stdlib_module_names) | {"__future__"}, imported


def test_importing_names_loads_no_third_party_module():
    code = (
        "import json, sys\n"
        "before = set(sys.modules)\n"
        "import mova_train.names\n"
        "print(json.dumps(sorted(set(sys.modules) - before)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = json.loads(out)
    ours = [m for m in loaded if m.split(".")[0] == "mova_train"]
    assert sorted(ours) == ["mova_train", "mova_train.names"], ours
    third_party = [m for m in loaded if m.split(".")[0] not in sys.stdlib_module_names and m not in ours]
    assert not third_party, third_party


def test_model_attributes_are_the_component_names():
    model = build_mova("tiny", device="meta")
    assert isinstance(model, MovaModel)
    assert model.components == names.COMPONENTS
    assert tuple(name for name, _ in model.named_children()) == names.COMPONENTS
    for expert in names.EXPERTS:
        assert type(getattr(model, expert)) is WanVideoDiT, expert
    assert type(getattr(model, names.AUDIO_DIT)) is WanAudioDiT
    assert set(names.COMPONENTS) == set(names.EXPERTS) | set(names.SHARED_COMPONENTS)
    assert names.TOWERS == names.EXPERTS + (names.AUDIO_DIT,)
    # Each expert owns the timesteps on its side of the released boundary.
    assert model.expert_for_timestep(1000.0 * names.BOUNDARY_RATIO) == names.HIGH_NOISE_EXPERT
    assert model.expert_for_timestep(1000.0 * names.BOUNDARY_RATIO - 1) == names.LOW_NOISE_EXPERT


def test_the_modules_that_used_to_copy_the_names_now_share_them():
    from mova_train import config, identity, lora, models
    from mova_train.codecs import configs as codec_configs
    from mova_train.lora import presets
    from mova_train.models import inspect

    assert models.COMPONENTS is names.COMPONENTS and models.EXPERTS is names.EXPERTS
    assert config.COMPONENTS is names.COMPONENTS and config.EXPERTS is names.EXPERTS
    assert lora.config.COMPONENTS is names.COMPONENTS
    assert presets.TOWERS is names.TOWERS
    assert identity.base_identity.__defaults__ == (names.COMPONENTS,)
    assert inspect.CODEC_COMPONENTS is codec_configs.CODEC_COMPONENTS is names.CODEC_COMPONENTS


def test_released_layout_names_match_a_written_checkpoint(tiny_checkpoint):
    index = json.loads((tiny_checkpoint / names.MODEL_INDEX_NAME).read_text())
    assert set(names.COMPONENTS) | set(names.CODEC_COMPONENTS) | {names.TOKENIZER_DIR} <= set(index)
    assert set(names.COMPONENT_WEIGHTS) == set(names.COMPONENTS) | set(names.CODEC_COMPONENTS)
    for component, stem in names.COMPONENT_WEIGHTS.items():
        folder = tiny_checkpoint / component
        assert (folder / names.CONFIG_NAME).is_file(), component
        assert list_weight_files(folder, weights_name=stem), component
    assert (tiny_checkpoint / names.TOKENIZER_DIR).is_dir()


def test_adapter_key_round_trips_through_the_pattern():
    for component in names.COMPONENTS:
        for part in names.LORA_PARTS:
            key = names.adapter_key(component, "blocks.0.self_attn.q", part)
            m = names.ADAPTER_KEY_RE.fullmatch(key)
            assert m is not None and (m["component"], m["path"], m["part"]) == (
                component,
                "blocks.0.self_attn.q",
                part,
            )
            peft = f"module.{component}.blocks.0.self_attn.q.{part}.default.weight"
            m = names.PEFT_KEY_RE.match(peft)
            assert m is not None and (m["component"], m["adapter"]) == (component, "default")
    assert names.ADAPTER_KEY_RE.fullmatch("video_dit_3.blocks.0.q.lora_A.weight") is None
    assert names.ADAPTER_KEY_RE.fullmatch("video_dit.blocks.0.q.lora_C.weight") is None
