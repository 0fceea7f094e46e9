"""The memory planner (`python -m mova_train.plan`): its activation peak against a real CPU micro-step measured by the
torch profiler's allocation events, the CLI's fields and JSON, sequence parallel, and one-line errors."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch._C._profiler import _EventType

from mova_train.config import compose_config, to_train_config
from mova_train.models.config import get_model_config
from mova_train.plan.__main__ import main
from mova_train.plan.report import format_text, plan_memory
from mova_train.plan.simulate import (
    ClipShape,
    Execution,
    FlowMatchingObjective,
    FlowMatchScheduler,
    build_planned_model,
    run_micro_step,
    simulate_step,
)

FP32 = Execution(mixed_precision="no", ds_config=None, gpus=1, sp=1)
# 1,728 video tokens of width 256 through one layer of each tower: activations dominate the tiny weights
MID_SHAPE = ClipShape(frames=33, height=192, width=256)


def mid_config():
    tiny = get_model_config("tiny")
    video = dataclasses.replace(tiny.video_dit, dim=256, num_heads=8, ffn_dim=512, num_layers=1)
    audio = dataclasses.replace(tiny.audio_dit, dim=128, num_heads=4, ffn_dim=256, num_layers=1)
    bridge = dataclasses.replace(
        tiny.dual_tower_bridge, visual_layers=1, audio_layers=1, visual_hidden_dim=256, audio_hidden_dim=128
    )
    return dataclasses.replace(tiny, video_dit=video, audio_dit=audio, dual_tower_bridge=bridge, name="mid")


@pytest.fixture(scope="module")
def mid_cfg():
    overrides = [
        "model=tiny",
        "lora=tiny",
        "trainer.mixed_precision=no",
        "model.activation_checkpointing=true",
    ]
    return to_train_config(compose_config(overrides))


@pytest.fixture(scope="module")
def mid_plan(mid_cfg):
    return simulate_step(mid_cfg, mid_config(), FP32, MID_SHAPE)


def measured_peak(cfg, config, shape: ClipShape) -> int:
    """Peak bytes of live CPU allocations during one real micro-step, from the profiler's allocation events (the
    trainer's model, built and initialised for real; gradients allocated beforehand, as the planner assumes)."""
    torch.manual_seed(0)
    model = build_planned_model(cfg, config, FP32)
    model.to_empty(device="cpu")
    from mova_train.models.mova import init_weights_

    init_weights_(model)
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.02)
            p.grad = torch.zeros_like(p)
    objective = FlowMatchingObjective(
        cfg.objective, FlowMatchScheduler.from_config(config.scheduler), config.boundary_timestep, 0
    )
    t, h, w = shape.latent_grid()
    _, audio_tokens = shape.tokens(config)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the allocations do not depend on it; a shared CI machine runs it faster
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        inputs = objective.prepare(
            torch.randn(1, 16, t, h, w), torch.randn(1, 16, t, h, w), torch.randn(1, 128, audio_tokens),
            torch.randn(1, config.text_len, config.text_dim), micro_step=0, generator=torch.Generator().manual_seed(0),
        )  # fmt: skip
        run_micro_step(model, objective, inputs, FP32, cfg, shape.fps)
        del inputs
    torch.set_num_threads(threads)
    allocations = sorted(
        (
            n
            for n in _walk(prof.profiler.kineto_results.experimental_event_tree())
            if n.tag == _EventType.Allocation
        ),
        key=lambda n: n.start_time_ns,
    )
    assert len(allocations) > 100, "the profiler recorded no allocations"
    first = allocations[0].extra_fields
    # total_allocated: the CPU allocator's own running count of live bytes, after each allocation or free
    return max(n.extra_fields.total_allocated for n in allocations) - (
        first.total_allocated - first.alloc_size
    )


def _walk(nodes):
    for node in nodes:
        yield node
        yield from _walk(node.children)


def test_activation_peak_matches_a_real_micro_step(mid_cfg, mid_plan):
    real = measured_peak(mid_cfg, mid_config(), MID_SHAPE)
    planned = mid_plan.activation_peak
    assert real > 20e6  # activations dominate: the comparison means something
    assert abs(planned - real) <= 0.15 * real, f"planned {planned / 1e6:.1f} MB, measured {real / 1e6:.1f} MB"


