"""load_codecs and the tiny writer: released layout, subsets, constants, strict loading, codec identity."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from mova_train.checkpoint_io import CheckpointError, load_component_state, read_json, save_component
from mova_train.codecs import CodecConfigError, codec_identity, load_codecs
from mova_train.codecs.tiny import write_tiny_codecs
from mova_train.names import CODEC_COMPONENTS


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_codecs")
    write_tiny_codecs(out, seed=11)
    return out


@pytest.fixture()
def copy_dir(tiny_dir, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_dir, dst)
    return dst


def test_release_file_layout(tiny_dir):
    names = {p.relative_to(tiny_dir).as_posix() for p in tiny_dir.rglob("*") if p.is_file()}
    assert {
        "video_vae/config.json",
        "video_vae/diffusion_pytorch_model.safetensors",
        "audio_vae/config.json",
        "audio_vae/diffusion_pytorch_model.safetensors",
        "text_encoder/config.json",
        "text_encoder/model-00001-of-00003.safetensors",
        "text_encoder/model-00002-of-00003.safetensors",
        "text_encoder/model-00003-of-00003.safetensors",
        "text_encoder/model.safetensors.index.json",
        "tokenizer/tokenizer.json",
    } <= names
    assert not [n for n in names if n.rsplit("/", 1)[-1].startswith(".")]  # no temp files left behind
    classes = {c: read_json(tiny_dir / c / "config.json")["_class_name"] for c in CODEC_COMPONENTS}
    assert classes == {
        "video_vae": "AutoencoderKLWan",
        "audio_vae": "DAC",
        "text_encoder": "UMT5EncoderModel",
    }
    total = sum((tiny_dir / n).stat().st_size for n in names)
    assert total < 10 << 20  # "a few MB"


def test_load_all_and_constants(tiny_dir):
    codecs = load_codecs(tiny_dir)
    assert codecs.components == CODEC_COMPONENTS
    assert (codecs.sample_rate, codecs.audio_hop, codecs.audio_latent_dim) == (48000, 960, 128)
    assert (codecs.video_temporal_stride, codecs.video_spatial_stride) == (4, 8)
    assert (codecs.text_dim, codecs.text_len) == (32, 512)
    for codec in (codecs.video_vae, codecs.audio_vae, codecs.text_encoder):
        assert not any(p.requires_grad for p in codec.module.parameters())
        assert not any(p.is_meta for p in codec.module.parameters())
    assert len(codecs.identity) == 64 and codecs.identity == codec_identity(tiny_dir)


def test_subset_and_dtype(tiny_dir):
    codecs = load_codecs(tiny_dir, components=("video_vae", "text_encoder"), dtype=torch.bfloat16)
    assert codecs.audio_vae is None
    assert codecs.video_vae.dtype == torch.bfloat16 and codecs.text_encoder.dtype == torch.bfloat16
    with pytest.raises(CodecConfigError, match="audio_vae"):
        _ = codecs.sample_rate
    latents = codecs.video_vae.encode(torch.zeros(1, 3, 5, 16, 16))
    assert latents.dtype == torch.float32  # outputs are float32 whatever the compute dtype
    audio = load_codecs(tiny_dir, components=("audio_vae",), dtype=torch.bfloat16).audio_vae
    assert audio.dtype == torch.float32  # the DAC runs in fp32 unless asked otherwise
    assert codecs.identity != codec_identity(tiny_dir)  # identity names the components it covers


def test_bad_arguments(tiny_dir, tmp_path):
    with pytest.raises(CodecConfigError, match="subset"):
        load_codecs(tiny_dir, components=("vae",))
    with pytest.raises(CheckpointError, match="not found"):
        load_codecs(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="video_vae"):
        load_codecs(tmp_path, components=("video_vae",))


def test_model_index_audio_type_is_checked(copy_dir):
    (copy_dir / "model_index.json").write_text(
        json.dumps({"_class_name": "MOVA", "audio_vae_type": "oobleck"})
    )
    with pytest.raises(CodecConfigError, match="oobleck"):
        load_codecs(copy_dir, components=("audio_vae",))


def _edit_weights(folder, weights_name, edit, num_shards=1):
    state = load_component_state(folder, weights_name=weights_name)
    config = read_json(folder / "config.json")
    for p in folder.glob("*.safetensors*"):
        p.unlink()
    save_component(folder, edit(state), config=config, weights_name=weights_name, num_shards=num_shards)


@pytest.mark.parametrize(
    "component, weights_name, num_shards",
    [("video_vae", "diffusion_pytorch_model", 1), ("text_encoder", "model", 3)],
)
def test_strict_loading(copy_dir, component, weights_name, num_shards):
    folder = copy_dir / component
    key = sorted(load_component_state(folder, weights_name=weights_name))[-1]

    _edit_weights(folder, weights_name, lambda s: {k: v for k, v in s.items() if k != key}, num_shards)
    with pytest.raises(CheckpointError, match=f"missing.*{key}"):
        load_codecs(copy_dir, components=(component,))

    _edit_weights(
        folder, weights_name, lambda s: {**s, key: torch.zeros(1), "extra.weight": torch.zeros(2)}, 3
    )
    with pytest.raises(CheckpointError, match=r"(?s)unexpected.*extra\.weight.*shape mismatch for " + key):
        load_codecs(copy_dir, components=(component,))


def test_identity_is_stable(tiny_dir, copy_dir, tmp_path):
    before = codec_identity(tiny_dir)
    assert codec_identity(copy_dir) == before
    # Same seed -> same files -> same identity; another seed -> another identity.
    write_tiny_codecs(tmp_path / "again", seed=11)
    assert codec_identity(tmp_path / "again") == before
    write_tiny_codecs(tmp_path / "other", seed=12)
    assert codec_identity(tmp_path / "other") != before
    # Re-sharding the same tensors and changing provenance fields do not change what the codecs compute.
    _edit_weights(copy_dir / "video_vae", "diffusion_pytorch_model", lambda s: s, num_shards=2)
    config = read_json(copy_dir / "text_encoder" / "config.json")
    (copy_dir / "text_encoder" / "config.json").write_text(
        json.dumps({**config, "transformers_version": "0.0"})
    )
    assert codec_identity(copy_dir) == before


@pytest.mark.parametrize("component", CODEC_COMPONENTS)
def test_identity_changes_with_any_weight(copy_dir, component):
    before = codec_identity(copy_dir)
    weights_name = "model" if component == "text_encoder" else "diffusion_pytorch_model"
    folder = copy_dir / component
    key = sorted(load_component_state(folder, weights_name=weights_name))[0]

    def nudge(state):
        t = state[key].clone()
        t.view(-1)[0] = torch.nextafter(t.view(-1)[0], torch.tensor(float("inf")))  # one ulp, one element
        return {**state, key: t}

    _edit_weights(folder, weights_name, nudge, num_shards=3 if component == "text_encoder" else 1)
    assert codec_identity(copy_dir) != before


def test_identity_changes_with_config_and_tokenizer(copy_dir):
    before = codec_identity(copy_dir)
    path = copy_dir / "video_vae" / "config.json"
    original = path.read_text()
    config = json.loads(original)
    config["latents_std"][0] += 1e-4
    path.write_text(json.dumps(config))
    assert codec_identity(copy_dir) != before
    path.write_text(original)
    assert codec_identity(copy_dir) == before
    tokenizer_json = copy_dir / "tokenizer" / "tokenizer.json"
    tokenizer_json.write_text(tokenizer_json.read_text().replace("▁dog", "▁dug"))
    assert codec_identity(copy_dir) != before


def test_identity_refuses_truncated_files(copy_dir):
    path = copy_dir / "audio_vae" / "diffusion_pytorch_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated"):
        codec_identity(copy_dir)
