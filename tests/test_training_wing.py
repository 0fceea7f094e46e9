"""The training wing's shape: the trainer composes a Backend, a Checkpointer and an Evaluator and never branches on
the backend or imports deepspeed; the run layout is one module that the trainer and export agree on; the held-out
loss is the objective's own formula."""

from __future__ import annotations

import ast
import inspect

import pytest
import torch

from mova_train import run_layout
from mova_train.lora.export import ExportError, load_adapter_source
from mova_train.models import FlowMatchScheduler
from mova_train.training import backend, checkpoint, trainer
from mova_train.training.checkpointer import Counters, TrainerState


def _imports(module) -> set[str]:
    tree = ast.parse(inspect.getsource(module))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add(node.module or "")
    return names


def test_trainer_never_asks_which_backend_it_holds():
    source = inspect.getsource(trainer)
    assert not any(name.split(".")[0] == "deepspeed" for name in _imports(trainer))
    assert ".engine" not in source and "ds_tensor" not in source  # DeepSpeed specifics stay in the backend
    backend_classes = {"PlainBackend", "DeepSpeedBackend", "DeepSpeedStepper", "DistributedDataParallel"}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("isinstance", "type"):
            assert not (
                backend_classes & {getattr(a, "id", getattr(a, "attr", None)) for a in ast.walk(node)}
            )
    assert "_TMP_PREFIX" not in source and "TMP_PREFIX" not in source  # no private names of the layout
    assert len(source.splitlines()) <= 400


def test_backends_share_one_interface():
    methods = {"backward", "step", "save", "load"}
    for cls in (backend.PlainBackend, backend.DeepSpeedBackend):
        assert issubclass(cls, backend.Backend)
        assert all(getattr(cls, m) is not getattr(backend.Backend, m) for m in methods), cls


def test_run_layout_is_what_the_checkpoint_store_and_export_read(tmp_path):
    run_dir = tmp_path / "run"
    for step in (3, 12):
        tmp = checkpoint.begin_checkpoint(run_dir, step)
        assert tmp == run_layout.in_progress_dir(run_dir, step) and run_layout.is_leftover(tmp.name)
        assert (
            run_layout.latest_checkpoint(run_dir) is None
            or run_layout.checkpoint_step(run_layout.latest_checkpoint(run_dir)) < step
        )
        state = TrainerState(3, Counters(step=step), {}, "base", {}, 1, 0)
        checkpoint.write_trainer_state(tmp, state.to_json())
        final = checkpoint.commit_checkpoint(tmp, keep_last=0)
        assert final == run_layout.final_dir(tmp) and final.name == run_layout.checkpoint_name(step)
        assert TrainerState.read(final).counters == Counters(step=step)
    assert [s for s, _ in run_layout.list_checkpoints(run_dir)] == [3, 12]
    # a step folder without trainer_state.json is incomplete for training and export alike
    (run_layout.checkpoints_dir(run_dir) / run_layout.checkpoint_name(99)).mkdir()
    assert run_layout.checkpoint_step(run_layout.latest_checkpoint(run_dir)) == 12
    with pytest.raises(ExportError, match="holds no adapter"):  # export picks step 12, not the incomplete 99
        load_adapter_source(run_dir)
    empty = tmp_path / "empty"
    run_layout.checkpoints_dir(empty).mkdir(parents=True)
    with pytest.raises(ExportError, match="no complete checkpoint"):
        load_adapter_source(empty)


def test_trainer_state_refuses_a_malformed_file(tmp_path):
    ckpt = tmp_path / "step-00000001"
    ckpt.mkdir()
    checkpoint.write_trainer_state(ckpt, {"step": 1})
    with pytest.raises(checkpoint.ResumeError, match="missing or malformed field"):
        TrainerState.read(ckpt)


def test_heldout_and_training_loss_are_one_formula():
    g = torch.Generator().manual_seed(0)
    pv, tv = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    pa, ta = torch.randn(2, 5, generator=g), torch.randn(2, 5, generator=g)
    total, lv, la = FlowMatchScheduler.loss(pv, pa, tv, ta, weight_video=2.0, weight_audio=0.5)
    assert torch.equal(lv, torch.mean((pv - tv) ** 2)) or torch.allclose(lv, torch.mean((pv - tv) ** 2))
    assert float(total) == pytest.approx(2.0 * float(lv) + 0.5 * float(la))
