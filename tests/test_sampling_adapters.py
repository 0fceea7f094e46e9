"""Sampling with LoRA adapters (`--lora DIR[:SCALE]`): scales, several adapters adding up, the merged pipeline
matching the live PEFT model, and clear errors for an adapter of another base or with a broken rank."""

from __future__ import annotations

import pytest
import torch

from mova_train import run_layout
from mova_train.checkpoint_io import read_safetensors_header
from mova_train.lora import (
    LoraConfig,
    apply_lora,
    base_identity,
    load_lora_state_dict,
    lora_state_dict,
    save_adapters,
)
from mova_train.models import load_mova
from mova_train.sampling import SamplingError, generate, load_pipeline

OPTIONS = dict(num_frames=5, height=32, width=32, steps=3, seed=2, cfg_scale=1.0, progress=False)
TARGETS = {
    "video_dit": ["self_attn"],
    "video_dit_2": ["ffn"],
    "audio_dit": ["text_cross_attn"],
    "dual_tower_bridge": ["bridge_a2v", "bridge_v2a"],
}


def _trained_like_model(checkpoint, seed: int):
    """The tiny model with a LoRA whose B matrices are non-zero (as after training)."""
    model = load_mova(checkpoint)
    cfg = LoraConfig(rank=4, alpha=8.0, targets=TARGETS)
    apply_lora(model, cfg)
    generator = torch.Generator().manual_seed(seed)
    state = {k: 0.2 * torch.randn(v.shape, generator=generator) for k, v in lora_state_dict(model).items()}
    load_lora_state_dict(model, state)
    return model, cfg


@pytest.fixture(scope="module")
def adapter_dir(tiny_checkpoint, tmp_path_factory):
    torch.set_num_threads(1)
    model, cfg = _trained_like_model(tiny_checkpoint, seed=0)
    out = tmp_path_factory.mktemp("adapter") / "adapter"
    save_adapters(
        out,
        model,
        cfg,
        metadata={"step": "7", "base_identity": base_identity(tiny_checkpoint), "training_config": "{}"},
    )
    return out


@pytest.fixture(scope="module")
def codecs(tiny_checkpoint):
    from mova_train.codecs import load_codecs

    return load_codecs(tiny_checkpoint)


def _latents(pipeline):
    (render,) = generate(pipeline, None, ["rain on a tin roof"], image=None, **OPTIONS)
    return render.video_latents, render.audio_latents


def test_scales_zero_one_and_two_halves(tiny_checkpoint, adapter_dir, codecs):
    base = _latents(load_pipeline(tiny_checkpoint, codecs=codecs))
    off = _latents(load_pipeline(tiny_checkpoint, loras=[f"{adapter_dir}:0"], codecs=codecs))
    full = _latents(load_pipeline(tiny_checkpoint, loras=[str(adapter_dir)], codecs=codecs))
    halves = _latents(
        load_pipeline(tiny_checkpoint, loras=[f"{adapter_dir}:0.5", f"{adapter_dir}:0.5"], codecs=codecs)
    )
    assert torch.equal(base[0], off[0]) and torch.equal(base[1], off[1])  # scale 0 is the base model
    assert not torch.allclose(base[0], full[0], atol=1e-3)  # the adapter does something
    # W + 0.5·ΔW + 0.5·ΔW = W + ΔW: several adapters add up
    torch.testing.assert_close(halves[0], full[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(halves[1], full[1], rtol=1e-4, atol=1e-4)


def test_merged_adapter_pipeline_matches_the_live_peft_model(tiny_checkpoint, adapter_dir):
    from mova_train.codecs import load_codecs

    live, _ = _trained_like_model(tiny_checkpoint, seed=0)  # the same adapter weights, not merged
    (render_live,) = generate(
        live, load_codecs(tiny_checkpoint), ["rain on a tin roof"], image=None, **OPTIONS
    )
    merged = _latents(load_pipeline(tiny_checkpoint, loras=[str(adapter_dir)]))
    torch.testing.assert_close(merged[0], render_live.video_latents, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(merged[1], render_live.audio_latents, rtol=1e-4, atol=1e-4)


def test_training_checkpoint_folder_is_accepted(tiny_checkpoint, adapter_dir, tmp_path, codecs):
    step = run_layout.checkpoints_dir(tmp_path / "run") / run_layout.checkpoint_name(7)
    step.mkdir(parents=True)
    (step / "adapter").symlink_to(adapter_dir, target_is_directory=True)
    (step / run_layout.STATE_FILE).write_text('{"version": 1, "step": 7}')  # what marks a checkpoint complete
    for path in (step, tmp_path / "run"):
        pipeline = load_pipeline(tiny_checkpoint, loras=[f"{path}:0.7"], codecs=codecs)
        assert pipeline.adapters[0].path == str(step / "adapter") and pipeline.adapters[0].scale == 0.7


def test_adapter_for_another_base_is_refused(tiny_checkpoint, adapter_dir, tmp_path):
    model, cfg = _trained_like_model(tiny_checkpoint, seed=1)
    other = tmp_path / "other"
    save_adapters(other, model, cfg, metadata={"step": "1", "base_identity": "sha256:" + "0" * 64})
    with pytest.raises(SamplingError, match="another base"):
        load_pipeline(tiny_checkpoint, loras=[str(other)])


def test_adapter_with_a_broken_rank_is_refused(tiny_checkpoint, adapter_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    source = adapter_dir / "adapters.safetensors"
    metadata = read_safetensors_header(source).entries["__metadata__"]  # keep the metadata, change one rank
    state = load_file(source)
    key = next(k for k in state if k.endswith("lora_A.weight"))
    state[key] = state[key][:2].contiguous()
    save_file(state, broken / "adapters.safetensors", metadata=metadata)
    with pytest.raises(SamplingError, match="rank"):
        load_pipeline(tiny_checkpoint, loras=[str(broken)])
