"""DAC-VAE: numerics against independent computations, time axes, padding, both weight layouts, strict loading."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from mova_train.checkpoint_io import CheckpointError, read_json, save_component
from mova_train.codecs import CodecInputError, load_codecs
from mova_train.codecs.dac import (
    DacConfig,
    ResidualUnit,
    Snake1d,
    fuse_weight_norm,
    load_dac,
)
from mova_train.codecs.errors import CodecConfigError
from mova_train.codecs.tiny import write_tiny_codecs
from mova_train.names import WEIGHTS_NAME


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_codecs")
    write_tiny_codecs(out, seed=3)
    return out


@pytest.fixture(scope="module")
def audio_vae(tiny_dir):
    return load_codecs(tiny_dir, components=("audio_vae",)).audio_vae


def test_snake_matches_formula():
    torch.manual_seed(0)
    snake = Snake1d(3)
    with torch.no_grad():
        snake.alpha.copy_(torch.tensor([0.5, 1.0, 2.5]).view(1, 3, 1))
    x = torch.randn(2, 3, 7, dtype=torch.float64)
    with torch.no_grad():
        y = snake.double()(x)
    for c, a in enumerate([0.5, 1.0, 2.5]):
        for b in range(2):
            for t in range(7):
                v = float(x[b, c, t])
                expected = v + math.sin(a * v) ** 2 / (a + 1e-9)
                assert abs(float(y[b, c, t]) - expected) < 1e-12


def test_weight_norm_fusion_equals_torch_weight_norm():
    torch.manual_seed(0)
    conv = torch.nn.Conv1d(4, 6, kernel_size=5)
    convt = torch.nn.ConvTranspose1d(6, 3, kernel_size=4, stride=2)
    state = {}
    for name, m in (("conv", conv), ("convt", convt)):
        wn = torch.nn.utils.parametrizations.weight_norm(m, dim=0)
        g = wn.parametrizations.weight.original0.detach().clone()
        v = wn.parametrizations.weight.original1.detach().clone()
        with torch.no_grad():
            g.mul_(torch.rand_like(g) + 0.5)  # g no longer equals ||v||: the fusion must use both
            wn.parametrizations.weight.original0.copy_(g)
        assert g.shape == (v.shape[0], 1, 1)  # dim0 is in_channels for the transposed conv
        state[f"{name}.weight_g"], state[f"{name}.weight_v"] = g, v
        state[f"{name}.bias"] = m.bias.detach()
        state[f"expected.{name}"] = wn.weight.detach().clone()
    fused = fuse_weight_norm({k: v for k, v in state.items() if not k.startswith("expected")})
    assert set(fused) == {"conv.weight", "conv.bias", "convt.weight", "convt.bias"}
    torch.testing.assert_close(fused["conv.weight"], state["expected.conv"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(fused["convt.weight"], state["expected.convt"], rtol=1e-6, atol=1e-7)


def test_weight_norm_fusion_refuses_unpaired_keys():
    with pytest.raises(CheckpointError, match="weight_v"):
        fuse_weight_norm({"a.weight_g": torch.ones(2, 1, 1)})
    with pytest.raises(CheckpointError, match="weight_g"):
        fuse_weight_norm({"a.weight_v": torch.ones(2, 3, 1)})


def test_residual_unit_by_hand():
    torch.manual_seed(0)
    unit = ResidualUnit(3, dilation=3).double()
    with torch.no_grad():
        for p in unit.parameters():
            p.copy_(torch.randn_like(p) * 0.5 + (1.0 if p.shape == (1, 3, 1) else 0.0))
    x = torch.randn(2, 3, 40, dtype=torch.float64)
    snake0, conv7, snake1, conv1 = unit.block

    def snake(t, alpha):
        return t + (alpha + 1e-9).reciprocal() * torch.sin(alpha * t) ** 2

    h = snake(x, snake0.alpha)
    h = F.conv1d(F.pad(h, (9, 9)), conv7.weight, conv7.bias, dilation=3)  # pad 3*dilation keeps the length
    h = snake(h, snake1.alpha)
    h = F.conv1d(h, conv1.weight, conv1.bias)
    torch.testing.assert_close(unit(x), x + h)


def test_time_axes_and_padding(audio_vae):
    assert audio_vae.sample_rate == 48000 and audio_vae.hop_length == 960
    torch.manual_seed(0)
    wave = torch.rand(1, 1, 386_000) * 1.8 - 0.9
    latents, pad = audio_vae.encode(wave)
    assert latents.shape == (1, 128, 403) and latents.dtype == torch.float32
    assert pad == 403 * 960 - 386_000 == 880
    out = audio_vae.decode(latents)
    assert out.shape == (1, 1, 403 * 960)
    assert float(out.abs().max()) <= 1.0  # tanh output
    # Right-padding is zeros: encoding the explicitly zero-padded wave gives the same latents and no padding.
    padded = F.pad(wave, (0, pad))
    latents2, pad2 = audio_vae.encode(padded)
    assert pad2 == 0
    assert torch.equal(latents, latents2)


def test_exact_multiple_needs_no_padding_and_is_deterministic(audio_vae):
    wave = torch.linspace(-0.5, 0.5, 2 * 960 * 5).view(2, 1, -1)
    a, pad = audio_vae.encode(wave)
    b, _ = audio_vae.encode(wave.clone())
    assert pad == 0 and a.shape == (2, 128, 5)
    assert torch.equal(a, b)
    # Each clip is encoded alone: its latents do not depend on the rest of the batch.
    single, _ = audio_vae.encode(wave[1:])
    assert torch.equal(single, a[1:])


def test_latent_is_posterior_mean_without_scaling(audio_vae):
    m = audio_vae.module
    wave = torch.sin(torch.arange(960 * 3, dtype=torch.float32) / 7.0).view(1, 1, -1) * 0.5
    latents, _ = audio_vae.encode(wave)
    moments = F.conv1d(m.encoder(wave), m.quant_conv.weight, m.quant_conv.bias)
    torch.testing.assert_close(latents, moments[:, :128], rtol=0, atol=0)


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.zeros(1, 1, 0), "empty"),
        (torch.zeros(1, 2, 960), "mono"),
        (torch.zeros(1, 960), "3 dims"),
        (torch.full((1, 1, 960), float("nan")), "NaN"),
        (torch.full((1, 1, 960), 3000.0), r"\[-1, 1\]"),
        (torch.zeros(1, 1, 960, dtype=torch.int16), "floating"),
    ],
)
def test_bad_audio_is_refused(audio_vae, bad, match):
    with pytest.raises(CodecInputError, match=match):
        audio_vae.encode(bad)


def test_bad_latents_are_refused(audio_vae):
    with pytest.raises(CodecInputError, match="128"):
        audio_vae.decode(torch.zeros(1, 64, 4))


def _weight_norm_state(fused: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Split every encoder/decoder conv weight into (g, v) with v = 2·w (so v is not w) and g = ‖w‖."""
    out = {}
    for k, w in fused.items():
        if k.endswith(".weight") and k.startswith(("encoder.", "decoder.")) and w.ndim == 3:
            stem = k[: -len("weight")]
            out[stem + "weight_v"] = 2.0 * w
            out[stem + "weight_g"] = w.flatten(1).norm(dim=1).view(-1, 1, 1)
        else:
            out[k] = w
    return out


