"""The sampler on the tiny checkpoint: spec §13 loop against an independent re-implementation, CFG, RNG order,
expert routing, offloading, and the global RNG left alone."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mova_train.sampling import generate, load_pipeline
from mova_train.sampling.inputs import DEFAULT_NEGATIVE_PROMPT

N, H, W, FPS = 9, 32, 32, 24.0


@pytest.fixture(scope="module")
def pipeline(tiny_checkpoint):
    torch.set_num_threads(1)
    return load_pipeline(tiny_checkpoint)


def _reference_image() -> torch.Tensor:
    # a smooth colour ramp in [-1, 1], [1, 3, H, W]
    ramp = torch.linspace(-0.8, 0.8, W)
    return torch.stack([ramp.expand(H, W), ramp.flip(0).expand(H, W), torch.zeros(H, W)])[None]


def _spec_sigmas(steps: int, shift: float = 5.0) -> list[float]:
    sigma_min = 0.003 / 1.002
    s = np.linspace(1.0, sigma_min, steps + 1)[:-1]
    return list(shift * s / (1 + (shift - 1) * s))


def _reference_sample(pipeline, prompt, negative, seed, steps, scale_video, scale_audio):
    """Spec §13 written out directly on the model and codecs, without the sampler's code."""
    model, codecs = pipeline.model, pipeline.codecs
    generator = torch.Generator().manual_seed(seed)
    t_lat = (N - 1) // 4 + 1
    x_video = torch.randn(1, 16, t_lat, H // 8, W // 8, generator=generator)  # drawn first (§13.3)
    cond = codecs.build_i2v_condition(codecs.video_vae.encode_condition(_reference_image(), N))
    audio_len = math.ceil(math.floor(48000 * N / FPS) / 960)
    x_audio = torch.randn(1, model.config.audio_latent_dim, audio_len, generator=generator)  # then audio
    text_pos = codecs.text_encoder.encode([prompt])[0]
    text_neg = codecs.text_encoder.encode([negative])[0]
    sigmas = _spec_sigmas(steps)
    experts = []
    with torch.no_grad():
        for i, sigma in enumerate(sigmas):
            t = torch.tensor([1000.0 * sigma], dtype=torch.float32)
            expert = "video_dit" if 1000.0 * sigma >= 900.0 else "video_dit_2"
            experts.append(expert)
            pos_v, pos_a = model(x_video, cond, x_audio, text_pos, t, t, expert=expert, video_fps=FPS)
            if scale_video == 1.0 and scale_audio == 1.0:
                v_video, v_audio = pos_v, pos_a
            else:
                neg_v, neg_a = model(x_video, cond, x_audio, text_neg, t, t, expert=expert, video_fps=FPS)
                v_video = neg_v + scale_video * (pos_v - neg_v)
                v_audio = neg_a + scale_audio * (pos_a - neg_a)
            delta = (sigmas[i + 1] if i + 1 < len(sigmas) else 0.0) - sigma
            x_video = x_video + v_video * delta
            x_audio = x_audio + v_audio * delta
    return x_video[0], x_audio[0], experts


def _generate(pipeline, **kwargs):
    options = dict(image=_reference_image(), num_frames=N, height=H, width=W, steps=4, seed=11, fps=FPS)
    options.update(kwargs)
    (render,) = generate(pipeline, None, ["a bell rings twice"], progress=False, **options)
    return render


@pytest.mark.parametrize(("scale_video", "scale_audio"), [(5.0, None), (3.0, 7.0), (1.0, None)])
def test_sampler_matches_an_independent_implementation_of_spec_13(pipeline, scale_video, scale_audio):
    render = _generate(pipeline, cfg_scale=scale_video, cfg_scale_audio=scale_audio)
    ref_video, ref_audio, ref_experts = _reference_sample(
        pipeline,
        "a bell rings twice",
        DEFAULT_NEGATIVE_PROMPT,
        11,
        4,
        scale_video,
        scale_video if scale_audio is None else scale_audio,
    )
    assert render.experts == ref_experts
    torch.testing.assert_close(render.video_latents, ref_video, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(render.audio_latents, ref_audio, rtol=1e-4, atol=1e-4)
    assert render.video.shape == (N, H, W, 3) and render.video.dtype == np.uint8
    assert render.audio.shape == (math.floor(48000 * N / FPS),) and render.audio.dtype == np.float32


def test_cfg_one_is_the_conditional_prediction_and_skips_the_negative_pass(pipeline):
    calls = []
    handle = pipeline.model.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        unguided = _generate(pipeline, cfg_scale=1.0)
        num_unguided = len(calls)
        calls.clear()
        # with the prompt as its own negative, v_neg == v_pos exactly, so any scale gives the conditional velocity
        self_negative = _generate(pipeline, cfg_scale=5.0, negative_prompt="a bell rings twice")
        num_guided = len(calls)
    finally:
        handle.remove()
    assert num_unguided == 4 and num_guided == 8
    assert torch.equal(unguided.video_latents, self_negative.video_latents)
    assert torch.equal(unguided.audio_latents, self_negative.audio_latents)
    different = _generate(pipeline, cfg_scale=5.0)
    assert not torch.equal(unguided.video_latents, different.video_latents)


def test_audio_scale_defaults_to_the_video_scale(pipeline):
    same = _generate(pipeline, cfg_scale=4.0)
    explicit = _generate(pipeline, cfg_scale=4.0, cfg_scale_audio=4.0)
    assert torch.equal(same.audio_latents, explicit.audio_latents)
    other = _generate(pipeline, cfg_scale=4.0, cfg_scale_audio=1.5)
    assert not torch.equal(same.audio_latents, other.audio_latents)


def test_fifty_steps_route_18_high_noise_and_32_low_noise_steps(pipeline):
    render = _generate(pipeline, steps=50, cfg_scale=1.0)
    assert render.experts == ["video_dit"] * 18 + ["video_dit_2"] * 32


def test_seeds_are_per_prompt_and_the_global_rng_is_untouched(pipeline):
    state = torch.get_rng_state()
    both = generate(
        pipeline, None, ["first prompt", "second prompt"], image=_reference_image(), num_frames=N, height=H,
        width=W, steps=2, seed=20, progress=False,
    )  # fmt: skip
    assert torch.equal(torch.get_rng_state(), state)
    (alone,) = generate(
        pipeline, None, ["second prompt"], image=_reference_image(), num_frames=N, height=H, width=W, steps=2,
        seed=21, progress=False,
    )  # fmt: skip
    assert both[1].seed == 21
    assert torch.equal(both[1].video_latents, alone.video_latents)
    assert np.array_equal(both[1].video, alone.video) and np.array_equal(both[1].audio, alone.audio)


def test_offloading_keeps_one_expert_resident_and_gives_the_same_result(tiny_checkpoint, pipeline):
    prompts = ["first prompt", "second prompt"]
    options = dict(image=_reference_image(), num_frames=N, height=H, width=W, steps=4, seed=3, progress=False)
    resident = generate(pipeline, None, prompts, **options)
    offloaded = load_pipeline(tiny_checkpoint, offload_experts=True, codecs=pipeline.codecs)
    assert offloaded.resident_experts() == []
    seen = []
    handle = offloaded.model.register_forward_pre_hook(
        lambda m, a: seen.append(tuple(offloaded.resident_experts()))
    )
    try:
        result = generate(offloaded, None, prompts, **options)
    finally:
        handle.remove()
    assert set(seen) == {("video_dit",), ("video_dit_2",)}  # never both at once
    assert offloaded.num_expert_loads == 2  # phase-major: each expert loaded once for both prompts
    for a, b in zip(resident, result):
        assert torch.equal(a.video_latents, b.video_latents) and torch.equal(a.audio_latents, b.audio_latents)


def test_bad_generate_arguments(pipeline):
    from mova_train.sampling import SamplingError

    with pytest.raises(SamplingError, match="1 mod 4"):
        _generate(pipeline, num_frames=10)
    with pytest.raises(SamplingError, match="multiple of 16"):
        _generate(pipeline, height=40)
    with pytest.raises(SamplingError, match="cfg_scale"):
        _generate(pipeline, cfg_scale=float("nan"))
    with pytest.raises(SamplingError, match="steps"):
        _generate(pipeline, steps=0)
    with pytest.raises(SamplingError, match="non-empty"):
        generate(pipeline, None, [""], progress=False)
