"""A user's first hour (issue 16): progress that shows in logs, `--help` without the heavy imports, one-line config
errors said once, data/codec problems found before the model loads, and the small things `doctor`, `make_tiny`
and the demo say."""

from __future__ import annotations

import json
import logging
import os
import runpy
import shutil
import sys

import pytest

from mova_train.bench.cli import HELP_COMMANDS, heavy_imports_of_help
from mova_train.config import PROJECT_ROOT, ConfigValueError, to_train_config, validate_config
from mova_train.progress import ENV_EVERY_S, Progress, progress_every_s
from tests.fixtures_data import data_input, prepared  # noqa: F401 - session fixtures
from tests.train_utils import compose_train, tiny_overrides

# --- progress -------------------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_progress_off_a_terminal_prints_a_line_every_n_seconds_and_a_final_line():
    clock, lines = FakeClock(), []
    bar = Progress(
        total=10, desc="encode[0]", unit="clip", tty=False, every_s=30, log=lines.append, clock=clock
    )
    for _ in range(4):  # 4 items in 20 s: the first update prints, the next three fall inside 30 s
        clock.now += 5
        bar.update(1)
    clock.now += 20  # 40 s in: 30 s since the first line
    bar.update(1)
    bar.set_postfix({"loss": "0.1234"})
    bar.close()
    bar.close()  # idempotent: one final line
    assert lines == [
        "encode[0]: 1/10 clip (10%), 5.0 s/clip, ETA 45s",
        "encode[0]: 5/10 clip (50%), 8.0 s/clip, ETA 40s",
        "encode[0]: stopped at 5/10 clip (50%) in 40s (8.0 s/clip), loss=0.1234",
    ]


def test_progress_counts_from_a_resumed_step_and_says_done():
    clock, lines = FakeClock(), []
    bar = Progress(
        total=6, initial=4, desc="train", unit="step", tty=False, every_s=0, log=lines.append, clock=clock
    )
    for _ in range(2):
        clock.now += 2
        bar.update(1)
    bar.close()
    # the rate counts the steps of this run only (2 in 4 s), not the 4 resumed ones
    assert lines == [
        "train: 5/6 step (83%), 2.0 s/step, ETA 2s",
        "train: 6/6 step (100%), 2.0 s/step, ETA 0s",
        "train: done 6/6 step (100%) in 4s (2.0 s/step)",
    ]


def test_progress_interval_comes_from_the_environment_and_a_bad_value_is_named(monkeypatch):
    monkeypatch.setenv(ENV_EVERY_S, "5")
    assert progress_every_s() == 5.0
    monkeypatch.delenv(ENV_EVERY_S)
    assert progress_every_s() == 30.0
    monkeypatch.setenv(ENV_EVERY_S, "soon")
    with pytest.raises(ValueError, match=f"{ENV_EVERY_S}='soon'"):
        progress_every_s()


def test_prepare_logs_progress_when_stderr_is_not_a_terminal(prepared):  # noqa: F811
    """The session's `prepare` ran with stderr to a pipe (as under nohup): each stage still says where it is."""
    err = prepared.stderr
    assert "scan: done " in err and " file (100%)" in err
    assert "encode[rank 0]: loading the codecs of" in err and "encode[rank 0]: codecs loaded in" in err
    assert "encode[0]: 1/" in err and "encode[0]: done " in err
    for banner in ("Setting accelerator to CPU", "Matplotlib is building the font cache"):
        assert banner not in err


# --- fast --help ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("label,command", HELP_COMMANDS, ids=[label for label, _ in HELP_COMMANDS])
def test_help_imports_no_heavy_package(label, command):
    assert heavy_imports_of_help(command) == [], f"{label} --help imports them"


@pytest.mark.parametrize("package", ["mova_train.lora", "mova_train.models"])
def test_every_name_of_a_lazy_package_resolves(package):
    """mova_train.lora and mova_train.models import their submodules on first use (so the config schema and the
    architecture names load without PEFT and torch): each name they export must still be reachable, and be the
    object its home module defines."""
    import importlib

    pkg = importlib.import_module(package)
    eager = {name for name in pkg.__all__ if name in vars(pkg) and name not in pkg._HOMES}
    assert sorted(pkg.__all__) == sorted(set(pkg._HOMES) | eager)
    for name, home in pkg._HOMES.items():
        module = importlib.import_module(home if home.startswith("mova_train") else package + home)
        assert getattr(pkg, name) is getattr(module, name), name