def test_sequence_parallel_halves_the_video_activations(mid_cfg, mid_plan):
    """Two ranks of a sequence-parallel group: each holds half the video tokens (Ulysses' exchanges modelled as new
    tensors of the exchanged shapes); the audio tower, a few tokens here, runs whole on both."""
    split = simulate_step(mid_cfg, mid_config(), dataclasses.replace(FP32, gpus=2, sp=2), MID_SHAPE)
    assert split.video_tokens == mid_plan.video_tokens // 2
    ratio = split.activation_peak / mid_plan.activation_peak
    assert 0.4 < ratio < 0.65, ratio
    assert split.flops < 0.6 * mid_plan.flops  # the video tower's matmuls and attention halve


def test_cli_prints_every_figure_and_json_adds_up(capsys):
    argv = [
        "model=tiny",
        "model.activation_checkpointing=true",
        "--gpus",
        "2",
        "--gpu-memory",
        "0.001",
        "--json",
    ]
    assert main(argv) == 0  # CUDA autocast emulated (bf16 on a GPU), recomputed blocks
    report = json.loads(capsys.readouterr().out)
    parts = report["memory_bytes"]
    assert {"frozen base", "adapters", "adapter gradients", "activation peak"} <= set(parts)
    assert report["total_bytes"] == sum(parts.values()) > 0
    assert report["total_gb"] == pytest.approx(report["total_bytes"] / 1e9)
    assert report["total_gib"] == pytest.approx(report["total_bytes"] / 2**30)
    assert report["gpus"] == 2 and report["data_parallel"] == 2 and report["zero_stage"] == 0
    assert report["cuda_autocast_emulated"] and report["activation_checkpointing"]
    assert report["flops_per_step"] > 0 and report["non_matmul_bytes_per_step"] > 0
    assert report["kernels_per_step"] > report["matmul_kernels_per_step"] > 0
    assert not report["fits"] and report["advice"]  # 1 MB cannot hold it: settings to change, largest first
    assert any("deepspeed=zero3" in a for a in report["advice"])
    text = format_text(report)
    for needle in ("frozen base", "adapters", "activation peak", "total", "Pinned host RAM per rank", "FLOP (forward",
                   "moved by non-matmul ops", "kernels", "does NOT fit", "To fit, change"):  # fmt: skip
        assert needle in text, needle


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["model=tiny", "trainer.no_such_key=1"], "no_such_key"),
        (["model=no_such_model"], "no_such_model"),
        (["model=tiny", "--gpus", "0"], "--gpus"),
        (["model=tiny", "--gpus", "3", "--sp", "2"], "--sp 2"),
        (["model=tiny", "--frames", "10"], "--frames"),
        (["model=tiny", "optim.lr=-1"], "optim.lr"),
    ],
)
def test_bad_input_is_one_line(capsys, argv, needle):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and needle in err, err


def test_zero3_partitions_the_base_over_the_world(mid_plan, mid_cfg):
    """Weights and optimizer state from the model's parameters: ZeRO-3 holds 1/world of the base (plus the gathered
    working set), both loaded experts are resident today, and the activation peak does not depend on the world."""
    zero3 = {
        "zero_optimization": {
            "stage": 3,
            "stage3_max_live_parameters": 1000,
            "stage3_prefetch_bucket_size": 0,
        }
    }
    one, four = (
        plan_memory(mid_plan, Execution("bf16", zero3, gpus, 1), mid_cfg) for gpus in (1, 4)
    )  # fmt: skip
    assert set(one.resident) == set(mid_plan.params)  # both experts, the audio tower and the bridge
    base = sum(p["frozen_bytes"] for p in mid_plan.params.values())
    assert one.parts["frozen base (ZeRO-3 partition)"] == base
    assert four.parts["frozen base (ZeRO-3 partition)"] == round(base / 4)
    assert four.parts["frozen base (gathered working set)"] == 1000 * 4  # fp32 base: 1,000 live elements
    assert four.parts["activation peak"] == one.parts["activation peak"] == mid_plan.activation_peak
    assert four.total == sum(four.parts.values()) < one.total


