"""Small-GPU modes on the tiny model, on CPU: block streaming (`model.offload_blocks`) is bit-identical to a resident
base, forward and backward, with and without activation checkpointing, and holds at most two streamed blocks at
once; the float8 base (`model.base_dtype=fp8`) stays within a stated tolerance of the full-precision base; both
train, resume exactly and export through the trainer; bad settings get one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft.tuners.lora import LoraLayer

from mova_train.config import validate_config
from mova_train.errors import ConfigValueError
from mova_train.lora import LoraConfig, apply_lora, load_adapters, lora_parameters, randomize_lora
from mova_train.lora.export import export_adapter
from mova_train.models import build_mova, set_activation_checkpointing
from mova_train.models.fp8 import FP8_DTYPE, Fp8Linear, apply_fp8_base, quantize_fp8
from mova_train.models.streaming import apply_block_streaming, host_data
from mova_train.training.checkpoint import ResumeError
from mova_train.training.config import ModelConfig
from mova_train.training.synthetic import write_random_shards_for
from mova_train.training.trainer import run, to_train_config
from tests.train_utils import compose_train, read_metrics, reset_accelerate, tiny_overrides

LORA = LoraConfig(
    rank=4,
    alpha=4.0,
    targets={
        "video_dit": ["self_attn", "ffn"],
        "audio_dit": ["self_attn"],
        "dual_tower_bridge": ["bridge_a2v"],
    },
)
# fp8 e4m3 keeps 3 mantissa bits (each weight within 2^-4 of its value, relative). Measured on the tiny model against
# the bf16 base: loss 0.14%, LoRA gradients 5.1% (norm of the difference over the norm); bf16 itself is 2.0% and 36%
# from fp32 there (README "Small GPUs: block streaming and fp8").
FP8_LOSS_RTOL = 0.01
FP8_GRAD_RTOL = 0.10


@pytest.fixture(autouse=True)
def _one_thread():
    """One thread per test process, as the other in-process model tests: on a shared 2-core machine more threads
    only wait for each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _inputs(b: int = 2, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(
        video_latents=torch.randn(b, 16, 3, 4, 6, generator=g),
        video_cond=torch.randn(b, 20, 3, 4, 6, generator=g),
        audio_latents=torch.randn(b, 128, 9, generator=g),
        text=torch.randn(b, 7, 32, generator=g),
        timestep_video=torch.tensor([950.0, 312.5])[:b],
    )


def _model(*, offload: int = 0, fp8: bool = False, checkpointing: bool = False, dtype=torch.float32):
    components = ("video_dit", "audio_dit", "dual_tower_bridge")
    model = build_mova("tiny", components=components, device="cpu", seed=0, dtype=dtype)
    if fp8:
        apply_fp8_base(model)
    streamer = apply_block_streaming(model, offload, "cpu") if offload else None
    apply_lora(model, LORA)
    randomize_lora(model, seed=3)  # B != 0, so every LoRA parameter gets a gradient
    set_activation_checkpointing(model, checkpointing)
    return model.train(), streamer


def _loss_and_grads(model) -> tuple[torch.Tensor, list[torch.Tensor]]:
    pv, pa = model(**_inputs(), expert="video_dit")
    loss = pv.float().square().mean() + pa.float().square().mean()
    loss.backward()
    grads = [p.grad.clone() for p in lora_parameters(model)]
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("checkpointing", [False, True])
def test_streamed_blocks_are_bit_identical_to_resident_and_only_in_flight_ones_are_held(checkpointing):
    resident, _ = _model(checkpointing=checkpointing)
    streamed, streamer = _model(offload=3, checkpointing=checkpointing)
    assert len(streamer.blocks) == 3 and streamer.blocks[0].module is streamed.video_dit.blocks[1]
    # LoRA parameters of streamed blocks stay resident; their frozen weights are placeholders between uses
    q = streamed.video_dit.blocks[3].self_attn.q
    assert isinstance(q, LoraLayer) and q.lora_A["default"].weight.numel() > 0
    assert q.base_layer.weight.numel() == 0 and host_data(q.base_layer.weight).shape == (96, 96)

    want_loss, want_grads = _loss_and_grads(resident)
    for _ in range(2):  # a second step reuses the same hooks and host copies
        loss, grads = _loss_and_grads(streamed)
        assert torch.equal(loss, want_loss)
        assert all(torch.equal(g, w) for g, w in zip(grads, want_grads, strict=True))
        assert streamer.resident == [] and not streamer.in_backward  # everything released after backward
        assert all(p.numel() == 0 for block in streamer.blocks for p in block.params)
    assert streamer.max_resident == 2  # the block in use and the one being prefetched

    # a backward that fails half-way (an out-of-memory error, say) leaves nothing behind for the next step
    def fail(grad):
        raise RuntimeError("failed on purpose")

    def fail_in_backward(module, args, output):
        output.register_hook(fail)

    handle = streamed.video_dit.blocks[2].register_forward_hook(fail_in_backward)
    pv, pa = streamed(**_inputs(), expert="video_dit")
    handle.remove()
    with pytest.raises(RuntimeError, match="on purpose"):
        (pv.square().mean() + pa.square().mean()).backward()
    assert streamer.in_backward and streamer.resident  # its end-of-backward callback never ran
    streamed.zero_grad(set_to_none=True)
    loss, grads = _loss_and_grads(streamed)
    assert torch.equal(loss, want_loss) and all(
        torch.equal(g, w) for g, w in zip(grads, want_grads, strict=True)
    )
    assert streamer.resident == [] and streamer.max_resident == 2
    with torch.no_grad():  # evaluation: no backward, released after each forward
        pv, _ = streamed(**_inputs(), expert="video_dit")
        assert torch.equal(pv, resident(**_inputs(), expert="video_dit")[0])
    assert streamer.resident == []


def test_fp8_base_is_float8_with_scales_and_within_tolerance_of_full_precision():
    w = torch.randn(64, 32, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 1, 64)[:, None]
    q, scale = quantize_fp8(w)
    assert q.dtype == FP8_DTYPE and scale.shape == (64, 1)
    assert q.float().abs().amax(dim=1).eq(448.0).all()  # each row uses the full e4m3 range
    torch.testing.assert_close(
        q.float() * scale, w, rtol=2**-4, atol=0
    )  # 3 mantissa bits, per row, no underflow

    bf16, _ = _model(dtype=torch.bfloat16)
    fp8, _ = _model(fp8=True, dtype=torch.bfloat16)
    linears = [m for m in fp8.video_dit.blocks[0].modules() if isinstance(m, Fp8Linear)]
    assert len(linears) == 10 and all(m.weight.dtype == FP8_DTYPE for m in linears)  # q k v o x2, ffn x2
    assert all(m.compute_dtype == torch.bfloat16 for m in linears)
    assert fp8.video_dit.head.head.weight.dtype == torch.bfloat16  # embeddings and heads keep model.dtype
    # PEFT wraps the fp8 linear; the adapters are fp32 as on any base, never float8
    assert all(p.dtype == torch.float32 for p in lora_parameters(fp8))

    def rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
        diff = torch.cat([(x - y).flatten() for x, y in zip(a, b, strict=True)])
        return float(
            torch.linalg.vector_norm(diff) / torch.linalg.vector_norm(torch.cat([y.flatten() for y in b]))
        )

    want_loss, want_grads = _loss_and_grads(bf16)
    loss, grads = _loss_and_grads(fp8)
    assert 0 < abs(float(loss / want_loss) - 1) < FP8_LOSS_RTOL
    assert 0 < rel(grads, want_grads) < FP8_GRAD_RTOL
    # for scale: fp8 moves the LoRA gradients less than bf16 itself moves them from fp32
    _, fp32_grads = _loss_and_grads(_model()[0])
    assert rel(grads, want_grads) < rel(want_grads, fp32_grads)
    # streaming an fp8 base is exact too
    streamed, _ = _model(fp8=True, offload=2, checkpointing=True, dtype=torch.bfloat16)
    loss2, grads2 = _loss_and_grads(streamed)
    assert torch.equal(loss2, loss) and all(torch.equal(a, b) for a, b in zip(grads2, grads, strict=True))


def test_training_with_streaming_and_fp8_resumes_exactly(tiny_checkpoint, tmp_path_factory):
    """Through the trainer: offload + fp8 + checkpointing, interrupted after 2 of 4 steps and resumed, gives the
    uninterrupted run's losses; streaming alone gives the resident run's losses bit for bit."""
    shards = write_random_shards_for(tiny_checkpoint, tmp_path_factory.mktemp("clip"), num_clips=1)
    tmp = tmp_path_factory.mktemp("runs")

    def losses(name: str, *extra: str, steps: int = 4, budget: int | None = None) -> list[float]:
        reset_accelerate()
        overrides = tiny_overrides(
            tiny_checkpoint, shards, tmp / name, f"trainer.max_steps={steps}", "trainer.save_every=100"
        )
        if budget:
            overrides.append(f"trainer.max_steps_per_run={budget}")
        run(compose_train([*overrides, *extra]))
        reset_accelerate()
        return [r["loss"] for r in read_metrics(tmp / name)]

    # every memory mode at once (gpu24's set, and a 2-step expert phase that the resume lands in the middle of)
    both = (
        "model.offload_blocks=2", "model.base_dtype=fp8", "model.activation_checkpointing=true",
        "model.activation_offload=true", "objective.expert_switch_every=2", "objective.idle_expert=host",
    )  # fmt: skip
    full = losses("full", *both)
    losses("resumed", *both, budget=1)
    assert losses("resumed", *both) == full
    with pytest.raises(ResumeError, match="model_base_dtype"):  # fp8 is part of what a resume must keep
        losses("resumed", *[o for o in both if "base_dtype" not in o], steps=6)
    with pytest.raises(ResumeError, match="model_precision: checkpoint has None, this run has 'reference'"):
        losses("resumed", *both, "model.precision=reference", steps=6)  # so is the precision (its bf16 bits)
    # blocks 1-3 of both experts streamed (a step of each; block 1 follows a bridge layer); the frozen-base check
    # hashes the host copies
    streamed = losses("streamed", "model.offload_blocks=3", "trainer.verify_frozen_base=true", steps=2)
    assert streamed == losses("resident", steps=2)
    final = [
        load_adapters(tmp / name / "checkpoints" / "step-00000002" / "adapter")[0]
        for name in ("streamed", "resident")
    ]
    assert final[0].keys() == final[1].keys() and all(torch.equal(final[0][k], final[1][k]) for k in final[0])
    # the adapters export as from any run (export reads only them); merged export merges into the base on disk
    for fmt in ("peft", "diffsynth"):
        assert export_adapter(tmp / "full", tmp / fmt, fmt)
    # and the sampler renders with them on the plain base (the memory modes are training settings)
    from mova_train.cli.sample import main as sample

    argv = ["--checkpoint", str(tiny_checkpoint), "--prompt", "a drum hit", "--frames", "5", "--size", "16x32",
            "--steps", "1", "--seed", "0", "--quiet", "--grey-reference", "--lora", str(tmp / "peft")]  # fmt: skip
    assert sample([*argv, "--out", str(tmp / "render")]) == 0
    (record,) = json.loads((tmp / "render" / "renders.json").read_text())["renders"]
    assert Path(record["mp4"]).stat().st_size > 0


def test_bad_settings_get_one_line_errors(tiny_checkpoint, tmp_path):
    def message(model: ModelConfig, **cross) -> str:
        with pytest.raises(ConfigValueError) as e:
            model.validate()
            model.check_memory_modes(**{"deepspeed": False, "use_dora": False, **cross})
        assert "\n" not in str(e.value)
        return str(e.value)

    assert "model.offload_blocks" in message(ModelConfig(checkpoint="c", offload_blocks=-1))
    assert "model.base_dtype" in message(ModelConfig(checkpoint="c", base_dtype="fp4"))
    assert "DeepSpeed" in message(ModelConfig(checkpoint="c", offload_blocks=2), deepspeed=True)
    assert "lora.use_dora" in message(ModelConfig(checkpoint="c", base_dtype="fp8"), use_dora=True)
    # validate_config runs the cross-check before anything starts
    overrides = tiny_overrides(
        tiny_checkpoint, tmp_path, tmp_path / "r", "model.offload_blocks=1", "deepspeed=zero3"
    )
    with pytest.raises(ConfigValueError, match="model.offload_blocks=1 is not supported with DeepSpeed"):
        validate_config(to_train_config(compose_train(overrides)))
    with pytest.raises(ValueError, match="model.offload_blocks=5 is more than the 4 blocks of video_dit"):
        apply_block_streaming(build_mova("tiny", components=("video_dit",), device="cpu", seed=0), 5, "cpu")
