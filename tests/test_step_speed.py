"""Step speed on CPU: one host sync per optimizer step (counted), the attention backend choice, and compiled blocks
that match eager outputs and LoRA gradients."""

from __future__ import annotations

import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from mova_train.errors import ConfigValueError
from mova_train.lora import LoraConfig, apply_lora, randomize_lora
from mova_train.models import build_mova, get_model_config, layers, set_activation_checkpointing
from mova_train.models.compile import check_compile_precision, compile_blocks
from mova_train.training.config import ModelConfig
from mova_train.training.trainer import Trainer, to_train_config, validate_config
from tests.train_utils import compose_train, tiny_overrides

pytestmark = pytest.mark.usefixtures("fresh_accelerate")  # tests/conftest.py


class DeviceReads(TorchDispatchMode):
    """Counts the host reads of values computed on the training device. On a CPU every tensor is a host tensor,
    so "computed on the device" is tracked instead: a tensor is device-derived when it is a root (the model's
    parameters, a batch moved to the device) or the output of an op with a device-derived input. A read is
    `_local_scalar_dense` (item, float, bool, int) or `tolist`/`numpy` of a device-derived tensor; reads of values
    that never touched the device (timesteps drawn on the CPU, RoPE positions) are no device syncs and not counted.
    """

    def __init__(self):
        super().__init__()
        self.derived = WeakIdKeyDictionary()
        self.reads: list[str] = []

    def mark(self, *tensors: torch.Tensor) -> None:
        for t in tensors:
            self.derived[t] = True

    def is_derived(self, t) -> bool:
        return isinstance(t, torch.Tensor) and t in self.derived

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        derived = any(self.is_derived(a) for a in tree_flatten((args, kwargs))[0])
        if derived and func is torch.ops.aten._local_scalar_dense.default:
            self.reads.append(str(func))
        out = func(*args, **kwargs)
        if derived:
            self.mark(*(o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)))
        return out


@pytest.fixture
def device_reads(monkeypatch):
    mode = DeviceReads()
    for name in ("tolist", "numpy"):  # host reads that do not go through the dispatcher
        original = getattr(torch.Tensor, name)

        def read(self, *args, _original=original, _name=name, **kwargs):
            if mode.is_derived(self):
                mode.reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, read)
    return mode


@pytest.mark.parametrize("gas", [1, 3])
def test_one_host_sync_per_optimizer_step(tiny_checkpoint, two_clips, tmp_path, device_reads, gas):
    cfg = compose_train(
        tiny_overrides(
            tiny_checkpoint, two_clips, tmp_path / "run", "trainer.max_steps=4", "data.batch_size=1",
            f"trainer.gradient_accumulation_steps={gas}", "objective.independent_audio_timestep=true",
        )
    )  # fmt: skip
    trainer = Trainer(validate_config(to_train_config(cfg)))
    trainer.setup()
    try:
        next_batch = trainer.next_batch

        def marked_batch():
            batch = next_batch()
            device_reads.mark(batch.video, batch.first_frame, batch.audio, batch.text, batch.text_lengths)
            return batch

        trainer.next_batch = marked_batch
        device_reads.mark(*trainer.model.parameters())
        with device_reads:
            # the counter sees a read of a device value: it is not vacuous
            float(next(p for p in trainer.model.parameters() if p.requires_grad).detach().sum())
            assert device_reads.reads == ["aten._local_scalar_dense.default"]
            per_step = []
            for _ in range(2):
                device_reads.reads.clear()
                row = trainer.train_step()
                per_step.append(list(device_reads.reads))
        assert per_step == [["tolist"], ["tolist"]]
        assert len(row["timesteps"][0]) == gas and len(row["timesteps_audio"][0]) == gas
        assert row["grad_norm"] > 0 and not row["skipped"] and len(row["experts"]) == gas
    finally:
        trainer.finish()
        trainer.checkpointer.close()


BASE_COMPONENTS = ("video_dit_2", "audio_dit", "dual_tower_bridge")
LORA = LoraConfig(
    rank=4, alpha=8.0,
    targets={"video_dit_2": ["self_attn", "ffn"], "audio_dit": ["self_attn"], "dual_tower_bridge": ["bridge_a2v"]},
)  # fmt: skip


def lora_model(compiled: bool, checkpointing: bool):
    model = build_mova(get_model_config("tiny"), device="cpu", seed=0, components=BASE_COMPONENTS)
    torch.manual_seed(0)
    apply_lora(model, LORA)
    randomize_lora(model, seed=1)  # lora_B is zero at init: its gradients would not reach lora_A
    set_activation_checkpointing(model, enabled=checkpointing)
    if compiled:
        # the video tower's blocks only: one graph, forward and backward, within the time budget (the whole model
        # compiles 4 graphs; MOVA_COMPILE_TEST_BACKEND=inductor MOVA_COMPILE_TEST_ALL=1 runs that)
        part = model if os.environ.get("MOVA_COMPILE_TEST_ALL") == "1" else model.video_dit_2
        assert compile_blocks(part, backend=COMPILE_BACKEND) == (4 + 3 + 2 * 3 if part is model else 4)
        assert compile_blocks(part) == 0  # idempotent
    return model


