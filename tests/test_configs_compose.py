"""Every YAML under configs/ composes into the typed schema; a typo'd key or an impossible value fails before any
training (before a process group exists), naming the field."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch.distributed as dist
from hydra.errors import ConfigCompositionException

from mova_train.config import (
    PROJECT_ROOT,
    ConfigValueError,
    TrainConfig,
    compose_config,
    to_train_config,
    validate_config,
)
from mova_train.training.config import (
    DeepSpeedConfig,
    EvalConfig,
    ModelConfig,
    ObjectiveConfig,
    OptimConfig,
    TrackingConfig,
    TrainerConfig,
)
from mova_train.training.synthetic import write_random_shards_for
from mova_train.training.trainer import run
from tests.train_utils import CONFIG_DIR, compose_train, subprocess_timeout, tiny_overrides

GROUP_FILES = sorted((p.parent.name, p.stem) for p in CONFIG_DIR.glob("*/*.yaml"))


@pytest.fixture(scope="module")
def shards(tiny_checkpoint, tmp_path_factory):
    return write_random_shards_for(
        tiny_checkpoint, tmp_path_factory.mktemp("shards"), num_clips=2, num_shards=2
    )


def test_the_config_tree_has_every_group_and_experiment():
    groups = {g for g, _ in GROUP_FILES}
    assert {"model", "data", "lora", "optim", "deepspeed", "tracking", "experiment"} <= groups
    experiments = {n for g, n in GROUP_FILES if g == "experiment"}
    assert {"voice_lora", "sfx_lora", "video_style_lora", "tiny_demo"} <= experiments


@pytest.mark.parametrize("group,name", GROUP_FILES, ids=[f"{g}/{n}" for g, n in GROUP_FILES])
def test_every_yaml_composes_into_the_schema(group, name):
    override = f"+{group}={name}" if group in ("experiment", "memory") else f"{group}={name}"
    cfg = to_train_config(compose_train([override]))
    assert isinstance(cfg, TrainConfig)
    if group == "experiment":
        assert cfg.name == name
        assert cfg.trainer.run_dir == f"runs/{name}"  # deterministic default: rerunning resumes
    if group == "deepspeed" and cfg.deepspeed.config is not None:
        assert (PROJECT_ROOT / cfg.deepspeed.config).is_file()


def test_memory_recipes_compose_with_an_experiment_and_their_plans_meet_the_targets():
    """`+memory=gpuNN` on top of `+experiment=voice_lora`, and configs/memory/plans.json (the planner's figures for
    exactly these recipes, `python -m mova_train.plan --recipes`) within the limits each recipe promises."""
    recipes = sorted(p.stem for p in (PROJECT_ROOT / "configs" / "memory").glob("gpu*.yaml"))
    plans = json.loads((PROJECT_ROOT / "configs" / "memory" / "plans.json").read_text())
    assert sorted(plans["recipes"]) == recipes and len(recipes) >= 4
    assert plans["clip"]["frames"] == 193 and plans["clip"]["height"] == 352 and plans["model"] == "mova_360p"
    limits = {"gpu141": 130, "gpu80": 70, "gpu48": 44, "gpu24": 22}  # GB per GPU (issue: planner figures)
    for name in recipes:
        cfg = validate_config(
            to_train_config(
                compose_train(
                    ["+experiment=voice_lora", f"+memory={name}", "model.checkpoint=c", "data.shards=s"]
                )
            ),
            check_files=False,
        )
        assert cfg.deepspeed.config is None and cfg.model.activation_checkpointing
        planned = plans["recipes"][name]
        assert planned["fits"] and planned["total_gb"] <= limits[name], (name, planned["total_gb"])
        assert planned["pinned_host_gb"] <= 128, (name, planned["pinned_host_gb"])
        assert cfg.model.offload_blocks == 0 or name in (
            "gpu48",
            "gpu24",
        )  # gpu80 and up: no parameter offload
    assert (
        plans["recipes"]["gpu24"]["memory_gb"]["frozen base"]
        < plans["recipes"]["gpu48"]["memory_gb"]["frozen base"]
    )


def test_planned_360p_step_meets_the_kernel_and_byte_targets():
    """Issue #13's CPU targets for the 360p x 193 step of +experiment=voice_lora on one GPU (ZeRO-3, bf16), as the
    planner counted them into configs/memory/plans.json ("base"): at most 9 TB moved by non-matmul kernels and at
    most 12,000 of them per optimizer step (before the fused half-precision forms: 15.4 TB and 32,487)."""
    plans = json.loads((PROJECT_ROOT / "configs" / "memory" / "plans.json").read_text())
    assert plans["command"].startswith("python -m mova_train.plan +experiment=voice_lora --gpus 1 ")
    assert plans["model"] == "mova_360p" and plans["clip"]["frames"] == 193 and plans["clip"]["batch"] == 1
    step = plans["base"]
    assert step["non_matmul_bytes_per_step"] <= 9e12, step["non_matmul_bytes_per_step"]
    assert step["non_matmul_kernels_per_step"] <= 12_000, step["non_matmul_kernels_per_step"]
    assert step["flops_per_step"] > 1e16  # the full model's step, not a tiny one


def test_train_yaml_keeps_hydra_out_of_the_run_directory():
    cfg = compose_config(return_hydra_config=True)
    assert cfg.hydra.output_subdir is None and cfg.hydra.run.dir == "." and cfg.hydra.job.chdir is False


def test_experiments_select_their_lora_targets():
    voice = to_train_config(compose_train(["+experiment=voice_lora"])).lora.targets
    assert set(voice) == {"audio_dit", "dual_tower_bridge", "video_dit_2"}  # low-noise expert only
    sfx = to_train_config(compose_train(["+experiment=sfx_lora"])).lora.targets
    assert set(sfx) == {"audio_dit", "dual_tower_bridge"}
    style = to_train_config(compose_train(["+experiment=video_style_lora"])).lora.targets
    assert set(style) == {"video_dit", "video_dit_2"}


def test_tiny_demo_validates_with_real_paths(tiny_checkpoint, shards, tmp_path):
    cfg = validate_config(to_train_config(compose_train(tiny_overrides(tiny_checkpoint, shards, tmp_path))))
    assert cfg.model.dtype == "float32" and cfg.trainer.mixed_precision == "no"


@pytest.mark.parametrize(
    "override,key",
    [("trainer.max_step=3", "max_step"), ("lora.rnk=4", "rnk"), ("objective.expret=ratio", "expret")],
)
def test_a_typod_key_fails_at_composition_naming_it(override, key):
    with pytest.raises(ConfigCompositionException) as e:
        compose_train(["+experiment=tiny_demo", override])
    assert key in str(e.value) + str(e.value.__cause__)


def test_a_typod_key_inside_an_experiment_file_fails(tmp_path):
    tree = tmp_path / "configs"
    shutil.copytree(CONFIG_DIR, tree)
    (tree / "experiment" / "typo.yaml").write_text("# @package _global_\ntrainer:\n  save_evry: 5\n")
    with pytest.raises(ConfigCompositionException) as e:
        compose_train(["+experiment=typo"], config_dir=tree)
    assert "save_evry" in str(e.value) + str(e.value.__cause__)


IMPOSSIBLE = [
    ("objective.expert=sometimes", "objective.expert", "alternate, ratio, only:video_dit, only:video_dit_2"),
    ("objective.high_noise_ratio=1.5", "objective.high_noise_ratio", "[0.0, 1.0]"),
    ("objective.timestep_sampling=gaussian", "objective.timestep_sampling", "uniform, logit_normal"),
    ("trainer.max_steps=0", "trainer.max_steps", ">= 1"),
    ("trainer.mixed_precision=fp16", "trainer.mixed_precision", "allowed: auto, no, bf16"),
    ("trainer.keep_last=-1", "trainer.keep_last", ">= 0"),
    ("optim.lr=-0.1", "optim.lr", "(0.0, inf)"),
    ("optim.schedule=step", "optim.schedule", "constant, linear, cosine"),
    ("optim.betas=[0.9]", "optim.betas", "two numbers"),
    ("model.dtype=float16", "model.dtype", "allowed: float32, bfloat16"),
    ("model.components=[video_dit_2]", "model.components", "lacks"),
    ("tracking.mode=maybe", "tracking.mode", "online, offline, disabled"),
    ("deepspeed.config=launch/deepspeed/nope.json", "deepspeed.config", "not found"),
    ("data.batch_size=0", "data.batch_size", ">= 1"),
    ("lora.rank=0", "lora.rank", "positive"),
    ("objective.expert=only:video_dit", "lora.targets", "video_dit_2"),
    ("eval.every=10", "eval.prompts", "list of prompts"),
]


@pytest.mark.parametrize("override,field,allowed", IMPOSSIBLE, ids=[o for o, _, _ in IMPOSSIBLE])
def test_an_impossible_value_fails_validation_naming_the_field(
    tiny_checkpoint, shards, tmp_path, override, field, allowed
):
    cfg = compose_train(tiny_overrides(tiny_checkpoint, shards, tmp_path / "run", override))
    with pytest.raises(ValueError) as e:
        validate_config(to_train_config(cfg))
    assert field in str(e.value) and allowed in str(e.value)


OWN_FIELD = [
    (ModelConfig(), "model.checkpoint", "is not set"),
    (ModelConfig(checkpoint="anywhere", dtype="float16"), "model.dtype", "allowed: float32, bfloat16"),
    (ObjectiveConfig(expert="x"), "objective.expert", "alternate, ratio"),
    (OptimConfig(lr=0.0), "optim.lr", "(0.0, inf)"),
    (TrackingConfig(mode="maybe"), "tracking.mode", "online, offline, disabled"),
    (TrainerConfig(save_every=0), "trainer.save_every", ">= 1"),
    (EvalConfig(every=10), "eval.prompts", "list of prompts"),
]


@pytest.mark.parametrize("group,field,allowed", OWN_FIELD, ids=[f for _, f, _ in OWN_FIELD])
def test_each_group_validates_its_own_fields_alone(group, field, allowed):
    with pytest.raises(ConfigValueError) as e:
        group.validate()
    assert field in str(e.value) and allowed in str(e.value)
    # the defaults pass without the other groups or the file system (a checkpoint folder that does not exist)
    ok = replace(type(group)(), checkpoint="nowhere") if isinstance(group, ModelConfig) else type(group)()
    ok.validate()
    DeepSpeedConfig(config="nowhere.json").validate()


@pytest.mark.parametrize(
    "content,message",
    [
        ("{not json", "not valid JSON"),
        ('{"train_batch_size": 8}', "zero_optimization section"),
        (
            '{"zero_optimization": {"stage": 1}}',
            "zero_optimization.stage=1 is not supported; allowed: (2, 3)",
        ),
        ('{"zero_optimization": {"stage": 2}, "optimizer": {}}', "has a 'optimizer' section"),
        ('{"zero_optimization": {"stage": 3}, "scheduler": {}}', "has a 'scheduler' section"),
    ],
    ids=["not-json", "no-zero-section", "stage-1", "optimizer", "scheduler"],
)
def test_a_bad_deepspeed_json_fails_the_same_in_validation_and_at_launch(
    tiny_checkpoint, shards, tmp_path, monkeypatch, content, message
):
    from mova_train.training.distributed import build_deepspeed_config

    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    path = tmp_path / "ds.json"
    path.write_text(content)
    cfg = to_train_config(
        compose_train(tiny_overrides(tiny_checkpoint, shards, tmp_path / "run", f"deepspeed.config={path}"))
    )
    with pytest.raises(ConfigValueError) as validated:
        validate_config(cfg)
    with pytest.raises(ConfigValueError) as launched:
        build_deepspeed_config(cfg, "no")
    assert message in str(validated.value) and "deepspeed.config" in str(validated.value)
    assert str(launched.value) == str(validated.value)


def test_validation_runs_before_any_process_group_or_run_dir(tiny_checkpoint, shards, tmp_path):
    cfg = compose_train(
        tiny_overrides(tiny_checkpoint, shards, tmp_path / "run", "objective.expert=sometimes")
    )
    with pytest.raises(ConfigValueError, match="objective.expert"):
        run(cfg)
    assert not (dist.is_available() and dist.is_initialized())
    assert not (tmp_path / "run").exists()


def test_missing_shards_fail_before_any_run_dir(tiny_checkpoint, shards, tmp_path):
    for bad, message in ((tmp_path / "nowhere", "does not exist"), (tmp_path, "no manifest.json")):
        cfg = compose_train(tiny_overrides(tiny_checkpoint, shards, tmp_path / "run", f"data.shards={bad}"))
        with pytest.raises(ConfigValueError, match=message) as e:
            run(cfg)
        assert "data.shards" in str(e.value)
        assert not (tmp_path / "run").exists()


def test_train_py_exits_2_with_one_line_on_a_bad_value(tiny_checkpoint, shards, tmp_path):
    cmd = [
        sys.executable,
        "train.py",
        *tiny_overrides(tiny_checkpoint, shards, tmp_path / "run", "trainer.save_every=0"),
    ]
    proc = subprocess.run(
        cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=subprocess_timeout(240)
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("train.py: error: trainer.save_every=0")
    assert "Traceback" not in proc.stderr
    assert not Path(tmp_path / "run").exists()


LAUNCH = PROJECT_ROOT / "launch"


@pytest.mark.parametrize("path", sorted((LAUNCH / "deepspeed").glob("*.json")), ids=lambda p: p.name)
def test_every_deepspeed_json_resolves(path, monkeypatch):
    from mova_train.training.distributed import build_deepspeed_config

    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    cfg = TrainConfig()
    cfg.deepspeed.config = str(path.relative_to(PROJECT_ROOT))
    ds = build_deepspeed_config(cfg, "bf16")
    assert ds["zero_optimization"]["stage"] in (2, 3)
    assert ds["train_micro_batch_size_per_gpu"] == cfg.data.batch_size and ds["bf16"]["enabled"] is True
    assert "auto" not in str(ds)
    offload = "offload" in path.stem
    assert ("offload_optimizer" in ds["zero_optimization"]) == offload
