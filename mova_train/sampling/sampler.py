"""The MOVA flow-matching sampler (spec §13): text CFG, expert switch at the boundary, fp32 Euler steps, decoding.

Layouts: video latents [1, 16, T, h, w] (T = (N-1)/4 + 1, h = H/8, w = W/8); I2V condition y [1, 20, T, h, w];
audio latents [1, Ca, L] (L = ceil(samples / 960)); text [1, 512, Dt]; decoded frames uint8 [N, H, W, 3];
decoded audio float32 [S] at 48 kHz.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from mova_train.models import EXPERTS, FlowMatchScheduler, expert_for_timestep
from mova_train.progress import Progress
from mova_train.sampling.control import StopCheck
from mova_train.sampling.inputs import (
    DEFAULT_NEGATIVE_PROMPT,
    SampleShape,
    SamplingError,
    check_sample_shape,
    grey_reference,
    load_reference_image,
)
from mova_train.sampling.pipeline import MovaPipeline

log = logging.getLogger(__name__)


@dataclass
class Render:
    """One generated clip."""

    prompt: str
    seed: int
    video: np.ndarray  # uint8 [N, H, W, 3]
    audio: np.ndarray  # float32 [S], S = floor(sample_rate * N / fps)
    fps: float
    sample_rate: int
    negative_prompt: str = ""
    image: str = ""  # what conditioned the first frame: a file path, "grey", or the object's type
    experts: list[str] = field(default_factory=list)  # the expert used at each step
    video_latents: torch.Tensor | None = None  # [16, T, h, w] fp32, final denoised latent
    audio_latents: torch.Tensor | None = None  # [Ca, L] fp32

    @property
    def duration_s(self) -> float:
        return self.video.shape[0] / self.fps


@dataclass(frozen=True)
class PlannedStep:
    """One denoising step: from timestep t to t_next (None = the final jump to sigma 0) with one expert."""

    index: int
    t: float
    t_next: float | None
    expert: str


def plan_steps(scheduler: FlowMatchScheduler, num_steps: int, boundary: float) -> list[PlannedStep]:
    """The step table of spec §12/§13 with the expert of each step from the one router (spec §7)."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise SamplingError(f"steps must be a positive integer, got {num_steps!r}")
    timesteps = [float(t) for t in scheduler.sampling_timesteps(num_steps)]
    steps = []
    for i, t in enumerate(timesteps):
        t_next = timesteps[i + 1] if i + 1 < len(timesteps) else None
        steps.append(PlannedStep(i, t, t_next, expert_for_timestep(t, boundary)))
    return steps


@dataclass
class _RenderState:
    """Everything one render carries between phases (so experts can be swapped between phases)."""

    prompt: str
    negative_prompt: str
    seed: int
    image_label: str
    x_video: torch.Tensor  # [1, 16, T, h, w] fp32
    x_audio: torch.Tensor  # [1, Ca, L] fp32
    cond: torch.Tensor  # [1, 20, T, h, w]
    text: torch.Tensor  # [1, 512, Dt]
    text_negative: torch.Tensor | None  # [1, 512, Dt]; None when guidance is off
    experts: list[str] = field(default_factory=list)


