"""Sampler inputs and step plan that need no model: sizes, reference image, prompt files, --lora specs, routing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mova_train.models import FlowMatchScheduler
from mova_train.sampling import (
    SamplingError,
    check_sample_shape,
    load_prompts_file,
    parse_lora_spec,
    plan_steps,
)
from mova_train.sampling.inputs import load_reference_image, parse_size


def _spec_timesteps(n: int, shift: float = 5.0) -> list[float]:
    """Spec §12 written out independently: linspace(1, σ_min, n+1) minus the last point, shifted, times 1000."""
    sigma_min = 0.003 / 1.002
    s = np.linspace(1.0, sigma_min, n + 1)[:-1]
    return list(1000.0 * shift * s / (1 + (shift - 1) * s))


@pytest.mark.parametrize(("steps", "high", "low"), [(50, 18, 32), (25, 9, 16)])
def test_expert_routing_matches_the_spec_counts(steps, high, low):
    plan = plan_steps(FlowMatchScheduler(), steps, boundary=900.0)
    experts = [s.expert for s in plan]
    assert experts == ["video_dit"] * high + ["video_dit_2"] * low  # one switch, never back
    expected = _spec_timesteps(steps)
    assert [s.t for s in plan] == pytest.approx(expected, abs=1e-3)
    assert [s.t_next for s in plan[:-1]] == pytest.approx(expected[1:], abs=1e-3)
    assert plan[-1].t_next is None  # the last step jumps to sigma 0


def test_fifty_step_table_values_from_the_spec():
    plan = plan_steps(FlowMatchScheduler(), 50, boundary=900.0)
    # spec §7: high-noise steps run t = 1000 ... 906.98, low-noise t = 899.30 ... 105.04
    assert plan[0].t == pytest.approx(1000.0, abs=0.01)
    assert plan[17].t == pytest.approx(906.98, abs=0.01)
    assert plan[18].t == pytest.approx(899.30, abs=0.01)
    assert plan[-1].t == pytest.approx(105.04, abs=0.01)


def test_sample_shape_derives_latent_and_audio_sizes():
    shape = check_sample_shape(193, 352, 640, 24.0)
    # spec §14: [16, 49, 44, 80] video latent, 386,000 samples, 403 audio latent frames
    assert (shape.latent_frames, shape.latent_height, shape.latent_width) == (49, 44, 80)
    assert shape.num_audio_samples == 386_000 and shape.audio_latent_len == 403


@pytest.mark.parametrize(
    ("frames", "height", "width", "fps", "match"),
    [
        (18, 32, 32, 24.0, "1 mod 4"),
        (0, 32, 32, 24.0, "num_frames"),
        (17, 40, 32, 24.0, "height must be a multiple of 16"),
        (17, 32, 360, 24.0, "width must be a multiple of 16"),
        (17, 32, 32, 0.0, "fps"),
    ],
)
def test_bad_sizes_are_refused_with_the_field_named(frames, height, width, fps, match):
    with pytest.raises(SamplingError, match=match):
        check_sample_shape(frames, height, width, fps)


def test_parse_size_and_lora_spec():
    assert parse_size("352x640") == (352, 640)
    with pytest.raises(SamplingError, match="HEIGHTxWIDTH"):
        parse_size("352")
    assert parse_lora_spec("runs/a/adapter").scale == 1.0
    spec = parse_lora_spec("runs/a/adapter:0.5")
    assert (spec.path, spec.scale) == ("runs/a/adapter", 0.5)
    assert parse_lora_spec("C:weird").path == "C:weird"  # a non-numeric suffix is part of the path
    with pytest.raises(SamplingError, match="finite"):
        parse_lora_spec("x:inf")


def test_reference_image_is_centre_cropped_and_resized(tmp_path):
    # a 2:1 picture: red | green | green | blue quarters; a square target keeps only the green centre
    array = np.zeros((32, 64, 3), np.uint8)
    array[:, :16] = (255, 0, 0)
    array[:, 16:48] = (0, 255, 0)
    array[:, 48:] = (0, 0, 255)
    path = tmp_path / "ref.png"
    Image.fromarray(array).save(path)
    image = load_reference_image(path, 16, 16)
    assert image.shape == (1, 3, 16, 16)
    assert float(image.min()) >= -1.0 and float(image.max()) <= 1.0
    green = torch.tensor([-1.0, 1.0, -1.0]).view(1, 3, 1, 1)
    assert torch.allclose(image, green.expand_as(image), atol=0.05)


def test_missing_or_unreadable_image_is_a_clear_error(tmp_path):
    with pytest.raises(SamplingError, match="not found"):
        load_reference_image(tmp_path / "nope.png", 32, 32)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG but not really")
    with pytest.raises(SamplingError, match="cannot read reference image"):
        load_reference_image(bad, 32, 32)


def test_prompt_files(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("# comment\na dog barks\n\na bell rings\n", encoding="utf-8")
    assert [i.prompt for i in load_prompts_file(txt)] == ["a dog barks", "a bell rings"]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(
        json.dumps({"prompt": "a cat", "image": "ref.png", "seed": 7}) + "\n" + json.dumps("plain") + "\n",
        encoding="utf-8",
    )
    items = load_prompts_file(jsonl)
    assert items[0].image == str(tmp_path / "ref.png") and items[0].seed == 7
    assert items[1].prompt == "plain" and items[1].image is None
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "imgae": "typo.png"}) + "\n", encoding="utf-8")
    with pytest.raises(SamplingError, match="imgae"):
        load_prompts_file(bad)
    with pytest.raises(SamplingError, match="not found"):
        load_prompts_file(tmp_path / "missing.txt")
