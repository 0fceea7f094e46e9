"""`python -m mova_train.bench gpu`: the dry run on CPU (the GPU run's code path with the tiny config) and the
depth extrapolation's arithmetic."""

from __future__ import annotations

import json

import pytest
import torch

from mova_train.bench import main as bench_main
from mova_train.bench.gpu import (
    PEAK_TFLOPS,
    depth_config,
    extrapolate,
    fit_line,
    model_flops,
    per_video_layer_s,
)
from mova_train.models import get_model_config


@pytest.fixture
def one_thread():
    # Two busy cores: intra-op threads that wait on each other make the tiny steps slow, not wrong.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_fit_line_recovers_a_line_and_needs_two_points():
    a, b = fit_line([1.0, 2.0, 4.0], [5.0, 7.0, 11.0])
    assert (a, b) == pytest.approx((3.0, 2.0), rel=1e-12)
    with pytest.raises(ValueError, match="two or more distinct"):
        fit_line([3.0, 3.0], [1.0, 2.0])


def test_extrapolation_to_40_plus_30_layers_is_per_video_layer_at_proportional_depths():
    config = get_model_config("mova_360p")
    for depth, audio in ((4, 3), (8, 6), (12, 9)):
        cut = depth_config(config, depth)
        assert (cut.audio_dit.num_layers, len(cut.dual_tower_bridge.interaction_layers)) == (audio, audio)
    lv, la = 43120, 403
    # times exactly linear in the video layer count -> the FLOP-based fit predicts a + b * 40
    a, b, full = extrapolate(config, [4, 8, 12], [1.0 + 0.5 * d for d in (4, 8, 12)], lv, la)
    assert full == pytest.approx(1.0 + 0.5 * 40, rel=1e-9)
    assert a + b * model_flops(depth_config(config, 8), lv, la) == pytest.approx(5.0, rel=1e-9)
    assert per_video_layer_s(config, b, 12, lv, la) == pytest.approx(0.5, rel=1e-9)
    assert per_video_layer_s(config, b, 4, lv, la) == pytest.approx(0.5, rel=1e-9)


def test_extrapolation_weights_towers_by_flops_when_depths_are_not_proportional():
    config = get_model_config("tiny")  # 4 video + 3 audio layers: depths 1/2/3 get 1/2/2 audio layers
    lv, la = 120, 36
    flops = [model_flops(depth_config(config, d), lv, la) for d in (1, 2, 3)]
    times = [0.25 + 3e-9 * f for f in flops]
    _, _, full = extrapolate(config, [1, 2, 3], times, lv, la)
    assert full == pytest.approx(0.25 + 3e-9 * model_flops(config, lv, la), rel=1e-9)
    assert model_flops(config, lv, la) > max(flops)


def test_dry_run_prints_every_figure_and_its_arithmetic_holds(capsys, one_thread):
    assert bench_main(["gpu", "--dry-run", "--json"]) == 0
    out, err = capsys.readouterr()
    result = json.loads(out.strip().splitlines()[-1])
    for label in (
        "[kernel] attention forward",
        "[kernel] attention fwd+bwd",
        "[kernel] matmul",
        "[depth] 1 video + 1 audio layers",
        "[depth] 3 video + 2 audio layers",
        "[fit] t = a + b * F",
        "s fixed + ",
        "s per video layer",
        "[result] s/step:",
        "[result] TFLOP/s:",
        f"[result] MFU: {result['mfu_989']:.1%} of 989 TFLOP/s",
        "[result] peak GB: n/a (CPU",
        "[result] samples per GPU-hour:",
        "reference 40",
        "[result] attention kernel: sdpa",
    ):
        assert label in err, label
    assert [r["name"] for r in result["kernels"]] == [
        "attention forward",
        "attention fwd+bwd",
        "matmul",
        "matmul",
    ]
    assert all(
        r["s"] > 0 and r["tflops"] == pytest.approx(r["flops"] / r["s"] / 1e12) for r in result["kernels"]
    )
    assert result["matmul_peak_tflops"] == max(r["tflops"] for r in result["kernels"][2:])
    rows = result["depths"]
    assert [(r["video_layers"], r["audio_layers"]) for r in rows] == [(1, 1), (2, 2), (3, 2)]
    config = get_model_config("tiny")
    lv, la = result["video_tokens"], result["audio_tokens"]
    assert (lv, la) == (120, 36)  # 17 frames at 64x96: 5 x 4 x 6 video tokens; ceil(17 / 24 s * 50 Hz) audio
    a, b, full = extrapolate(config, [1, 2, 3], [r["s"] for r in rows], lv, la)
    assert result["s_per_step_extrapolated"] == pytest.approx(full, rel=1e-12)
    assert (result["fit_a_s"], result["fit_b_s_per_flop"]) == pytest.approx((a, b), rel=1e-12)
    # the tiny model's full depth fits the budget, so it was measured and the figures use the measurement
    step = result["s_per_step_measured"]
    assert step > 0 and result["full_depth_skipped"] is None
    assert result["model_flops_per_step"] == model_flops(config, lv, la)
    assert result["tflops"] == pytest.approx(result["model_flops_per_step"] / step / 1e12, rel=1e-12)
    assert result["mfu_989"] == pytest.approx(result["tflops"] / PEAK_TFLOPS, rel=1e-12)
    assert result["mfu_matmul_peak"] == pytest.approx(
        result["tflops"] / result["matmul_peak_tflops"], rel=1e-12
    )
    assert result["samples_per_gpu_hour"] == pytest.approx(3600.0 / step, rel=1e-12)
    assert result["peak_gb"] is None and result["attention_kernel"] == "sdpa"


def test_dry_run_skips_full_depth_outside_the_budget(capsys, one_thread):
    args = [
        "gpu",
        "--dry-run",
        "--json",
        "--budget-s",
        "0",
        "--depths",
        "1,2",
        "--kernel-iters",
        "1",
        "--warmup",
        "0",
    ]
    assert bench_main(args) == 0
    out, err = capsys.readouterr()
    result = json.loads(out.strip().splitlines()[-1])
    assert result["s_per_step_measured"] is None and "budget" in result["full_depth_skipped"]
    assert "full depth not run" in err
    assert result["samples_per_gpu_hour"] == pytest.approx(3600.0 / result["s_per_step_extrapolated"])


def test_without_cuda_it_says_it_needs_a_gpu(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench_main(["gpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs a CUDA GPU" in err


def test_bad_depths_are_a_one_line_error(capsys):
    assert bench_main(["gpu", "--dry-run", "--depths", "2,2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--depths" in err
    assert bench_main(["gpu", "--dry-run", "--depths", "1,x"]) == 2
    assert "comma-separated" in capsys.readouterr().err