def test_memory_modes_are_planned_through_the_trainers_code(mid_plan, mid_cfg):
    """Expert residency, block streaming, activation offload and fp8 move bytes where the trainer's code puts them:
    the residency rule and the streamer's block sizes for weights, the offload's real host copies (counted by the
    tracker) for activations, the float8 weights of `apply_fp8_base`."""
    plain = plan_memory(mid_plan, FP32, dataclasses.replace(mid_cfg, objective=dataclasses.replace(
        mid_cfg.objective, idle_expert="device")))  # fmt: skip
    experts = [c for c in mid_plan.params if c.startswith("video_dit")]
    assert len(experts) == 2 and set(plain.resident) == set(mid_plan.params) and not plain.host_total
    resident = plan_memory(mid_plan, FP32, mid_cfg)  # idle_expert=host (the default), no DeepSpeed
    idle = [c for c in experts if c != mid_plan.expert]
    assert resident.resident == [c for c in mid_plan.params if c not in idle]
    assert resident.host_parts["idle experts"] == mid_plan.params[idle[0]]["frozen_bytes"]
    assert (
        plain.parts["frozen base"] - resident.parts["frozen base"] == mid_plan.params[idle[0]]["frozen_bytes"]
    )

    block = mid_plan.params[mid_plan.expert]["block_frozen_bytes"]
    streamed_cfg = dataclasses.replace(mid_cfg, model=dataclasses.replace(mid_cfg.model, offload_blocks=1))
    streamed = plan_memory(mid_plan, FP32, streamed_cfg)
    assert streamed.parts["frozen base"] == resident.parts["frozen base"] - block
    assert streamed.parts["streamed blocks in flight"] == block  # the mid model has one block per tower
    assert streamed.host_parts["streamed blocks (model.offload_blocks)"] == block

    lean = dataclasses.replace(
        mid_cfg, model=dataclasses.replace(mid_cfg.model, activation_offload=True, base_dtype="fp8")
    )
    offloaded = simulate_step(lean, mid_config(), FP32, MID_SHAPE)
    video = mid_plan.params[mid_plan.expert]
    assert offloaded.offloaded_activation_peak > 0
    assert offloaded.activation_peak <= mid_plan.activation_peak - offloaded.offloaded_activation_peak // 2
    fp8_block = offloaded.params[mid_plan.expert]["block_frozen_bytes"]
    assert (
        fp8_block < 0.35 * video["block_frozen_bytes"]
    )  # the block's linears: fp32 -> float8 + fp32 row scales
    assert (
        plan_memory(offloaded, FP32, lean).host_parts["offloaded activations (model.activation_offload)"] > 0
    )


def test_recipes_are_planned_into_one_json_file(tmp_path, capsys):
    """`--recipes OUT` plans every configs/memory recipe at its GPU size (here on the tiny model) and writes what doctor
    reads; a missing folder is refused before any planning."""
    out = tmp_path / "plans.json"
    assert main(["model=tiny", "lora=tiny", "--recipes", str(out)]) == 0
    plans = json.loads(out.read_text())
    recipes = plans["recipes"]
    assert set(recipes) == {"gpu141", "gpu80", "gpu48", "gpu24"} and plans["model"] == "tiny"
    for name, r in recipes.items():
        assert r["gpu_memory_gb"] == int(name[3:]) and r["fits"]
        assert r["total_gb"] == pytest.approx(sum(r["memory_gb"].values()), abs=0.05)
    # what each recipe moves off the GPU: the idle expert (gpu80), streamed blocks (gpu48), float8 weights (gpu24)
    base = {n: r["memory_bytes"]["frozen base"] for n, r in recipes.items()}
    assert base["gpu141"] > base["gpu80"] > base["gpu48"] > base["gpu24"]
    assert not any(recipes["gpu141"]["pinned_host_bytes"].values())
    assert recipes["gpu80"]["pinned_host_bytes"]["idle experts"] > 0
    assert recipes["gpu48"]["pinned_host_bytes"]["offloaded activations (model.activation_offload)"] > 0
    # the step without a recipe (ZeRO-3 under +experiment=voice_lora; here the tiny model's plain run), with the
    # kernel and byte counts the README and tests/test_configs_compose.py quote
    plain = plans["base"]
    assert plain["gpu_memory_gb"] is None and plain["total_gb"] > 0
    assert (
        plain["kernels_per_step"]
        > plain["non_matmul_kernels_per_step"]
        > 0
        < plain["non_matmul_bytes_per_step"]
    )
    assert "+memory=gpu24:" in capsys.readouterr().out
    assert main(["model=tiny", "--recipes", str(tmp_path / "missing" / "plans.json")]) == 2
    assert "folder" in capsys.readouterr().err and not (tmp_path / "missing").exists()