# Graph capture (Dynamo + AOTAutograd, forward and backward, through PEFT LoRA and activation checkpointing) is what
# can go wrong and what this test checks; inductor's C++ code generation on top takes ~90 s per block on two busy
# CPU cores (587 s for this test), far over the suite's budget, so the suite runs `aot_eager`.
# MOVA_COMPILE_TEST_BACKEND=inductor runs the same test with inductor (it passes at this tolerance).
COMPILE_BACKEND = os.environ.get("MOVA_COMPILE_TEST_BACKEND", "aot_eager")


def test_compiled_blocks_match_eager_outputs_and_lora_gradients():
    """Compiled blocks with PEFT LoRA and activation checkpointing: the same outputs and adapter gradients as
    eager within 1e-5 relative (fp32; inductor's fusion reorders a few reductions), the same state dict keys."""
    g = torch.Generator().manual_seed(0)
    inputs = dict(
        video_latents=torch.randn(2, 16, 2, 4, 4, generator=g), video_cond=torch.randn(2, 20, 2, 4, 4, generator=g),
        audio_latents=torch.randn(2, 128, 6, generator=g), text=torch.randn(2, 7, 32, generator=g),
        timestep_video=torch.tensor([512.0, 300.0]), expert="video_dit_2",
    )  # fmt: skip
    results = []
    for compiled in (False, True):
        model = lora_model(compiled, checkpointing=compiled)
        pred_video, pred_audio = model(**inputs)
        (pred_video.square().mean() + pred_audio.square().mean()).backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        results.append((pred_video.detach(), pred_audio.detach(), grads, set(model.state_dict())))
    (ev, ea, eg, ekeys), (cv, ca, cg, ckeys) = results
    # half precision on CPU is refused: inductor's CPU code gets its LoRA gradients wrong there (README: Speed)
    with pytest.raises(ValueError, match=r"model.compile=true on CPU in bf16: .* use model.compile=false"):
        check_compile_precision("cpu", half=True)
    check_compile_precision("cpu", half=False)
    check_compile_precision("cuda", half=True)
    assert ckeys == ekeys and set(cg) == set(eg) and len(eg) > 0
    torch.testing.assert_close(cv, ev, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ca, ea, rtol=1e-5, atol=1e-6)
    for name in eg:
        assert eg[name].abs().sum() > 0, name
        torch.testing.assert_close(cg[name], eg[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.fixture
def restore_kernel(monkeypatch):
    monkeypatch.setattr(layers, "_attention_kernel", None)  # restored afterwards, whatever the test set


def test_attention_kernel_choice_and_one_line_errors(restore_kernel, monkeypatch, caplog):
    assert layers.available_attention_kernels("cpu") == ["sdpa"]
    assert layers.set_attention_backend("auto", "cpu") == "sdpa"
    for name in ("fa3", "fa2", "cudnn"):
        with pytest.raises(
            ValueError, match=rf"model.attention='{name}' cannot run on cpu here \(usable: sdpa;"
        ) as e:
            layers.set_attention_backend(name, "cpu")
        assert "\n" not in str(e.value)
    with pytest.raises(
        ValueError, match="model.attention='flash' unknown; allowed: auto, fa3, fa2, cudnn, sdpa"
    ):
        layers.set_attention_backend("flash", "cpu")
    with pytest.raises(ConfigValueError, match="model.attention"):
        ModelConfig(checkpoint="ckpt", attention="flash").validate()
    with pytest.raises(ConfigValueError, match="model.compile"):
        ModelConfig(checkpoint="ckpt", compile="yes").validate()

    # the order `auto` follows on GPUs (the hardware queries answered as a Hopper / an Ampere / a Turing GPU would)
    with monkeypatch.context() as gpu:
        gpu.setattr(torch.cuda, "is_available", lambda: True)
        gpu.setattr(torch.backends.cudnn, "version", lambda: 90100)
        gpu.setattr(torch.backends.cudnn, "is_available", lambda: True)
        gpu.setattr(layers, "_fa3_func", object())
        for capability, expected in (
            ((9, 0), ["fa3", "cudnn", "fa2"]),
            ((8, 0), ["fa2", "cudnn"]),
            ((7, 5), []),
        ):
            gpu.setattr(torch.cuda, "get_device_capability", lambda device, c=capability: c)
            assert layers.available_attention_kernels("cuda:0") == [*expected, "sdpa"]
        gpu.setattr(layers, "_fa3_func", None)
        gpu.setattr(torch.cuda, "get_device_capability", lambda device: (9, 0))
        assert layers.available_attention_kernels("cuda") == ["cudnn", "fa2", "sdpa"]
        assert layers.set_attention_backend("auto", "cuda") == "cudnn"

    # a GPU kernel chosen, CPU fp32 tensors given: SDPA runs, the same values, and the log says so once
    monkeypatch.setattr(layers, "_attention_kernel", "cudnn")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 5, 3, 8, generator=g) for _ in range(3))  # [B, L, H, d]
    reference = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) / 8**0.5, dim=-1)
    reference = torch.einsum("bhqk,bkhd->bqhd", reference, v).reshape(2, 5, 24)
    with caplog.at_level("INFO", logger=layers.logger.name):
        for _ in range(2):
            torch.testing.assert_close(layers.attention(q, k, v), reference)
    ran = [r.getMessage() for r in caplog.records if r.getMessage().startswith("attention kernel")]
    assert ran == ["attention kernel: sdpa (cudnn needs fp16/bf16 CUDA tensors; got torch.float32 on cpu)"]
