"""Sampling MOVA: the flow-matching denoising loop with text guidance, rendering to mp4 with sound, evaluation."""

from mova_train.sampling.control import RenderInterrupted, StepClock
from mova_train.sampling.defaults import SamplingDefaults, checkpoint_sampling_defaults, sampling_defaults
from mova_train.sampling.evaluate import heldout_loss, log_renders_to_wandb, render_eval, sync_summary
from mova_train.sampling.inputs import (
    DEFAULT_NEGATIVE_PROMPT,
    LoraSpec,
    PromptItem,
    SamplingError,
    check_sample_shape,
    load_prompts_file,
    parse_lora_spec,
)
from mova_train.sampling.pipeline import MovaPipeline, load_adapter, load_pipeline
from mova_train.sampling.render import save_render, write_contact_sheet
from mova_train.sampling.sampler import PlannedStep, Render, generate, plan_steps

__all__ = [
    "DEFAULT_NEGATIVE_PROMPT",
    "LoraSpec",
    "MovaPipeline",
    "PlannedStep",
    "PromptItem",
    "RenderInterrupted",
    "SamplingDefaults",
    "Render",
    "SamplingError",
    "StepClock",
    "check_sample_shape",
    "checkpoint_sampling_defaults",
    "generate",
    "heldout_loss",
    "load_adapter",
    "load_pipeline",
    "load_prompts_file",
    "log_renders_to_wandb",
    "parse_lora_spec",
    "plan_steps",
    "render_eval",
    "sampling_defaults",
    "save_render",
    "sync_summary",
    "write_contact_sheet",
]
