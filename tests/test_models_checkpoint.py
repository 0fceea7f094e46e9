"""Tiny checkpoints in the released layout: exact round trip, partial loading, and clear errors for broken folders."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from mova_train.checkpoint_io import CheckpointError, read_component_header, save_component
from mova_train.models import COMPONENTS, ConfigError, build_mova
from mova_train.models.checkpoint import load_mova, read_mova_config

W = "diffusion_pytorch_model"


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        video_latents=torch.randn(2, 16, 2, 4, 4, generator=g),
        video_cond=torch.randn(2, 20, 2, 4, 4, generator=g),
        audio_latents=torch.randn(2, 128, 5, generator=g),
        text=torch.randn(2, 6, 32, generator=g),
        timestep_video=torch.tensor([990.0, 120.0]),
    )


@pytest.fixture
def diffusion_copy(tiny_checkpoint, tmp_path):
    """A writable copy of the diffusion part of the session's tiny checkpoint."""
    dst = tmp_path / "ckpt"
    dst.mkdir()
    for name in (*COMPONENTS, "scheduler"):
        shutil.copytree(tiny_checkpoint / name, dst / name)
    shutil.copy(tiny_checkpoint / "model_index.json", dst / "model_index.json")
    return dst


def test_released_layout(tiny_checkpoint):
    for expert in ("video_dit", "video_dit_2"):
        files = sorted(p.name for p in (tiny_checkpoint / expert).iterdir())
        assert files == [
            "config.json",
            *(f"{W}-0000{i}-of-00003.safetensors" for i in (1, 2, 3)),
            f"{W}.safetensors.index.json",
        ]
        index = json.loads((tiny_checkpoint / expert / f"{W}.safetensors.index.json").read_text())
        assert set(index) == {"metadata", "weight_map"} and index["metadata"]["total_size"] > 0
    for name in ("audio_dit", "dual_tower_bridge"):
        assert sorted(p.name for p in (tiny_checkpoint / name).iterdir()) == [
            "config.json",
            f"{W}.safetensors",
        ]
    index = json.loads((tiny_checkpoint / "model_index.json").read_text())
    assert (
        index["_class_name"] == "MOVA" and index["boundary_ratio"] == 0.9 and index["audio_vae_type"] == "dac"
    )
    assert index["video_dit"][1] == index["video_dit_2"][1] == "WanModel"
    assert index["dual_tower_bridge"][1] == "DualTowerConditionalBridge"
    sched = json.loads((tiny_checkpoint / "scheduler" / "scheduler_config.json").read_text())
    assert sched["shift"] == 5.0 and sched["extra_one_step"] is True and sched["num_train_timesteps"] == 1000
    for sub in ("tokenizer", "text_encoder", "video_vae", "audio_vae"):
        assert (tiny_checkpoint / sub).is_dir(), sub
    # The released config field set, misspelling included.
    video = json.loads((tiny_checkpoint / "video_dit" / "config.json").read_text())
    assert video["_class_name"] == "WanModel" and "seperated_timestep" in video and video["in_dim"] == 36


def test_write_load_identical_tensors_and_outputs(tiny_checkpoint):
    reference = build_mova("tiny", device="cpu", seed=0)
    loaded = load_mova(tiny_checkpoint)
    assert loaded.components == COMPONENTS
    for c in COMPONENTS:
        a, b = getattr(reference, c).state_dict(), getattr(loaded, c).state_dict()
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
    x = _inputs()
    with torch.no_grad():
        for expert in ("video_dit", "video_dit_2"):
            ra, rb = reference(**x, expert=expert)
            la, lb = loaded(**x, expert=expert)
            assert torch.equal(ra, la) and torch.equal(rb, lb)


def test_load_one_component_and_dtype(tiny_checkpoint):
    only = load_mova(tiny_checkpoint, components=("video_dit_2",), dtype=torch.bfloat16)
    assert only.components == ("video_dit_2",)
    assert only.video_dit is None and only.audio_dit is None
    weights = [p for p in only.parameters()]
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in weights)
    full = load_mova(tiny_checkpoint, components=["video_dit_2"])
    assert torch.equal(
        only.video_dit_2.head.head.weight, full.video_dit_2.head.head.weight.to(torch.bfloat16)
    )
    with pytest.raises(ValueError, match="unknown component.*'video_vae'"):
        load_mova(tiny_checkpoint, components=("video_vae",))


