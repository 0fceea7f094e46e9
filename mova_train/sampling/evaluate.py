"""Evaluation during training: render fixed prompts with the current adapters, log them to W&B with sound, measure
audio-video sync per render, and a held-out flow-matching loss on shards set aside.

Nothing here touches the global RNG (renders and held-out noise use generators of their own), so calling it
between training steps does not change the training run.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from mova_train.checkpoint_io import write_json_atomic
from mova_train.models import FlowMatchScheduler, expert_for_timestep
from mova_train.sampling.control import RenderInterrupted, StepClock
from mova_train.sampling.defaults import sampling_defaults
from mova_train.sampling.inputs import PromptItem, SamplingError
from mova_train.sampling.pipeline import MovaPipeline
from mova_train.sampling.render import render_stem, save_render
from mova_train.sampling.sampler import generate

log = logging.getLogger(__name__)

# Sizes and steps not given come from the checkpoint (sampling.defaults); the experiment config overrides them.
EVAL_DEFAULTS = {"cfg_scale": 5.0}


def _as_items(prompts: Sequence) -> list[PromptItem]:
    items = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, PromptItem):
            items.append(prompt)
        elif isinstance(prompt, str):
            items.append(PromptItem(prompt))
        elif isinstance(prompt, dict) or hasattr(prompt, "keys"):
            entry = dict(prompt)
            unknown = set(entry) - {"prompt", "image", "negative_prompt", "seed"}
            if unknown or not isinstance(entry.get("prompt"), str):
                raise SamplingError(
                    f"eval prompt {i}: expected a string or {{prompt, image?, negative_prompt?, seed?}}, got {entry}"
                )
            items.append(
                PromptItem(
                    entry["prompt"], entry.get("image"), entry.get("negative_prompt"), entry.get("seed")
                )
            )
        else:
            raise SamplingError(
                f"eval prompt {i}: expected a string or a mapping, got {type(prompt).__name__}"
            )
    if not items:
        raise SamplingError("render_eval: no prompts")
    return items


def render_eval(
    model,
    codecs,
    prompts: Sequence,
    out_dir: str | os.PathLike,
    *,
    step: int,
    seed: int = 0,
    scheduler: FlowMatchScheduler | None = None,
    contact_sheet: bool = True,
    progress: bool = False,
    should_stop=None,
    write: bool = True,
    share=None,
    **sampling,
) -> list[dict]:
    """Render `prompts` (strings or {prompt, image?, negative_prompt?, seed?}) with the model as it is now.

    Files go to `<out_dir>/step-<step:06d>/`, with `renders.json` listing them. Returns per render a dict with the
    mp4 and contact-sheet paths, `av_offset_s` (audio late if positive; None when nothing to correlate) and
    `av_confidence`. Prompt i uses its own seed, or `seed + i`, so the same prompt is compared across steps.
    `sampling` is passed to `generate` (num_frames, height, width, steps, cfg_scale, cfg_scale_audio, fps;
    negative_prompt and image act as defaults for prompts without their own); num_frames, height, width and
    steps not given are the checkpoint's (sampling.defaults); prompts without any image are conditioned on a
    mid-grey first frame. `model` may be a MovaModel (DDP/DeepSpeed wrappers are unwrapped; under ZeRO-3 every
    rank must call this with the same arguments, since each module's forward gathers its weights from all ranks) or
    a MovaPipeline.
    `should_stop` is asked before every denoising step; True abandons the renders (RenderInterrupted: renders
    finished before are kept, the abandoned one and renders.json are not written). After the first denoising step
    one log line estimates how long the renders take.
    A collective (ZeRO-3) evaluation renders on every rank with `share` (see `generate`): the main rank prepares the
    inputs with its codecs and writes; the others pass `codecs=None` and `write=False`, run the same forwards, and
    get [].
    """
    items = _as_items(prompts)
    options = {**EVAL_DEFAULTS, **sampling}
    # defaults for prompts that do not set their own
    default_negative = options.pop("negative_prompt", None)
    default_image = options.pop("image", None)
    pipeline = (
        model
        if isinstance(model, MovaPipeline)
        else MovaPipeline.from_model(model, codecs, scheduler=scheduler)
    )
    fitting = sampling_defaults(pipeline.model.config)
    for name in ("num_frames", "height", "width", "steps"):
        if options.get(name) is None:
            options[name] = getattr(fitting, name)
    clock = StepClock(
        options["steps"] * len(items), stop=should_stop, what=f"{len(items)} eval render(s) at step {step}"
    )
    step_dir = Path(out_dir) / f"step-{int(step):06d}"
    records = []
    for i, item in enumerate(items):
        item_seed = item.seed if item.seed is not None else seed + i
        log.info(
            "eval render %d/%d at step %d (%d frames at %dx%d, %d steps, image: %s): %s",
            i + 1, len(items), step, options["num_frames"], options["height"], options["width"], options["steps"],
            _label(item.image if item.image is not None else default_image) or "grey", item.prompt[:80],
        )  # fmt: skip
        renders = generate(
            pipeline,
            None,
            [item.prompt],
            negative_prompt=item.negative_prompt if item.negative_prompt is not None else default_negative,
            image=item.image if item.image is not None else default_image,
            seed=item_seed,
            progress=progress,
            should_stop=clock,
            share=share,
            **options,
        )
        if not write:
            continue
        (render,) = renders
        record = save_render(
            render, step_dir, render_stem(i, item.prompt, item_seed), contact_sheet=contact_sheet
        )
        record["step"] = int(step)
        records.append(record)
    if not write:
        return []
    options_record = {**options, "negative_prompt": default_negative, "image": _label(default_image)}
    write_json_atomic(
        step_dir / "renders.json", {"step": int(step), "sampling": options_record, "renders": records}
    )
    return records


def _label(image) -> str | None:
    return image if image is None or isinstance(image, str) else type(image).__name__


def sync_summary(records: Sequence[dict], *, min_confidence: float = 0.3) -> dict[str, float]:
    """Mean |A/V offset| over renders whose sync measure is confident; NaN when none is."""
    offsets = [
        abs(r["av_offset_s"])
        for r in records
        if r.get("av_offset_s") is not None and r.get("av_confidence", 0.0) >= min_confidence
    ]
    return {
        "av_offset_abs_mean_ms": 1000.0 * sum(offsets) / len(offsets) if offsets else math.nan,
        "av_confident_fraction": len(offsets) / len(records) if records else 0.0,
    }


def log_renders_to_wandb(records: Sequence[dict], *, step: int, run=None, prefix: str = "eval") -> dict:
    """Log renders as `wandb.Video` (the mp4 file as written, so the audio plays), contact sheets as images, and the
    sync figures. `run` defaults to `wandb.run`; returns the logged dict ({} when no run is active)."""
    import wandb

    run = run if run is not None else wandb.run
    if run is None:
        return {}
    payload: dict = {}
    for i, record in enumerate(records):
        key = f"{prefix}/{i:02d}"
        payload[f"{key}/video"] = wandb.Video(record["mp4"], caption=record["prompt"][:200], format="mp4")
        if record.get("contact_sheet"):
            payload[f"{key}/contact_sheet"] = wandb.Image(
                record["contact_sheet"], caption=record["prompt"][:200]
            )
        if record.get("av_offset_s") is not None:
            payload[f"{key}/av_offset_ms"] = 1000.0 * record["av_offset_s"]
        payload[f"{key}/av_confidence"] = record.get("av_confidence", 0.0)
    payload.update({f"{prefix}/{k}": v for k, v in sync_summary(records).items()})
    run.log(payload, step=int(step))
    return payload


# ---------------------------------------------------------------------------------------------------------------
# held-out loss

# Indices into the 1000-entry training table: 3 in the high-noise expert's range (< 359), 5 in the low-noise one's.
HELDOUT_TIMESTEP_INDICES = (0, 142, 285, 428, 571, 713, 856, 999)


def heldout_loss(
    model,
    batches: Iterable,
    *,
    build_condition=None,
    scheduler: FlowMatchScheduler | None = None,
    timestep_indices: Sequence[int] = HELDOUT_TIMESTEP_INDICES,
    seed: int = 0,
    max_batches: int | None = None,
    video_fps: float = 24.0,
    loss_weights: dict[str, float] | None = None,
    should_stop=None,
) -> dict[str, float]:
    """The training objective (spec §12, §16) on held-out batches at fixed timesteps and fixed noise.

    batches: loader Batches (video, first_frame, audio, text). build_condition: first_frame latent [B,16,T,h,w] ->
    y [B,20,T,h,w] (default: mova_train.codecs.build_i2v_condition). Every batch is scored at each timestep of the training table
    listed in `timestep_indices`, with the expert the router picks for it and noise from a CPU generator seeded by
    (seed, batch index), so the figure only moves when the model does. The loss is the training formula
    (`FlowMatchScheduler.loss`) with `loss_weights` (the objective's `loss_weights`; default 1 and 1). Returns mean
    loss, its video/audio parts, and the mean per expert. `should_stop` is asked before every batch; True abandons
    the measure (RenderInterrupted).
    """
    if build_condition is None:
        from mova_train.codecs import build_i2v_condition as build_condition
    scheduler = scheduler if scheduler is not None else FlowMatchScheduler.from_config(model.config.scheduler)
    table = scheduler.train_timesteps
    boundary = float(scheduler.boundary_timestep(model.config.boundary_ratio))
    for index in timestep_indices:
        if not 0 <= int(index) < table.shape[0]:
            raise SamplingError(
                f"heldout_loss: timestep index {index} outside the table [0, {table.shape[0]})"
            )
    was_training = model.training
    model.eval()
    sums = {"loss": 0.0, "loss_video": 0.0, "loss_audio": 0.0}
    per_expert: dict[str, list[float]] = {}
    count = 0
    try:
        with torch.no_grad():
            for batch_index, batch in enumerate(batches):
                if max_batches is not None and batch_index >= max_batches:
                    break
                if should_stop is not None and should_stop():
                    raise RenderInterrupted(batch_index, max_batches, "held-out loss", "batches")
                device = _first_param(model).device
                dtype = _first_param(model).dtype
                x0_video = batch.video.to(device=device, dtype=torch.float32)  # [B, 16, T, h, w]
                x0_audio = batch.audio.to(device=device, dtype=torch.float32)  # [B, Ca, L]
                cond = build_condition(batch.first_frame).to(device=device, dtype=dtype)  # [B, 20, T, h, w]
                text = batch.text.to(device=device, dtype=dtype)  # [B, 512, Dt]
                generator = torch.Generator().manual_seed(seed * 1_000_003 + batch_index)
                for index in timestep_indices:
                    t_value = float(table[int(index)])
                    noise_video = torch.randn(x0_video.shape, generator=generator).to(device)
                    noise_audio = torch.randn(x0_audio.shape, generator=generator).to(device)
                    t = torch.full((x0_video.shape[0],), t_value, device=device)
                    xt_video = scheduler.add_noise(x0_video, noise_video, t_value)
                    xt_audio = scheduler.add_noise(x0_audio, noise_audio, t_value)
                    expert = expert_for_timestep(t_value, boundary)
                    pred_video, pred_audio = model(
                        xt_video.to(dtype),
                        cond,
                        xt_audio.to(dtype),
                        text,
                        t,
                        t,
                        expert=expert,
                        video_fps=video_fps,
                    )
                    total, loss_video, loss_audio = scheduler.loss(
                        pred_video,
                        pred_audio,
                        scheduler.target(x0_video, noise_video),
                        scheduler.target(x0_audio, noise_audio),
                        **(loss_weights or {}),
                    )
                    loss = float(total)
                    sums["loss"] += loss
                    sums["loss_video"] += float(loss_video)
                    sums["loss_audio"] += float(loss_audio)
                    per_expert.setdefault(expert, []).append(loss)
                    count += 1
    finally:
        model.train(was_training)
    if count == 0:
        raise SamplingError("heldout_loss: no held-out batches")
    result = {k: v / count for k, v in sums.items()}
    result.update({f"loss_{e}": sum(v) / len(v) for e, v in sorted(per_expert.items())})
    result["num_evaluations"] = float(count)
    return result


def _first_param(model) -> torch.Tensor:
    for param in model.parameters():
        return param
    raise SamplingError("model has no parameters")