def test_weight_norm_layout_loads_to_the_same_codec(tiny_dir, tmp_path, audio_vae):
    src = tiny_dir / "audio_vae"
    fused = load_file(str(src / f"{WEIGHTS_NAME}.safetensors"))
    config = {**read_json(src / "config.json"), "use_weight_norm": True}
    save_component(
        tmp_path / "audio_vae", _weight_norm_state(fused), config=config, weights_name=WEIGHTS_NAME
    )
    reloaded = load_dac(tmp_path / "audio_vae")
    for k, v in audio_vae.module.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[k], v, rtol=1e-6, atol=1e-7, msg=k)


def test_strict_loading_errors(tiny_dir, tmp_path):
    src = tiny_dir / "audio_vae"
    fused = load_file(str(src / f"{WEIGHTS_NAME}.safetensors"))
    config = read_json(src / "config.json")

    def write(state, name):
        save_component(tmp_path / name, state, config=config, weights_name=WEIGHTS_NAME)
        return tmp_path / name

    missing = dict(fused)
    del missing["quant_conv.bias"]
    with pytest.raises(CheckpointError, match="missing.*quant_conv.bias"):
        load_dac(write(missing, "missing"))
    extra = {**fused, "decoder.model.8.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match="unexpected.*decoder.model.8.weight"):
        load_dac(write(extra, "extra"))
    misshaped = {**fused, "post_quant_conv.weight": torch.zeros(128, 128, 3)}
    with pytest.raises(CheckpointError, match=r"post_quant_conv.weight.*\[128, 128, 3\].*\[128, 128, 1\]"):
        load_dac(write(misshaped, "misshaped"))
    wn = _weight_norm_state(fused)
    del wn["encoder.block.0.weight_g"]
    with pytest.raises(CheckpointError, match="encoder.block.0.weight_g"):
        load_dac(write(wn, "wn_missing"))


def test_config_validation(tiny_dir, tmp_path):
    base = read_json(tiny_dir / "audio_vae" / "config.json")
    with pytest.raises(CodecConfigError, match="encoder_rates"):
        DacConfig.from_dict({k: v for k, v in base.items() if k != "encoder_rates"})
    with pytest.raises(CodecConfigError, match="continuous"):
        DacConfig.from_dict({**base, "continuous": False})
    with pytest.raises(CodecConfigError, match="do not invert"):
        DacConfig.from_dict({**base, "decoder_rates": [8, 5, 4, 3, 3]})
    shutil.copytree(tiny_dir / "audio_vae", tmp_path / "audio_vae")
    (tmp_path / "audio_vae" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        load_dac(tmp_path / "audio_vae")
