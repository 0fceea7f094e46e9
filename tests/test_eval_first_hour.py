"""Evaluation and sampling that work out of the box (issue 16): sizes that follow the checkpoint, prompts with a
reference image checked before anything loads, the step-0 baseline, a stop signal honoured inside an evaluation
render, and the sampler's progress lines."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mova_train.errors import ConfigValueError
from mova_train.models import get_model_config
from mova_train.run_layout import list_checkpoints
from mova_train.sampling import (
    RenderInterrupted,
    checkpoint_sampling_defaults,
    generate,
    heldout_loss,
    load_pipeline,
    sampling_defaults,
)
from mova_train.sampling.defaults import RELEASED_DEFAULTS, TINY_DEFAULTS
from mova_train.training.synthetic import write_random_shards_for
from mova_train.training.trainer import run, to_train_config, validate_config
from tests.train_utils import (
    PROJECT_ROOT,
    compose_train,
    launch_env,
    read_metrics,
    subprocess_timeout,
    tiny_overrides,
)

SMALL_EVAL = ["eval.num_frames=5", "eval.height=32", "eval.width=32", "eval.cfg_scale=1"]


@pytest.fixture(scope="module")
def one_clip(tiny_checkpoint, tmp_path_factory):
    return write_random_shards_for(tiny_checkpoint, tmp_path_factory.mktemp("one_clip"), num_clips=1)


@pytest.fixture(scope="module")
def reference_png(tmp_path_factory):
    path = tmp_path_factory.mktemp("ref") / "ref.png"
    y, x = np.mgrid[0:48, 0:80]
    Image.fromarray(np.stack([x * 3, y * 5, 255 - x * 3], axis=-1).clip(0, 255).astype(np.uint8)).save(path)
    return path


pytestmark = pytest.mark.usefixtures("fresh_accelerate")  # tests/conftest.py


def test_sampling_defaults_follow_the_model_config(tiny_checkpoint):
    assert sampling_defaults(get_model_config("tiny")) == TINY_DEFAULTS
    assert sampling_defaults(get_model_config("mova_360p")) == RELEASED_DEFAULTS
    assert checkpoint_sampling_defaults(tiny_checkpoint) == TINY_DEFAULTS  # from its config files
    released, tiny = RELEASED_DEFAULTS, TINY_DEFAULTS
    assert (released.num_frames, released.height, released.width, released.steps) == (193, 352, 640, 50)
    work = [d.num_frames * d.height * d.width * d.steps for d in (tiny, released)]
    assert work[0] < work[1] / 1000


def test_sample_cli_sizes_follow_the_checkpoint_with_progress_from_the_start(
    tiny_checkpoint, reference_png, tmp_path, caplog
):
    import decord

    from mova_train.cli.sample import main

    argv = [
        "--checkpoint", str(tiny_checkpoint), "--prompt", "a bell rings", "--image", str(reference_png),
        "--cfg", "1", "--no-contact-sheet", "--out", str(tmp_path / "out"),
    ]  # fmt: skip
    with caplog.at_level(logging.INFO):
        assert main(argv) == 0
    summary = json.loads((tmp_path / "out" / "renders.json").read_text())
    assert summary["sampling"]["steps"] == TINY_DEFAULTS.steps
    reader = decord.VideoReader(summary["renders"][0]["mp4"], ctx=decord.cpu(0))
    assert len(reader) == TINY_DEFAULTS.num_frames
    assert reader[0].shape == (TINY_DEFAULTS.height, TINY_DEFAULTS.width, 3)
    del reader
    messages = [r.getMessage() for r in caplog.records]
    order = ["reading ", "--frames, --size, --steps: the tiny model's defaults", "loading the model", "loaded in",
             "render 1/1", "first denoising step took", "wrote "]  # fmt: skip
    positions = [next(i for i, m in enumerate(messages) if key in m) for key in order]
    assert positions == sorted(positions), messages
    assert f"({TINY_DEFAULTS.steps} steps)" in messages[positions[5]]


def test_a_stop_request_abandons_the_render_between_denoising_steps(tiny_checkpoint):
    pipeline = load_pipeline(tiny_checkpoint)
    asked = []

    def should_stop() -> bool:
        asked.append(len(asked))
        return len(asked) == 3

    with pytest.raises(RenderInterrupted) as e:
        generate(
            pipeline, None, ["a dog barks"], num_frames=5, height=32, width=32, steps=6, cfg_scale=1.0,
            progress=False, should_stop=should_stop,
        )  # fmt: skip
    assert (e.value.steps_done, e.value.steps_total) == (2, 6) and len(asked) == 3
    # the held-out loss of an evaluation asks before every batch
    with pytest.raises(RenderInterrupted, match="held-out loss abandoned after 0 of 8 batches"):
        heldout_loss(pipeline.model, iter([object()]), max_batches=8, should_stop=lambda: True)


def _validated(tiny_checkpoint, shards, tmp_path, *extra):
    return validate_config(
        to_train_config(compose_train(tiny_overrides(tiny_checkpoint, shards, tmp_path, *extra)))
    )


def test_eval_prompts_with_images_are_checked_before_anything_loads(
    tiny_checkpoint, one_clip, reference_png, tmp_path
):
    cfg = _validated(
        tiny_checkpoint, one_clip, tmp_path / "run", "eval.every=5",
        f"eval.prompts=[a cat, {{prompt: a dog barks, image: '{reference_png}', seed: 3}}]",
    )  # fmt: skip
    assert cfg.eval.prompts == ["a cat", {"prompt": "a dog barks", "image": str(reference_png), "seed": 3}]
    assert cfg.eval.num_frames is None and cfg.eval.steps is None  # the checkpoint's, at the first render
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    bad = {
        f"eval.prompts=[a, {{prompt: b, image: '{tmp_path / 'missing.png'}'}}]": "eval.prompts[1].image",
        f"eval.prompts=[{{prompt: b, image: '{broken}'}}]": "not a readable image",
        "eval.prompts=[{prompt: b, picture: x.png}]": "eval.prompts[0]",
        "eval.prompts=[{image: x.png}]": "eval.prompts[0].prompt",
        "eval.prompts=[{prompt: b, seed: -1}]": "eval.prompts[0].seed",
    }
    for override, named in bad.items():
        with pytest.raises(ConfigValueError) as e:
            _validated(tiny_checkpoint, one_clip, tmp_path / "run", "eval.every=5", override)
        assert named in str(e.value) and "\n" not in str(e.value), (override, str(e.value))
    with pytest.raises(ConfigValueError, match="eval.at_start needs eval.prompts"):
        _validated(tiny_checkpoint, one_clip, tmp_path / "run", "eval.at_start=true")
    assert not (tmp_path / "run").exists()  # refused before any run directory


def test_the_step_0_baseline_renders_each_prompt_with_its_image(
    tiny_checkpoint, one_clip, reference_png, tmp_path
):
    prompts = f"eval.prompts=[{{prompt: a dog barks, image: '{reference_png}', seed: 3}}, {{prompt: a dog barks, seed: 3}}]"
    result = run(compose_train(tiny_overrides(
        tiny_checkpoint, one_clip, tmp_path / "run", "trainer.max_steps=1", "eval.at_start=true",
        "eval.steps=1", "eval.cfg_scale=1", prompts,
    )))  # fmt: skip
    assert result.step == 1
    eval_dir = tmp_path / "run" / "eval"
    rows = [json.loads(line) for line in (eval_dir / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0] and rows[0]["renders"] == 2  # at_start alone: the baseline only
    baseline = json.loads((eval_dir / "step-000000" / "renders.json").read_text())
    sizes = {k: baseline["sampling"][k] for k in ("num_frames", "height", "width", "steps")}
    tiny = TINY_DEFAULTS  # sizes left unset follow the checkpoint; eval.steps was set
    assert sizes == {"num_frames": tiny.num_frames, "height": tiny.height, "width": tiny.width, "steps": 1}
    with_image, grey = baseline["renders"]
    assert with_image["image"] == str(reference_png.resolve()) and grey["image"] == "grey"
    assert with_image["seed"] == grey["seed"] == 3
    # same prompt, same seed: only the reference image differs
    assert Path(with_image["mp4"]).read_bytes() != Path(grey["mp4"]).read_bytes()


def test_sigterm_during_an_eval_render_saves_a_checkpoint_and_exits_0(tiny_checkpoint, one_clip, tmp_path):
    run_dir = tmp_path / "run"
    eval_steps = 100_000  # a render that would run for hours unless the stop flag cuts it short
    cmd = [
        sys.executable, "train.py", *tiny_overrides(tiny_checkpoint, one_clip, run_dir),
        "trainer.max_steps=5", "trainer.save_every=100", "eval.every=1", "eval.prompts=[a dog barks]",
        f"eval.steps={eval_steps}", *SMALL_EVAL,
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, cwd=PROJECT_ROOT, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    log = run_dir / "logs" / "rank0.log"
    deadline = time.time() + subprocess_timeout(120)
    # the render has started once the step clock has timed its first denoising step
    while time.time() < deadline and proc.poll() is None:
        if log.is_file() and "first denoising step took" in log.read_text():
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=subprocess_timeout(60))
    assert proc.returncode == 0, out[-3000:]
    assert [step for step, _ in list_checkpoints(run_dir)] == [1]  # saved right after the abandoned render
    assert [r["step"] for r in read_metrics(run_dir)] == [1]  # and no further training step
    (row,) = [json.loads(line) for line in (run_dir / "eval" / "eval.jsonl").read_text().splitlines()]
    done = int(row["interrupted"].split("after ")[1].split(" of ")[0])
    assert row["step"] == 1 and 1 <= done < eval_steps, row
    assert not list((run_dir / "eval").glob("step-*/*.mp4"))
    assert "stopped by signal 15 at step 1; checkpoint saved" in log.read_text()
