"""Wan video VAE wrapper: time/space axes, normalisation, causal chunking, tiling, I2V conditioning, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from mova_train.codecs import CodecInputError, build_i2v_condition, load_codecs
from mova_train.codecs.errors import CodecConfigError
from mova_train.codecs.tiny import write_tiny_codecs
from mova_train.codecs.video_vae import video_vae_constructor_kwargs


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_codecs")
    write_tiny_codecs(out, seed=5)
    return out


@pytest.fixture(scope="module")
def vae(tiny_dir):
    return load_codecs(tiny_dir, components=("video_vae",)).video_vae


@pytest.fixture()
def untiled(vae):
    vae.disable_tiling()
    yield vae
    vae.disable_tiling()


def _video(b, n, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, n, h, w, generator=g) * 2 - 1


def _normalisation(tiny_dir):
    config = json.loads((tiny_dir / "video_vae" / "config.json").read_text())
    mean = torch.tensor(config["latents_mean"]).view(1, -1, 1, 1, 1)
    std = torch.tensor(config["latents_std"]).view(1, -1, 1, 1, 1)
    return mean, std


def test_193_frames_give_49_latent_frames_and_back(untiled):
    video = _video(1, 193, 16, 32)
    latents = untiled.encode(video)
    assert latents.shape == (1, 16, 49, 2, 4) and latents.dtype == torch.float32
    decoded = untiled.decode(latents)
    assert decoded.shape == video.shape
    assert float(decoded.abs().max()) <= 1.0


def test_latents_are_normalised_posterior_mode(untiled, tiny_dir):
    """Independent path: diffusers' own encode/decode with the config's mean/std applied by hand."""
    mean, std = _normalisation(tiny_dir)
    video = _video(1, 5, 32, 32)
    with torch.no_grad():
        expected = (untiled.module.encode(video).latent_dist.mean - mean) / std
    latents = untiled.encode(video)
    torch.testing.assert_close(latents, expected, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        expected_pixels = untiled.module.decode(latents * std + mean).sample
    torch.testing.assert_close(untiled.decode(latents), expected_pixels, rtol=1e-6, atol=1e-6)


def test_deterministic_and_batch_independent(untiled):
    video = _video(2, 9, 32, 16, seed=1)
    a = untiled.encode(video)
    assert torch.equal(a, untiled.encode(video.clone()))
    assert torch.equal(a[1:], untiled.encode(video[1:]))


def test_causal_chunked_encoding(untiled):
    """The VAE streams 1 + 4k frames through a causal cache: latent frames 0..k depend only on pixel frames
    0..4k, so a clip's prefix encodes to the prefix of its latents. This is what bounds memory on long clips."""
    video = _video(1, 13, 16, 16, seed=2)
    full = untiled.encode(video)
    torch.testing.assert_close(untiled.encode(video[:, :, :5]), full[:, :, :2], rtol=1e-6, atol=1e-6)
    changed = video.clone()
    changed[:, :, 9:] = 0.0
    torch.testing.assert_close(untiled.encode(changed)[:, :, :3], full[:, :, :3], rtol=1e-6, atol=1e-6)


def test_spatial_tiling_encode_and_decode(vae):
    """With tiles of 32 px every 16 px, the top-left 16x16 px of the result come from the first tile alone, so
    they equal the untiled encoding of the 32x32 crop; the untiled encoding of the whole frame differs there."""
    video = _video(1, 5, 64, 64, seed=3)
    vae.disable_tiling()
    crop = vae.encode(video[..., :32, :32])
    whole = vae.encode(video)
    vae.enable_tiling(tile_sample_min_size=32, tile_sample_stride=16)
    try:
        assert vae.tiling
        tiled = vae.encode(video)
        assert tiled.shape == whole.shape
        torch.testing.assert_close(tiled[..., :2, :2], crop[..., :2, :2], rtol=1e-6, atol=1e-6)
        assert not torch.allclose(whole[..., :2, :2], crop[..., :2, :2], atol=1e-4)

        decoded = vae.decode(whole)
        assert decoded.shape == video.shape
        vae.disable_tiling()
        first_tile = vae.decode(whole[..., :4, :4])
        torch.testing.assert_close(decoded[..., :16, :16], first_tile[..., :16, :16], rtol=1e-5, atol=1e-5)
    finally:
        vae.disable_tiling()
    with pytest.raises(CodecInputError, match="multiples of 8"):
        vae.enable_tiling(tile_sample_min_size=30, tile_sample_stride=16)