def test_config_is_read_from_the_folder(tiny_checkpoint):
    cfg = read_mova_config(tiny_checkpoint)
    assert cfg.video_dit.dim == 96 and cfg.audio_dit.num_layers == 3 and cfg.boundary_timestep == 900.0


def test_missing_shard_names_the_file(diffusion_copy):
    (diffusion_copy / "video_dit" / f"{W}-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match=f"{W}-00002-of-00003.safetensors"):
        load_mova(diffusion_copy, components=("video_dit",))
    # Other components still load: nothing of video_dit is read for them.
    assert load_mova(diffusion_copy, components=("video_dit_2",)).video_dit_2 is not None


def test_truncated_file_names_the_file(diffusion_copy):
    path = diffusion_copy / "audio_dit" / f"{W}.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"audio_dit.*truncated"):
        load_mova(diffusion_copy, components=("audio_dit",))


def _rewrite(folder, edit):
    state = load_file(folder / f"{W}.safetensors")
    edit(state)
    save_component(folder, state, config=None, weights_name=W)


def test_wrong_shape_names_key_and_shapes(diffusion_copy):
    key = "audio_to_video_conditioners.1.inner.k.weight"
    _rewrite(diffusion_copy / "dual_tower_bridge", lambda s: s.__setitem__(key, torch.zeros(96, 32)))
    with pytest.raises(CheckpointError, match=rf"{key}.*\[96, 32\].*\[96, 64\]"):
        load_mova(diffusion_copy, components=("dual_tower_bridge",))


def test_missing_and_unexpected_keys_are_named(diffusion_copy):
    def edit(s):
        del s["blocks.2.ffn.0.bias"]
        s["blocks.2.img_emb.weight"] = torch.zeros(2)

    _rewrite(diffusion_copy / "audio_dit", edit)
    with pytest.raises(
        CheckpointError, match=r"(?s)missing.*blocks\.2\.ffn\.0\.bias.*unexpected.*blocks\.2\.img_emb"
    ):
        load_mova(diffusion_copy, components=("audio_dit",))


def test_missing_config_json_names_the_path(diffusion_copy):
    (diffusion_copy / "audio_dit" / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"audio_dit/config.json"):
        load_mova(diffusion_copy, components=("video_dit",))


def test_unknown_config_field_is_named(diffusion_copy):
    path = diffusion_copy / "dual_tower_bridge" / "config.json"
    cfg = json.loads(path.read_text())
    cfg["visual_layer"] = 4
    path.write_text(json.dumps(cfg))
    with pytest.raises(
        ConfigError, match=r"dual_tower_bridge/config.json.*unknown config field.*'visual_layer'"
    ):
        load_mova(diffusion_copy)


def test_unknown_component_in_model_index(diffusion_copy):
    path = diffusion_copy / "model_index.json"
    index = json.loads(path.read_text())
    index["video_dit_3"] = ["mova.diffusion.models.wan_video_dit", "WanModel"]
    path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model_index.json.*'video_dit_3'"):
        load_mova(diffusion_copy)


def test_experts_must_share_one_architecture(diffusion_copy):
    path = diffusion_copy / "video_dit_2" / "config.json"
    cfg = json.loads(path.read_text())
    cfg["ffn_dim"] = 64
    path.write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="video_dit_2/config.json differs"):
        load_mova(diffusion_copy)


def test_config_and_weights_disagree(diffusion_copy):
    """A config that builds a different architecture than the stored weights fails on the first key."""
    path = diffusion_copy / "audio_dit" / "config.json"
    cfg = json.loads(path.read_text())
    cfg["ffn_dim"] = 80
    path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"blocks\.0\.ffn\.0\.weight.*\[96, 64\].*\[80, 64\]"):
        load_mova(diffusion_copy, components=("audio_dit",))
    header = read_component_header(diffusion_copy / "audio_dit", weights_name=W)
    assert header["blocks.0.ffn.0.weight"][0] == (96, 64)
