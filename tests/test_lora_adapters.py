"""Canonical adapter files: round trip, determinism, validation errors, base identity."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from mova_train.checkpoint_io import CheckpointError
from mova_train.lora import (
    AdapterFormatError,
    LoraConfig,
    LoraError,
    apply_adapters,
    apply_lora,
    base_identity,
    load_adapters,
    lora_state_dict,
    randomize_lora,
    save_adapters,
)
from mova_train.lora.safetensors_io import encode_safetensors
from mova_train.models import build_mova, get_model_config

CFG = LoraConfig(rank=4, alpha=8.0, targets={"audio_dit": ["self_attn"], "dual_tower_bridge": ["bridge_v2a"]})
META = {"step": "12", "base_identity": "sha256:abc", "training_config": "name: test\n"}


@pytest.fixture(scope="module")
def trained():
    model = build_mova(get_model_config("tiny"), device="cpu", seed=0)
    apply_lora(model, CFG)
    randomize_lora(model, seed=4)
    return model


def test_round_trip_and_metadata(tmp_path, trained):
    targets = save_adapters(tmp_path / "a", trained, CFG, metadata=META)
    state, cfg, metadata = load_adapters(tmp_path / "a")
    assert cfg == CFG
    original = lora_state_dict(trained)
    assert state.keys() == original.keys() and all(torch.equal(state[k], original[k]) for k in state)
    assert {k: metadata[k] for k in META} == META
    assert metadata["rank"] == "4" and float(metadata["alpha"]) == 8.0
    assert json.loads(metadata["targets"]) == targets
    doc = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert doc["lora"]["rank"] == 4 and doc["targets"] == targets and doc["metadata"]["step"] == "12"
    # the .safetensors file alone is self-contained
    state2, cfg2, _ = load_adapters(tmp_path / "a" / "adapters.safetensors")
    assert cfg2 == CFG and state2.keys() == state.keys()


def test_files_are_deterministic_and_standard(tmp_path, trained):
    save_adapters(tmp_path / "a", trained, CFG, metadata=META)
    reordered = dict(reversed(list(META.items())))
    save_adapters(tmp_path / "b", trained, CFG, metadata=reordered)
    for name in ("adapters.safetensors", "adapter_config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    # our writer produces what the reference library reads, tensors and metadata alike
    tensors = {
        "x": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "b": torch.ones(3, dtype=torch.bfloat16),
    }
    path = tmp_path / "t.safetensors"
    path.write_bytes(encode_safetensors(tensors, {"k": "v", "a": "b"}))
    loaded = load_file(str(path))
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    assert (8 + header_len) % 8 == 0


def test_load_errors(tmp_path, trained):
    with pytest.raises(AdapterFormatError, match="does not exist"):
        load_adapters(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterFormatError, match="has no adapters.safetensors"):
        load_adapters(tmp_path / "empty")

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(AdapterFormatError, match="not an adapter written by mova-train"):
        load_adapters(foreign)

    save_adapters(tmp_path / "a", trained, CFG, metadata=META)
    state, _, metadata = load_adapters(tmp_path / "a")

    def rewrite(name, new_state, new_meta):
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(encode_safetensors(new_state, new_meta))
        return path

    lying = dict(metadata, lora_config=json.dumps({**json.loads(metadata["lora_config"]), "rank": 8}))
    with pytest.raises(AdapterFormatError, match="rank mismatch.*rank 8"):
        load_adapters(rewrite("rank", state, lying))

    key_b = next(k for k in state if k.endswith("lora_B.weight"))
    with pytest.raises(AdapterFormatError, match="has no lora_B.weight"):
        load_adapters(rewrite("nob", {k: v for k, v in state.items() if k != key_b}, metadata))

    bad = dict(state)
    bad[key_b] = torch.full_like(state[key_b], float("nan"))
    with pytest.raises(AdapterFormatError, match="non-finite"):
        load_adapters(rewrite("nan", bad, metadata))

    with pytest.raises(AdapterFormatError, match="'targets' disagrees"):
        load_adapters(rewrite("targets", state, dict(metadata, targets='{"audio_dit": []}')))

    with pytest.raises(AdapterFormatError, match="format_version"):
        load_adapters(rewrite("version", state, dict(metadata, format_version="99")))


def test_apply_adapters_checks_base_identity_and_shapes(tmp_path, trained):
    save_adapters(tmp_path / "a", trained, CFG, metadata=META)
    fresh = build_mova(get_model_config("tiny"), device="cpu", seed=0)
    with pytest.raises(AdapterFormatError, match="another base checkpoint.*sha256:abc.*sha256:other"):
        apply_adapters(fresh, tmp_path / "a", expected_base_identity="sha256:other")

    state, cfg, metadata = load_adapters(tmp_path / "a")
    key_a = next(k for k in state if k.endswith("lora_A.weight"))
    widened = dict(state)
    widened[key_a] = torch.zeros(4, state[key_a].shape[1] + 2)
    with pytest.raises(LoraError, match="another base"):
        apply_adapters(fresh, (widened, cfg, metadata), adapter_name="wide")

    unknown = {k.replace("blocks.0.", "blocks.99.", 1): v for k, v in state.items()}
    with pytest.raises(LoraError, match="does not exist in this model"):
        apply_adapters(fresh, (unknown, cfg, metadata), adapter_name="deep")


def test_base_identity(tmp_path, tiny_checkpoint):
    first = base_identity(tiny_checkpoint)
    assert first.startswith("sha256:") and first == base_identity(tiny_checkpoint)
    copy = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, copy)
    assert base_identity(copy) == first  # identity is about content, not location

    # changing a codec does not change the diffusion-base identity; changing a diffusion weight does
    for path in (copy / "text_encoder").glob("*.safetensors"):
        path.write_bytes(path.read_bytes()[:-4] + b"\0\0\0\0")
    assert base_identity(copy) == first
    weights = copy / "audio_dit" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(weights))
    name = sorted(tensors)[len(tensors) // 2]
    tensors[name] = tensors[name] + 1.0
    save_file(tensors, str(weights), metadata={"format": "pt"})
    assert base_identity(copy) != first

    shutil.rmtree(copy / "audio_dit")
    with pytest.raises(CheckpointError, match="audio_dit/config.json"):
        base_identity(copy)


def test_base_identity_samples_large_files(tmp_path, tiny_checkpoint, monkeypatch):
    import mova_train.identity as identity

    copy = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, copy)
    # Pretend every file is "large": only the header, every 4 KiB-th 512 bytes and the tail are read.
    monkeypatch.setattr(identity, "_FULL_HASH_MAX", 0)
    monkeypatch.setattr(identity, "_SAMPLE_STRIDE", 4096)
    monkeypatch.setattr(identity, "_SAMPLE_BYTES", 512)
    first = base_identity(copy)
    assert first == base_identity(tiny_checkpoint)
    weights = copy / "dual_tower_bridge" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # inside the sampled tail
    weights.write_bytes(bytes(data))
    assert base_identity(copy) != first
