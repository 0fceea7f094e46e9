"""The codecs benchmark runs (tiny sizes, once); it prints figures and is never timed here."""

from __future__ import annotations

import torch

from mova_train.bench import main as bench_main
from mova_train.bench.codecs import _random_real_size, _run_suite


def test_bench_command_runs(capsys):
    code = bench_main(
        [
            "codecs",
            "--cpu-only",
            "--tiny-frames",
            "5",
            "--tiny-size",
            "16",
            "--tiny-audio-seconds",
            "0.1",
            "--prompts",
            "1",
            "--repeats",
            "1",
            "--warmup",
            "0",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    for row in ("video_vae    encode", "video_vae    decode", "audio_vae    encode", "text_encoder encode"):
        assert row in out


def test_random_weight_path_used_on_gpu(capsys):
    """The GPU branch builds real-size codecs on meta and materialises random weights; exercised here at the tiny
    preset on CPU (the real sizes need a GPU)."""
    video, audio, text = _random_real_size("tiny", torch.device("cpu"))
    assert text.module.shared.weight is text.module.encoder.embed_tokens.weight
    assert video.dtype == torch.bfloat16 and audio.dtype == torch.float32
    assert not any(p.is_meta for m in (video.module, audio.module, text.module) for p in m.parameters())
    latents = video.encode(torch.zeros(1, 3, 5, 16, 16))
    assert bool(torch.isfinite(latents).all())
    _run_suite(
        "random tiny", video, audio, text, frames=5, height=16, width=16, audio_seconds=0.05, num_prompts=1,
        warmup=0, repeats=1,
    )  # fmt: skip
    assert "random tiny" in capsys.readouterr().out
