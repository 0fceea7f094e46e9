"""Export from a checkpoint that only holds a DeepSpeed ZeRO-3 state (2 ranks, gloo, CPU)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mova_train.lora import load_adapters
from mova_train.lora.export import ExportError, export_adapter
from tests.train_utils import subprocess_timeout

ROOT = Path(__file__).resolve().parents[1]

# One ZeRO-3 rank: tiny MOVA + LoRA with seeded "trained" values, a DeepSpeed checkpoint saved the way the
# trainer does (<checkpoint>/deepspeed/state/, frozen base excluded, no `latest` file), and rank 0 keeps the
# reference adapter for comparison.
WORKER = r"""
import sys
from pathlib import Path
import deepspeed, torch
from mova_train.lora import LoraConfig, apply_lora, randomize_lora, save_adapters
from mova_train.models.checkpoint import load_mova

ckpt_base, out_ckpt, ref_dir = sys.argv[1:4]
deepspeed.init_distributed(dist_backend="gloo")
model = load_mova(ckpt_base)
cfg = LoraConfig(rank=4, alpha=8.0, targets={"video_dit_2": ["self_attn"], "dual_tower_bridge": ["bridge_v2a"]})
apply_lora(model, cfg)
randomize_lora(model, seed=9)
if torch.distributed.get_rank() == 0:
    save_adapters(ref_dir, model, cfg, metadata={"step": "5"})
optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
config = {
    "train_micro_batch_size_per_gpu": 1,
    "gradient_accumulation_steps": 1,
    "zero_optimization": {"stage": 3},
    "zero_allow_untested_optimizer": True,
    "zero_force_ds_cpu_optimizer": False,
}
engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
engine.save_checkpoint(out_ckpt + "/deepspeed", tag="state", exclude_frozen_parameters=True, save_latest=False)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_export_from_a_zero3_checkpoint(tiny_checkpoint, tmp_path):
    run_dir = tmp_path / "run"
    ckpt = run_dir / "checkpoints" / "step-00000005"
    ckpt.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(
        "name: zero_test\n"
        "lora:\n  rank: 4\n  alpha: 8.0\n  dropout: 0.0\n  use_rslora: false\n  use_dora: false\n"
        "  init: default\n  targets:\n    video_dit_2: [self_attn]\n    dual_tower_bridge: [bridge_v2a]\n"
        "  layers: null\n"
    )
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 5, "base_identity": "sha256:zero-test"}))
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = dict(
            os.environ,
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE="2",
            OMP_NUM_THREADS="1",
        )
        args = [sys.executable, str(script), str(tiny_checkpoint), str(ckpt), str(tmp_path / "ref")]
        procs.append(
            subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        )
    logs = [p.communicate(timeout=subprocess_timeout(240))[0].decode(errors="replace") for p in procs]
    assert all(p.returncode == 0 for p in procs), logs[0][-3000:] + logs[1][-3000:]
    assert len(list(ckpt.rglob("*_model_states.pt"))) == 2  # really sharded over two ranks
    assert not (ckpt / "adapter").exists()

    with pytest.raises(ExportError, match="--from-zero"):
        export_adapter(run_dir, tmp_path / "out", "mova")
    export_adapter(run_dir, tmp_path / "out", "mova", from_zero=True)
    state, cfg, metadata = load_adapters(tmp_path / "out")
    ref_state, ref_cfg, _ = load_adapters(tmp_path / "ref")
    assert cfg == ref_cfg
    assert state.keys() == ref_state.keys() and all(torch.equal(state[k], ref_state[k]) for k in state)
    assert metadata["step"] == "5" and metadata["base_identity"] == "sha256:zero-test"
    assert "zero_test" in metadata["training_config"]