def test_data_tools_command_help_still_lists_its_options(capsys):
    from data_tools.__main__ import main

    with pytest.raises(SystemExit) as info:
        main(["prepare", "--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0 and "--checkpoint" in out and "--export-clips" in out
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "prepare" in capsys.readouterr().out


# --- config and data errors -------------------------------------------------------------------------------------


def test_a_missing_shards_folder_is_named(tiny_checkpoint, tmp_path):
    missing = tmp_path / "no_such_shards"
    cfg = to_train_config(compose_train(tiny_overrides(tiny_checkpoint, missing, tmp_path / "run")))
    with pytest.raises(ConfigValueError) as info:
        validate_config(cfg)
    assert f"the shard folder {missing} does not exist" in str(info.value)
    assert "shard file(s) not found" not in str(info.value)


def test_shards_of_other_codecs_are_refused_before_the_model_loads_or_the_run_dir_exists(
    tiny_checkpoint, tmp_path
):
    from mova_train.data.errors import CodecIdentityError
    from mova_train.models.checkpoint import read_mova_config
    from mova_train.training.synthetic import write_random_shards
    from mova_train.training.trainer import run

    config = read_mova_config(tiny_checkpoint)
    shards = write_random_shards(
        tmp_path / "shards",
        codec_identity="0" * 64,
        text_dim=config.text_dim,
        audio_channels=config.audio_latent_dim,
    )
    run_dir = tmp_path / "run"
    with pytest.raises(CodecIdentityError, match="encoded by codecs '0000") as info:
        run(compose_train(tiny_overrides(tiny_checkpoint, shards, run_dir)))
    assert "data.shards=" in str(info.value) and "\n" not in str(info.value)
    assert not run_dir.exists()


def test_train_py_config_error_is_one_line_from_rank_0_and_silent_elsewhere(
    tiny_checkpoint, tmp_path, monkeypatch, capfd
):
    """train.py's own command line (Hydra's main), in this process: every rank validates the same config."""
    argv = ["train.py", *tiny_overrides(tiny_checkpoint, tmp_path / "missing_shards", tmp_path / "run")]
    monkeypatch.setattr(sys, "argv", argv)
    outputs = {}
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(SystemExit) as info:
            runpy.run_path(str(PROJECT_ROOT / "train.py"), run_name="__main__")
        assert info.value.code == 2
        outputs[rank] = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    errors = [line for line in outputs["0"] if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("train.py: error: data.shards="), outputs["0"]
    assert "missing_shards" in errors[0] and "does not exist" in errors[0]
    assert not any("error" in line.lower() for line in outputs["1"]), outputs["1"]
    assert not (tmp_path / "run").exists()


# --- noise ------------------------------------------------------------------------------------------------------


def test_known_banners_are_dropped_and_other_messages_kept():
    from mova_train.upstream import KNOWN_BANNERS, _DropPrefixes, silence_known_banners

    silence_known_banners()
    silence_known_banners()  # idempotent: one filter per logger
    for name in KNOWN_BANNERS:
        assert sum(isinstance(f, _DropPrefixes) for f in logging.getLogger(name).filters) == 1

    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    for name, prefixes in KNOWN_BANNERS.items():
        logger = logging.getLogger(name)
        handler = Keep()
        logger.addHandler(handler)
        try:
            for prefix in prefixes:
                logger.warning(prefix + " (and the rest of the banner)")
            logger.warning("a message that matters")
        finally:
            logger.removeHandler(handler)
    assert seen == ["a message that matters"] * len(KNOWN_BANNERS)


# --- doctor, make_tiny, demo ------------------------------------------------------------------------------------


def test_doctor_counts_params_in_human_units():
    from mova_train.cli.doctor import human_count

    assert [human_count(n) for n in (950, 340_000, 1_234_567, 14_300_000_000, 123_000_000)] == [
        "950", "340K", "1.2M", "14.3B", "123M",
    ]  # fmt: skip


def test_doctor_reports_every_truncated_file(tiny_checkpoint, tmp_path):
    from mova_train.cli.doctor import FAIL, check_checkpoint

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    shards = sorted((ckpt / "video_dit").glob("*.safetensors"))
    assert len(shards) == 3
    for path in shards:
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size - 100)
    checks, _ = check_checkpoint(ckpt)
    failed = [c.message for c in checks if c.status == FAIL]
    for path in shards:
        assert sum(str(path) in m and "truncated" in m for m in failed) == 1, failed
    assert not any("video_dit_2" in m for m in failed)


def test_make_tiny_folders_have_ordinary_permissions(tiny_checkpoint):
    umask = os.umask(0)
    os.umask(umask)
    for folder in [tiny_checkpoint, *(p for p in tiny_checkpoint.iterdir() if p.is_dir())]:
        assert folder.stat().st_mode & 0o777 == 0o777 & ~umask, folder


def test_demo_rerun_says_nothing_will_train(tmp_path):
    from mova_train.cli.demo import already_trained

    run_dir = tmp_path / "run"
    assert already_trained(run_dir, 200) is None
    ckpt = run_dir / "checkpoints" / "step-00000200"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({}))
    assert already_trained(run_dir, 300) is None  # a longer run trains on from step 200
    note = already_trained(run_dir, 200)
    assert "already holds step 200" in note and "make clean" in note


def test_readme_sbatch_command_creates_the_log_folder_first():
    readme = (PROJECT_ROOT / "README.md").read_text(encoding="utf-8")
    lines = [line for line in readme.splitlines() if "sbatch" in line and "launch/slurm/train.sbatch" in line]
    header = (PROJECT_ROOT / "launch" / "slurm" / "train.sbatch").read_text(encoding="utf-8")
    assert "#SBATCH --output=logs/" in header
    commands = [line for line in lines if line.lstrip().startswith(("mkdir", "EXPERIMENT", "sbatch"))]
    assert commands and all(line.lstrip().startswith("mkdir -p logs") for line in commands), commands


def test_deepspeed_on_cpu_builds_no_cpp_op_and_offload_warns_first():
    from deepspeed.comm.torch import build_shm_op

    from mova_train.upstream import log_cpu_adam_build_notice, skip_cpu_shm_comm_build

    skip_cpu_shm_comm_build()
    assert build_shm_op() is None  # no JIT build: training's collectives are torch.distributed's
    said: list[str] = []
    log_cpu_adam_build_notice({"zero_optimization": {"stage": 3}}, said.append)
    assert said == []
    offload = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}
    log_cpu_adam_build_notice(offload, said.append)
    assert len(said) == 1 and "C++ compiler" in said[0]
