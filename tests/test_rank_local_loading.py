"""Rank-local loading of the frozen base under ZeRO-3 (2 real processes over gloo, real DeepSpeed), and the codec
identity cache.

The distributed test runs this file itself as the worker under `torch.distributed.run`: each rank loads the tiny
checkpoint with `load_base` (built under `deepspeed.zero.Init`, its partitions read from the files), gathers every
parameter with `GatheredParameters` and compares it with the checkpoint's tensor, then loads a checkpoint with one
misshaped tensor. The end-to-end ZeRO-3 training run (losses, base bit-identical) is tests/test_train_distributed.py.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch

from mova_train.checkpoint_io import (
    CheckpointError,
    load_component_state,
    locate_tensors,
    read_tensor,
    save_component,
    write_safetensors,
)
from mova_train.codecs import codec_identity
from mova_train.codecs.identity import IDENTITY_VERSION
from mova_train.names import AUDIO_DIT, COMPONENTS, WEIGHTS_NAME

BAD_KEY = "blocks.0.ffn.0.weight"  # an audio tower linear, stored transposed in the broken copy


def _worker(checkpoint: Path, broken: Path, out: Path) -> None:
    import deepspeed

    from mova_train.training.backend import load_base

    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    ds_config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3},
        "bf16": {"enabled": False},
    }
    model = load_base(checkpoint, COMPONENTS, torch.float32, torch.device("cpu"), ds_config)
    params = list(model.named_parameters())
    report = {
        "all_partitioned": all(hasattr(p, "ds_tensor") for _, p in params),
        "local_numel": sum(p.ds_tensor.numel() for _, p in params),
        "full_numel": sum(p.ds_numel for _, p in params),
        "mismatched": [],
    }
    for component in COMPONENTS:
        stored = load_component_state(checkpoint / component, weights_name=WEIGHTS_NAME)
        module = getattr(model, component)
        with deepspeed.zero.GatheredParameters(list(module.parameters())):
            for name, p in module.named_parameters():
                if p.dtype != stored[name].dtype or not torch.equal(p.data, stored[name]):
                    report["mismatched"].append(f"{component}.{name}")
    try:
        load_base(broken, (AUDIO_DIT,), torch.float32, torch.device("cpu"), ds_config)
        report["refused"] = None
    except CheckpointError as e:
        report["refused"] = str(e)
    (out / f"rank{rank}.json").write_text(json.dumps(report))


@pytest.mark.distributed
def test_zero3_ranks_hold_only_their_partitions_equal_to_the_checkpoint(tiny_checkpoint, tmp_path):
    from tests.train_utils import launch

    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    folder = broken / AUDIO_DIT
    state = load_component_state(folder, weights_name=WEIGHTS_NAME)
    shape = list(state[BAD_KEY].shape)
    state[BAD_KEY] = state[BAD_KEY].t().contiguous()
    save_component(folder, state, config=None, weights_name=WEIGHTS_NAME)

    out = tmp_path / "out"
    out.mkdir()
    launch([
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        __file__, str(tiny_checkpoint), str(broken), str(out),
    ], timeout=120)  # fmt: skip
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    for report in reports:
        assert report["all_partitioned"] and report["mismatched"] == []
        # each rank holds half of every tensor (rounded up), not the whole base
        assert report["full_numel"] / 2 <= report["local_numel"] <= report["full_numel"] / 2 + 1000
        assert f"shape mismatch for {BAD_KEY} in {WEIGHTS_NAME}.safetensors" in report["refused"]
        assert f"checkpoint {shape[::-1]}, model expects {shape}" in report["refused"]


def test_read_tensor_returns_exactly_a_flat_range_and_bad_spans_are_refused(tmp_path):
    t = torch.arange(35, dtype=torch.float32).reshape(5, 7) / 3
    write_safetensors(tmp_path / "w.safetensors", {"a": torch.zeros(3, dtype=torch.bfloat16), "t": t})
    loc = locate_tensors(tmp_path, weights_name="w")["t"]
    assert loc.shape == (5, 7) and loc.torch_dtype == torch.float32
    for start, count in ((0, 35), (18, 17), (34, 1), (35, 0), (3, 9)):
        assert torch.equal(read_tensor(loc, start, count), t.reshape(-1)[start : start + count])
    with pytest.raises(ValueError, match="outside a tensor of 35"):
        read_tensor(loc, 30, 6)
    # a header whose span does not hold dtype x shape bytes names the tensor and the sizes
    raw = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "w.safetensors").write_bytes(raw.replace(b'"shape":[5,7]', b'"shape":[5,6]'))
    with pytest.raises(
        CheckpointError, match=r"tensor 't' spans 140 bytes, its dtype F32 and shape \[5, 6\] need 120"
    ):
        locate_tensors(tmp_path, weights_name="w")


# ---------------------------------------------------------------------------------------------------------------
# codec identity cache


def _age_files(root: Path, seconds: float) -> None:
    """Every file's mtime `seconds` in the past: older than the cache's freshness margin."""
    when = time.time_ns() - int(seconds * 1e9)
    for p in root.rglob("*"):
        if p.is_file():
            os.utime(p, ns=(when, when))


def _rewrite_same_size_same_mtime(path: Path) -> None:
    """Change the last data bytes of a safetensors file, keeping its size and mtime."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[-4:] = bytes(b ^ 0xFF for b in data[-4:])
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_codec_identity_cache_reads_no_weights_until_a_file_changes(tiny_checkpoint, tmp_path):
    ckpt, cache = tmp_path / "ckpt", tmp_path / "cache"
    shutil.copytree(tiny_checkpoint, ckpt)
    _age_files(ckpt, 100)
    first = codec_identity(ckpt, cache_dir=cache)
    assert first == codec_identity(ckpt, cache=False)
    (entry,) = (cache / "codec_identity").glob("*.json")
    assert list(json.loads(entry.read_text())["entries"]) == ["audio_vae,text_encoder,video_vae"]

    # Another content under the same size and mtime: a cached call does not read it, a fresh hash sees it.
    weights = ckpt / "audio_vae" / "diffusion_pytorch_model.safetensors"
    _rewrite_same_size_same_mtime(weights)
    assert codec_identity(ckpt, cache_dir=cache) == first
    changed = codec_identity(ckpt, cache=False)
    assert changed != first

    # Touching the file (a new mtime) invalidates the entry: the identity is recomputed from the new bytes.
    os.utime(weights, ns=(time.time_ns() - 50 * 10**9,) * 2)
    assert codec_identity(ckpt, cache_dir=cache) == changed
    # A file modified just now is not cached (its mtime could not reveal a same-size rewrite within the clock's
    # granularity): a second call still reads it.
    os.utime(weights)
    assert codec_identity(ckpt, cache_dir=cache) == changed
    _rewrite_same_size_same_mtime(weights)
    assert codec_identity(ckpt, cache_dir=cache) == first


def test_codec_identity_unusable_cache_still_answers(tiny_checkpoint, tmp_path):
    want = codec_identity(tiny_checkpoint, cache=False)
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the cache folder would go")
    assert codec_identity(tiny_checkpoint, cache_dir=blocker) == want
    # a damaged cache file is ignored and written again
    ckpt, cache = tmp_path / "ckpt", tmp_path / "cache"
    shutil.copytree(tiny_checkpoint, ckpt)
    _age_files(ckpt, 100)
    codec_identity(ckpt, cache_dir=cache)
    (entry,) = (cache / "codec_identity").glob("*.json")
    entry.write_text(json.dumps({"version": IDENTITY_VERSION, "entries": [want]}))
    assert codec_identity(ckpt, cache_dir=cache) == want
    assert json.loads(entry.read_text())["entries"]["audio_vae,text_encoder,video_vae"]["identity"] == want


if __name__ == "__main__":
    _worker(*(Path(a) for a in sys.argv[1:4]))