def test_condition_is_image_then_grey_frames(untiled):
    video = _video(2, 9, 16, 16, seed=4)
    image = video[:, :, 0]
    manual = torch.zeros_like(video)
    manual[:, :, 0] = image
    cond = untiled.encode_condition(image, num_frames=9)
    assert cond.shape == (2, 16, 3, 2, 2)
    assert torch.equal(cond, untiled.encode(manual))
    # Frames after the first are encodings of grey following the image, not zeros.
    assert float(cond[:, :, 1:].abs().max()) > 0


def test_i2v_condition_layout_matches_reference_mask():
    t, n = 3, 9
    cond = torch.randn(2, 16, t, 4, 6)
    y = build_i2v_condition(cond)
    assert y.shape == (2, 20, t, 4, 6)
    assert torch.equal(y[:, 4:], cond)
    # The diffusers-Wan construction of spec §8: pixel mask, first entry repeated 4x, reshaped (T, 4), transposed.
    pixel = torch.zeros(n)
    pixel[0] = 1
    folded = torch.cat([pixel[:1].repeat(4), pixel[1:]]).view(t, 4).transpose(0, 1)  # [4, T]
    expected = folded.view(1, 4, t, 1, 1).expand(2, 4, t, 4, 6)
    assert torch.equal(y[:, :4], expected)


@pytest.mark.parametrize(
    "shape, match",
    [
        ((1, 4, 5, 16, 16), "3 channels"),
        ((1, 3, 5, 40, 16), "multiples of 16"),
        ((1, 3, 5, 16, 36), "multiples of 16"),
        ((1, 3, 8, 16, 16), "1 \\+ 4k"),
        ((3, 5, 16, 16), "5 dims"),
        ((1, 3, 0, 16, 16), "empty"),
    ],
)
def test_bad_video_shapes_are_refused(untiled, shape, match):
    with pytest.raises(CodecInputError, match=match):
        untiled.encode(torch.zeros(shape))


def test_bad_video_values_are_refused(untiled):
    video = _video(1, 5, 16, 16)
    video[0, 0, 2, 3, 3] = float("nan")
    with pytest.raises(CodecInputError, match="NaN"):
        untiled.encode(video)
    with pytest.raises(CodecInputError, match=r"\[-1, 1\]"):
        untiled.encode(_video(1, 5, 16, 16) * 127.5 + 127.5)
    with pytest.raises(CodecInputError, match="16 channels"):
        untiled.decode(torch.zeros(1, 8, 2, 2, 2))
    with pytest.raises(CodecInputError, match="3 channels"):
        untiled.encode_condition(torch.zeros(1, 1, 16, 16), num_frames=5)
    with pytest.raises(CodecInputError, match="1 \\+ 4k"):
        untiled.encode_condition(torch.zeros(1, 3, 16, 16), num_frames=10)


def test_config_validation(tiny_dir):
    config = json.loads((tiny_dir / "video_vae" / "config.json").read_text())
    video_vae_constructor_kwargs(config)
    with pytest.raises(CodecConfigError, match="latents_std"):
        video_vae_constructor_kwargs({k: v for k, v in config.items() if k != "latents_std"})
    with pytest.raises(CodecConfigError, match="latents_mean"):
        video_vae_constructor_kwargs({**config, "latents_mean": config["latents_mean"][:8]})
    with pytest.raises(CodecConfigError, match="positive"):
        video_vae_constructor_kwargs({**config, "latents_std": [0.0] * 16})
    with pytest.raises(CodecConfigError, match="scale_factor_temporal"):
        video_vae_constructor_kwargs({**config, "scale_factor_temporal": 8})
