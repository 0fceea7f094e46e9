"""Every accelerate config under launch/ parses and agrees with the Hydra configs it is documented to run with:
DeepSpeed on/off, ZeRO stage, offload, precision, micro batch and accumulation, process counts."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file

from mova_train.config import PROJECT_ROOT, to_train_config
from mova_train.training.distributed import build_deepspeed_config
from tests.train_utils import compose_train

ACCELERATE = PROJECT_ROOT / "launch" / "accelerate"
USAGE = re.compile(r"^#\s+accelerate launch --config_file (\S+) train\.py (.+)$", re.M)


def _usage(path: Path) -> list[str]:
    """The Hydra overrides of the usage line every launch config documents."""
    found = USAGE.findall(path.read_text())
    assert found, f"{path.name} has no '#   accelerate launch --config_file ... train.py ...' usage line"
    (config_file, overrides), *_ = found
    assert config_file == f"launch/accelerate/{path.name}", f"{path.name} documents {config_file}"
    return shlex.split(overrides)


@pytest.mark.parametrize("path", sorted(ACCELERATE.glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_config_agrees_with_its_hydra_configs(path, monkeypatch, tmp_path):
    for var in (
        "ACCELERATE_USE_DEEPSPEED",
        "ACCELERATE_DEEPSPEED_ZERO_STAGE",
        "ACCELERATE_DEEPSPEED_CONFIG_FILE",
    ):
        monkeypatch.delenv(var, raising=False)
    acc = load_config_from_file(str(path))
    overrides = _usage(path)
    cfg = to_train_config(compose_train([*overrides, f"trainer.run_dir={tmp_path}"]))
    assert acc.num_processes >= 1 and acc.num_processes % acc.num_machines == 0
    sp = cfg.parallel.sequence_parallel_size
    assert acc.num_processes % sp == 0, (
        f"{path.name}: {acc.num_processes} processes do not split into groups of {sp}"
    )
    if acc.num_machines > 1 and sp > 1:  # a group's all-to-alls stay inside a node
        assert (acc.num_processes // acc.num_machines) % sp == 0, f"{path.name}: a sequence group spans nodes"
    on_gpu = not str(acc.mixed_precision).endswith("no")
    precision = "bf16" if on_gpu else "no"
    if on_gpu:
        assert acc.mixed_precision == "bf16"
        assert cfg.trainer.mixed_precision in ("auto", "bf16"), "GPU launch configs train in bf16"
    ds = build_deepspeed_config(cfg, precision)

    if str(acc.distributed_type).endswith("NO"):
        assert acc.num_processes == 1
        assert ds is None, (
            f"{path.name} runs without DeepSpeed but the Hydra group {cfg.deepspeed.config} uses it"
        )
        return
    assert str(acc.distributed_type).endswith("DEEPSPEED")
    assert ds is not None, f"{path.name} launches DeepSpeed but its usage line selects deepspeed=none"
    zero = ds["zero_optimization"]
    assert acc.deepspeed_config["zero_stage"] == zero["stage"]
    offload = acc.deepspeed_config.get("offload_param_device", "none") != "none"
    assert offload == ("offload_param" in zero)
    assert (acc.deepspeed_config.get("offload_optimizer_device", "none") != "none") == (
        "offload_optimizer" in zero
    )
    assert ds["train_micro_batch_size_per_gpu"] == cfg.data.batch_size
    assert ds["gradient_accumulation_steps"] == cfg.trainer.gradient_accumulation_steps
    if "gradient_accumulation_steps" in acc.deepspeed_config:
        assert acc.deepspeed_config["gradient_accumulation_steps"] == cfg.trainer.gradient_accumulation_steps
    assert ds["bf16"]["enabled"] is on_gpu
    assert ds["gradient_clipping"] == cfg.optim.max_grad_norm


def test_templates_name_existing_configs():
    """The SLURM/torchrun templates and the README point at files that exist."""
    text = "\n".join(
        p.read_text()
        for p in [*(PROJECT_ROOT / "launch").rglob("*.sbatch"), PROJECT_ROOT / "launch" / "torchrun.sh"]
    )
    text += (PROJECT_ROOT / "README.md").read_text()
    for ref in sorted(
        set(re.findall(r"launch/(?:accelerate|deepspeed|slurm)/[\w.]+\.(?:yaml|json|sbatch)", text))
    ):
        assert (PROJECT_ROOT / ref).is_file(), f"{ref} is referenced but does not exist"
