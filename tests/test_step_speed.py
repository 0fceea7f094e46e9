"""Step speed on CPU: one host sync per optimizer step (counted), the attention backend choice, and compiled blocks
that match eager outputs and LoRA gradients."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from mova_train.training.synthetic import write_random_shards_for
from mova_train.training.trainer import Trainer, to_train_config, validate_config
from tests.train_utils import compose_train, reset_accelerate, tiny_overrides


@pytest.fixture(scope="module")
def two_clips(tiny_checkpoint, tmp_path_factory):
    return write_random_shards_for(tiny_checkpoint, tmp_path_factory.mktemp("two_clips"), num_clips=2)


@pytest.fixture(autouse=True)
def _fresh_accelerate():
    reset_accelerate()
    yield
    reset_accelerate()


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