def _check_scale(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise SamplingError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _per_prompt(value, num_prompts: int, name: str) -> list:
    if isinstance(value, list | tuple):
        if len(value) != num_prompts:
            raise SamplingError(f"{name}: got {len(value)} values for {num_prompts} prompts")
        return list(value)
    return [value] * num_prompts


def _image_label(image) -> str:
    if image is None:
        return "grey"
    if isinstance(image, str):
        return image
    if hasattr(image, "__fspath__"):
        return str(image)
    return type(image).__name__


def generate(
    pipeline_or_model,
    codecs=None,
    prompts: Sequence[str] | str = (),
    *,
    negative_prompt: str | Sequence[str | None] | None = None,
    image=None,
    num_frames: int = 193,
    height: int = 352,
    width: int = 640,
    steps: int = 50,
    cfg_scale: float = 5.0,
    cfg_scale_audio: float | None = None,
    seed: int | Sequence[int] = 0,
    fps: float = 24.0,
    scheduler: FlowMatchScheduler | None = None,
    progress: bool = True,
    should_stop: Callable[[], bool] | None = None,
    share: Callable[[Any], Any] | None = None,
) -> list[Render]:
    """Render one clip per prompt with the MOVA sampler (spec §13).

    pipeline_or_model: a MovaPipeline (from load_pipeline; can keep one expert resident at a time) or a MovaModel
        with both experts loaded (then `codecs` is required; the scheduler defaults to the released one).
    negative_prompt: None uses the reference default (Wan's Chinese negative prompt); may be a list per prompt.
    image: the I2V reference (path, PIL image, uint8 [H,W,3], or tensor [3,H,W] in [-1,1]), one for all prompts or
        a list per prompt. None conditions on a mid-grey first frame (the model was trained image-conditioned only,
        so expect the clip to open on grey); a warning is logged.
    cfg_scale / cfg_scale_audio: text guidance v = v_neg + s (v_pos - v_neg); the audio scale defaults to the video
        one. When both are 1 the negative pass is skipped.
    seed: prompt i uses seed + i (or seed[i]), drawn in the order of spec §13.3 on a generator of its own, so one
        render never depends on the others and the caller's global RNG is left untouched.
    should_stop: asked before every denoising step; True abandons the renders (sampling.control.RenderInterrupted),
        so a stop signal is honoured within one step.
    share: for a render that several ranks run together (ZeRO-3: every forward gathers the weights from all
        ranks), called on every rank with this rank's prepared inputs and returning the main rank's, e.g. a
        broadcast from rank 0; each rank then denoises the same latents. A rank whose pipeline has no codecs
        prepares nothing (it passes None), denoises with the others and returns [] (nothing to decode with).
    """
    pipeline = _as_pipeline(pipeline_or_model, codecs, scheduler, shared=share is not None)
    codecs = pipeline.codecs
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise SamplingError("no prompts given")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            raise SamplingError(f"prompt {i} must be a non-empty string, got {prompt!r}")
    shape = None  # without codecs (a rank of a shared render) the main rank's shape comes with `share`
    if codecs is not None:
        shape = check_sample_shape(
            num_frames,
            height,
            width,
            fps,
            temporal_stride=codecs.video_temporal_stride,
            spatial_stride=codecs.video_spatial_stride,
            sample_rate=codecs.sample_rate,
            audio_hop=codecs.audio_hop,
        )
    scale_video = _check_scale("cfg_scale", cfg_scale)
    scale_audio = scale_video if cfg_scale_audio is None else _check_scale("cfg_scale_audio", cfg_scale_audio)
    guided = not (scale_video == 1.0 and scale_audio == 1.0)
    seeds = (
        [int(seed) + i for i in range(len(prompts))]
        if isinstance(seed, int) and not isinstance(seed, bool)
        else [int(s) for s in _per_prompt(seed, len(prompts), "seed")]
    )
    negatives = [
        DEFAULT_NEGATIVE_PROMPT if n is None else n
        for n in _per_prompt(negative_prompt, len(prompts), "negative_prompt")
    ]
    images = (
        _per_prompt(image, len(prompts), "image")
        if isinstance(image, list | tuple)
        else [image] * len(prompts)
    )
    plan = plan_steps(pipeline.scheduler, steps, pipeline.boundary)
    if codecs is not None and any(i is None for i in images):
        log.warning("no reference image: conditioning on a mid-grey first frame (the clip will open on grey)")

    model = pipeline.model
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            states = None
            if codecs is not None:
                states = [
                    _prepare(pipeline, shape, prompt, negative, image_i, seed_i, guided)
                    for prompt, negative, image_i, seed_i in zip(prompts, negatives, images, seeds)
                ]
            if share is not None:
                shape, states = _shared_inputs(share, shape, states, pipeline.device)
            stop = StopCheck(should_stop, len(plan) * len(states))
            _denoise(pipeline, states, plan, shape, scale_video, scale_audio, progress, stop)
            return [_decode(pipeline, state, shape) for state in states] if codecs is not None else []
    finally:
        model.train(was_training)


def _shared_inputs(share, shape, states, device) -> tuple[SampleShape, list[_RenderState]]:
    """The main rank's (shape, prepared inputs) on this rank: sent from the CPU, put back on this rank's device."""
    sent = None if states is None else [_moved(state, torch.device("cpu")) for state in states]
    shape, received = share((shape, sent))
    if received is None:
        raise SamplingError(
            "generate: the main rank of a shared render has no codecs to prepare the inputs with"
        )
    return shape, [_moved(state, device) for state in received]


def _moved(state: _RenderState, device: torch.device) -> _RenderState:
    tensors = ("x_video", "x_audio", "cond", "text", "text_negative")
    return replace(
        state, **{k: None if getattr(state, k) is None else getattr(state, k).to(device) for k in tensors}
    )


def _as_pipeline(pipeline_or_model, codecs, scheduler, *, shared: bool = False) -> MovaPipeline:
    if isinstance(pipeline_or_model, MovaPipeline):
        if pipeline_or_model.codecs is None and not shared:
            raise SamplingError(
                "generate: the pipeline has no codecs (only a rank of a shared render may lack them)"
            )
        if codecs is not None and codecs is not pipeline_or_model.codecs:
            raise SamplingError("generate: pass codecs either in the pipeline or as an argument, not both")
        if scheduler is not None:
            raise SamplingError("generate: a pipeline brings its own scheduler; do not pass scheduler=")
        return pipeline_or_model
    if codecs is None and not shared:
        raise SamplingError("generate: codecs are required when sampling from a bare model (see load_codecs)")
    return MovaPipeline.from_model(pipeline_or_model, codecs, scheduler=scheduler)


def _prepare(
    pipeline: MovaPipeline, shape: SampleShape, prompt: str, negative: str, image, seed: int, guided: bool
) -> _RenderState:
    codecs = pipeline.codecs
    device = pipeline.device
    generator = torch.Generator(device=device).manual_seed(seed)
    latent_dim = pipeline.model.config.video_latent_dim
    # RNG order of spec §13.3: video noise, then the VAE encode of the condition, then audio noise
    x_video = torch.randn(
        (1, latent_dim, shape.latent_frames, shape.latent_height, shape.latent_width),
        generator=generator,
        device=device,
        dtype=torch.float32,
    )
    if image is None:
        reference = grey_reference(shape.height, shape.width)
    else:
        reference = load_reference_image(image, shape.height, shape.width)
    # the VAE moves the image to its own device/dtype and returns fp32 latents
    cond_latent = codecs.video_vae.encode_condition(reference, shape.num_frames)  # [1, 16, T, h, w]
    cond = codecs.build_i2v_condition(cond_latent).to(device=device, dtype=torch.float32)  # [1, 20, T, h, w]
    x_audio = torch.randn(
        (1, pipeline.model.config.audio_latent_dim, shape.audio_latent_len),
        generator=generator,
        device=device,
        dtype=torch.float32,
    )
    text = _encode_text(codecs, prompt, device)
    text_negative = _encode_text(codecs, negative, device) if guided else None
    return _RenderState(
        prompt, negative, seed, _image_label(image), x_video, x_audio, cond, text, text_negative
    )


def _encode_text(codecs, prompt: str, device) -> torch.Tensor:
    embedding, _lengths = codecs.text_encoder.encode([prompt])  # [1, 512, Dt], padded positions zeroed
    return embedding.to(device=device, dtype=torch.float32)


def _phases(plan: list[PlannedStep]) -> list[list[PlannedStep]]:
    """Consecutive runs of steps that share one expert."""
    phases: list[list[PlannedStep]] = []
    for step in plan:
        if phases and phases[-1][-1].expert == step.expert:
            phases[-1].append(step)
        else:
            phases.append([step])
    return phases


def _denoise(
    pipeline: MovaPipeline,
    states: list[_RenderState],
    plan: list[PlannedStep],
    shape: SampleShape,
    scale_video: float,
    scale_audio: float,
    progress: bool,
    stop: StopCheck,
) -> None:
    phases = _phases(plan)
    if pipeline.offload_experts:
        # phase-major: each expert is loaded once for all renders, then freed before the next one loads
        for phase in phases:
            pipeline.ensure_expert(phase[0].expert)
            label = f"{phase[0].expert} ({len(states)} render{'s' if len(states) > 1 else ''})"
            with Progress(
                total=len(phase) * len(states), desc=label, unit="step", disable=not progress, leave=False
            ) as bar:
                for state in states:
                    for step in phase:
                        stop.before_step()
                        _step(pipeline, state, step, shape, scale_video, scale_audio)
                        bar.update(1)
        return
    for n, state in enumerate(states):
        with Progress(
            total=len(plan),
            desc=f"render {n + 1}/{len(states)}",
            unit="step",
            disable=not progress,
            leave=False,
        ) as bar:
            for phase in phases:
                pipeline.ensure_expert(phase[0].expert)
                for step in phase:
                    stop.before_step()
                    _step(pipeline, state, step, shape, scale_video, scale_audio)
                    bar.update(1)


def _step(
    pipeline: MovaPipeline,
    state: _RenderState,
    step: PlannedStep,
    shape: SampleShape,
    scale_video: float,
    scale_audio: float,
) -> None:
    model = pipeline.model
    dtype = pipeline.compute_dtype(step.expert)
    device = state.x_video.device
    t = torch.full((1,), step.t, dtype=torch.float32, device=device)
    inputs = (state.x_video.to(dtype), state.cond.to(dtype), state.x_audio.to(dtype))

    def predict(text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pred_video, pred_audio = model(
            *inputs, text.to(dtype), t, t, expert=step.expert, video_fps=shape.fps
        )  # [1, 16, T, h, w], [1, Ca, L]
        return pred_video.float(), pred_audio.float()

    v_video, v_audio = predict(state.text)
    if state.text_negative is not None:
        neg_video, neg_audio = predict(state.text_negative)
        v_video = neg_video + scale_video * (v_video - neg_video)
        v_audio = neg_audio + scale_audio * (v_audio - neg_audio)
    # Euler in fp32 on each modality's own (identical) timestep column
    scheduler = pipeline.scheduler
    state.x_video = scheduler.step(v_video, step.t, step.t_next, state.x_video)
    state.x_audio = scheduler.step(v_audio, step.t, step.t_next, state.x_audio)
    state.experts.append(step.expert)


def _decode(pipeline: MovaPipeline, state: _RenderState, shape: SampleShape) -> Render:
    codecs = pipeline.codecs
    pixels = codecs.video_vae.decode(state.x_video)  # [1, 3, N, H, W] in [-1, 1], fp32
    if tuple(pixels.shape[2:]) != (shape.num_frames, shape.height, shape.width):
        raise AssertionError(f"video VAE decoded {tuple(pixels.shape)}, expected N,H,W = {shape}")
    frames = ((pixels[0].float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    frames = frames.permute(1, 2, 3, 0).cpu().numpy()  # [N, H, W, 3]
    # the DAC runs in fp32 (spec §11); its output is 960·L samples, cut to the clip's duration
    wave = codecs.audio_vae.decode(state.x_audio)  # [1, 1, 960 L]
    audio = wave.reshape(-1)[: shape.num_audio_samples].float().clamp(-1.0, 1.0).cpu().numpy()
    if audio.shape[0] < shape.num_audio_samples:
        raise AssertionError(
            f"audio VAE decoded {audio.shape[0]} samples, expected {shape.num_audio_samples}"
        )
    return Render(
        prompt=state.prompt,
        seed=state.seed,
        video=np.ascontiguousarray(frames),
        audio=np.ascontiguousarray(audio, dtype=np.float32),
        fps=shape.fps,
        sample_rate=int(codecs.sample_rate),
        negative_prompt=state.negative_prompt,
        image=state.image_label,
        experts=list(state.experts),
        video_latents=state.x_video[0].detach().float().cpu(),
        audio_latents=state.x_audio[0].detach().float().cpu(),
    )


__all__ = ["EXPERTS", "PlannedStep", "Render", "generate", "plan_steps"]
