"""Per-GPU memory from a simulated micro-step: frozen weights by ZeRO stage and expert residency, adapters +
gradients + optimizer state, the measured activation peak; pinned host RAM; FLOPs and traffic per optimizer step;
advice when it does not fit; text and JSON.

Weights and optimizer state are sized from the real (LoRA-injected) model's parameters and the DeepSpeed config:

- frozen base: every resident component in full (no DeepSpeed, ZeRO-2), or under ZeRO-3 its 1/world partition plus the
  gathered working set, modelled as `stage3_max_live_parameters` + `stage3_prefetch_bucket_size` elements (DeepSpeed's
  cap on gathered parameters), at most the components a micro-step runs, in the base dtype;
- trainable: adapters in their dtype, gradients in the same dtype, AdamW's two fp32 moments; under DeepSpeed the
  gradients, fp32 master copies with their gradients (bf16 only) and the moments are partitioned over the world (ZeRO-2/3), the adapters
  too under ZeRO-3; `offload_param` / `offload_optimizer` move those partitions to pinned host memory.

Figures are tensor bytes. The CUDA context, NCCL buffers and allocator fragmentation come on top (typically 1-3 GB).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from mova_train.names import EXPERTS
from mova_train.plan.simulate import ClipShape, Execution, StepFigures, experts_resident

GB, GIB = 1e9, 2**30
ADAM_MOMENT_BYTES = 8  # exp_avg + exp_avg_sq in fp32
DEEPSPEED_LIVE_DEFAULT = 1_000_000_000  # stage3_max_live_parameters when "auto"/absent
DEEPSPEED_PREFETCH_DEFAULT = 50_000_000  # stage3_prefetch_bucket_size when "auto"/absent


def _ds_int(ex: Execution, key: str, default: int) -> int:
    value = (ex.ds_config or {}).get("zero_optimization", {}).get(key, default)
    return int(value) if isinstance(value, (int, float)) else default


@dataclass
class MemoryPlan:
    """Bytes per GPU (and pinned host bytes per rank); `parts` sum to `total`."""

    parts: dict[str, int]
    host_parts: dict[str, int]
    resident: list[str]
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def host_total(self) -> int:
        return sum(self.host_parts.values())


def plan_memory(fig: StepFigures, ex: Execution, cfg, expert_mode: str | None = None) -> MemoryPlan:
    """Per-GPU bytes of `fig`'s model under `ex` (the module docstring says how each part is sized); `expert_mode`
    re-plans with another `objective.expert`."""
    components = tuple(fig.params)
    resident_experts = experts_resident(cfg, components, ex.zero_stage, fig.expert, expert_mode)
    resident = [c for c in components if c not in EXPERTS or c in resident_experts]
    frozen = sum(fig.params[c]["frozen_bytes"] for c in resident)
    host_frozen = sum(fig.params[c]["frozen_bytes"] for c in components if c not in resident)
    # model.offload_blocks: the last K blocks of each expert live on the host; at most two are on the GPU at once
    # (the one running and the one prefetched: models.streaming)
    k = int(getattr(cfg.model, "offload_blocks", 0) or 0)
    streamed = {c: min(k, fig.params[c].get("num_blocks", 0)) * fig.params[c].get("block_frozen_bytes", 0)
                for c in components if c in EXPERTS}  # fmt: skip
    in_flight = max(
        (min(2, k, fig.params[c].get("num_blocks", 0)) * fig.params[c].get("block_frozen_bytes", 0)
         for c in resident if c in EXPERTS), default=0,
    )  # fmt: skip
    notes = []
    world = ex.gpus
    gpu: dict[str, int] = {}
    host: dict[str, int] = {"idle experts": host_frozen}
    if k > 0:
        frozen -= sum(streamed[c] for c in resident if c in EXPERTS)
        host["streamed blocks (model.offload_blocks)"] = sum(streamed[c] for c in resident if c in EXPERTS)
    if host_frozen and len(resident_experts) < len([c for c in components if c in EXPERTS]):
        # objective.idle_expert=host: every expert keeps one host copy for the run (training.residency), the active
        # one's included (a switch only drops the GPU copy); its streamed blocks are the streamer's copy
        host["active expert's host copy (expert residency)"] = sum(
            fig.params[c]["frozen_bytes"] - streamed.get(c, 0) for c in resident_experts
        )
    if ex.zero_stage == 3:
        numel = sum(fig.params[c]["frozen_numel"] for c in resident)
        active = sum(fig.params[c]["frozen_numel"] for c in components if c not in EXPERTS or c == fig.expert)
        live = _ds_int(ex, "stage3_max_live_parameters", DEEPSPEED_LIVE_DEFAULT)
        live += _ds_int(ex, "stage3_prefetch_bucket_size", DEEPSPEED_PREFETCH_DEFAULT)
        elem = frozen / max(numel, 1)
        partition = round(frozen / world)
        working = round(min(live, active) * elem)
        if ex.offload("param"):
            host["frozen base partition (offload_param)"] = partition
            partition = 0
        gpu["frozen base (ZeRO-3 partition)"] = partition
        gpu["frozen base (gathered working set)"] = working
        notes.append(
            f"ZeRO-3: each GPU holds 1/{world} of the base plus at most {live / 1e9:.2f}B gathered elements "
            "(stage3_max_live_parameters + stage3_prefetch_bucket_size)"
        )
    else:
        gpu["frozen base"] = frozen
        if k > 0:
            gpu["streamed blocks in flight"] = in_flight
    n = sum(p["trainable_numel"] for p in fig.params.values())
    size = fig.trainable_dtype_bytes
    if ex.zero_stage == 0:
        gpu["adapters"] = n * size
        gpu["adapter gradients"] = n * size
        gpu["optimizer state (AdamW m, v fp32)"] = n * ADAM_MOMENT_BYTES
    else:
        # DeepSpeed keeps fp32 master copies of bf16 parameters and their gradients
        master = 8 if size < 4 else 0
        gpu["adapters"] = n * size // (world if ex.zero_stage == 3 else 1)
        gpu["adapter gradients (partitioned)"] = n * size // world
        optimizer = n * (master + ADAM_MOMENT_BYTES) // world
        if ex.offload("optimizer"):
            host["optimizer state (offload_optimizer)"] = optimizer
            optimizer = 0
        gpu["optimizer (fp32 master + grad, AdamW m, v; partitioned)"] = optimizer
    gpu["activation peak"] = fig.activation_peak
    if fig.offloaded_activation_peak:
        host["offloaded activations (model.activation_offload)"] = fig.offloaded_activation_peak
    return MemoryPlan(gpu, host, resident, notes)


def advice(
    plan: MemoryPlan, fig: StepFigures, ex: Execution, cfg, shape: ClipShape, gpu_bytes: float
) -> list[str]:
    """Settings that lower the per-GPU total, largest estimated effect first; only keys the config has. Weight and
    optimizer effects are re-planned exactly; activation effects are scaled from the measured peak (re-plan to
    confirm)."""
    options: list[tuple[float, str]] = []
    zero3 = ex.ds_config if ex.zero_stage == 3 else {"zero_optimization": {"stage": 3}}
    for gpus in (2, 4, 8, 16, 32):
        if gpus <= ex.gpus or gpus % ex.sp:
            continue
        total = plan_memory(fig, dataclasses.replace(ex, ds_config=zero3, gpus=gpus), cfg).total
        if total <= gpu_bytes or gpus == 32:
            options.append(
                (
                    plan.total - total,
                    f"deepspeed=zero3 on {gpus} GPUs (--gpus {gpus}): base and optimizer "
                    f"partitioned 1/{gpus}, {(plan.total - total) / GB:.0f} GB less",
                )
            )
            break
    loaded_experts = [c for c in fig.params if c in EXPERTS]
    if len(loaded_experts) > 1:
        trained = [c for c in loaded_experts if fig.params[c]["trainable_numel"]] or loaded_experts
        keep = trained[-1]
        alone = dataclasses.replace(
            fig, params={c: v for c, v in fig.params.items() if c not in EXPERTS or c == keep}
        )
        saving = plan.total - plan_memory(alone, ex, cfg, f"only:{keep}").total
        options.append(
            (
                saving,
                f"objective.expert=only:{keep} (the other expert is never loaded): {saving / GB:.0f} GB less",
            )
        )
    act = plan.parts["activation peak"]
    if not cfg.model.activation_checkpointing:
        options.append(
            (
                0.8 * act,
                "model.activation_checkpointing=true (blocks recomputed in backward): most of "
                f"the {act / GB:.0f} GB of activations; re-plan to see the figure",
            )
        )
    video_share = fig.video_tokens / (fig.video_tokens + fig.audio_tokens)
    if ex.sp < 8:
        sp = 2 * ex.sp
        saving = act * video_share * (1 - ex.sp / sp)
        options.append(
            (
                saving,
                f"parallel.sequence_parallel_size={sp} (--sp {sp}; GPUs a multiple of {sp}): video "
                f"tokens split {sp} ways, about {saving / GB:.0f} GB less",
            )
        )
    if shape.frames > 17:
        fewer = (shape.frames - 1) // 8 * 4 + 1
        saving = act * video_share * (1 - fewer / shape.frames)
        options.append(
            (
                saving,
                f"--frames {fewer} (clips prepared at {fewer} frames, data_tools prepare): about "
                f"{saving / GB:.0f} GB less",
            )
        )
    options.sort(key=lambda o: -o[0])
    return [text for _, text in options]


def build_report(fig: StepFigures, ex: Execution, cfg, shape: ClipShape, gpu_memory_gb: float, *,
                 seconds: float, model_name: str) -> dict:  # fmt: skip
    plan = plan_memory(fig, ex, cfg)
    gas = cfg.trainer.gradient_accumulation_steps
    gpu_bytes = gpu_memory_gb * GB
    report = {
        "model": model_name,
        "clip": {"frames": shape.frames, "height": shape.height, "width": shape.width, "batch": shape.batch,
                 "video_tokens_per_gpu": fig.video_tokens, "audio_tokens": fig.audio_tokens},
        "gpus": ex.gpus, "sequence_parallel": ex.sp, "data_parallel": ex.dp, "zero_stage": ex.zero_stage,
        "mixed_precision": ex.mixed_precision, "cuda_autocast_emulated": ex.cuda_autocast,
        "activation_checkpointing": bool(cfg.model.activation_checkpointing),
        "expert_simulated": fig.expert, "resident_components": plan.resident,
        "memory_bytes": dict(plan.parts), "total_bytes": plan.total,
        "total_gb": plan.total / GB, "total_gib": plan.total / GIB,
        "gpu_memory_gb": gpu_memory_gb, "fits": plan.total <= gpu_bytes,
        "pinned_host_bytes": dict(plan.host_parts), "pinned_host_total_bytes": plan.host_total,
        "gradient_accumulation_steps": gas,
        # the step's first micro-step adds no gradient into .grad (zero_grad set them to None)
        "flops_per_step": fig.flops * gas,
        "non_matmul_bytes_per_step": fig.non_matmul_bytes * gas - fig.accumulate_bytes,
        "kernels_per_step": fig.kernels * gas - fig.accumulate_kernels,
        "matmul_kernels_per_step": fig.matmul_kernels * gas,
        "non_matmul_kernels_per_step": (fig.kernels - fig.matmul_kernels) * gas - fig.accumulate_kernels,
        "notes": plan.notes, "advice": [] if plan.total <= gpu_bytes else advice(plan, fig, ex, cfg, shape, gpu_bytes),
        "simulation_seconds": round(seconds, 1),
        "step": dataclasses.asdict(fig),  # one micro-step as measured (build_report can be re-run from it)
    }  # fmt: skip
    return report


def _scaled(value: float, unit: str) -> str:
    for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:,.2f} {prefix}{unit}"
    return f"{value:,.0f} {unit}"


def format_text(r: dict) -> str:
    c = r["clip"]
    lines = [
        f"mova-train plan: {r['model']}, {c['frames']} frames at {c['height']}x{c['width']}, batch {c['batch']} per GPU "
        f"({c['video_tokens_per_gpu']:,} video tokens per GPU, {c['audio_tokens']} audio tokens)",
        f"  {r['gpus']} GPU(s): data parallel {r['data_parallel']} x sequence parallel {r['sequence_parallel']}, "
        f"ZeRO stage {r['zero_stage'] or 'off'}, mixed precision {r['mixed_precision']}"
        f"{' (CUDA autocast emulated)' if r['cuda_autocast_emulated'] else ''}, activation checkpointing "
        f"{'on' if r['activation_checkpointing'] else 'off'}; simulated expert {r['expert_simulated']}; "
        f"on the GPU: {', '.join(r['resident_components'])}",
        "",
        "Per GPU:",
    ]
    for name, value in r["memory_bytes"].items():
        lines.append(f"  {name:<58} {value / GB:9.3f} GB {value / GIB:9.3f} GiB")
    lines.append(f"  {'total':<58} {r['total_gb']:9.3f} GB {r['total_gib']:9.3f} GiB "
                 f"({'fits' if r['fits'] else 'does NOT fit'} in {r['gpu_memory_gb']:g} GB)")  # fmt: skip
    lines.append(f"Pinned host RAM per rank: {r['pinned_host_total_bytes'] / GB:.2f} GB" + "".join(
        f"; {k} {v / GB:.2f} GB" for k, v in r["pinned_host_bytes"].items() if v))  # fmt: skip
    lines.append(
        f"Per optimizer step per GPU ({r['gradient_accumulation_steps']} micro-step(s)): "
        f"{_scaled(r['flops_per_step'], 'FLOP')} (forward + backward + recompute), "
        f"{_scaled(r['non_matmul_bytes_per_step'], 'B')} moved by non-matmul ops, "
        f"{r['kernels_per_step']:,} kernels ({r['matmul_kernels_per_step']:,} matmul/attention, "
        f"{r['non_matmul_kernels_per_step']:,} others)"
    )
    lines += [f"Note: {n}" for n in r["notes"]]
    lines.append(
        "Tensor bytes only: add 1-3 GB for the CUDA context, NCCL buffers and allocator fragmentation."
    )
    if r["advice"]:
        lines.append("To fit, change (largest effect first):")
        lines += [f"  - {a}" for a in r["advice"]]
    lines.append(f"(simulated in {r['simulation_seconds']:.0f} s)")
    return "\n".join(lines)


def format_json(r: dict) -> str:
    return json.dumps(r, indent=1, sort_keys=False)
