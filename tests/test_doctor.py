"""`python -m mova_train.cli.doctor`: a healthy tiny checkpoint passes; each broken piece is named and fails."""

import shutil

import pytest

from mova_train.cli.doctor import FAIL, main, memory_advice, run_checks
from mova_train.data.contract import Manifest, ShardInfo, save_manifest


@pytest.fixture
def ckpt_copy(tiny_checkpoint, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, dst)
    return dst


def _failures(checks):
    return [c.message for c in checks if c.status == FAIL]


def test_healthy_tiny_checkpoint_is_ready(tiny_checkpoint, tmp_path, capsys):
    assert main(["--checkpoint", str(tiny_checkpoint), "--run-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for component in ("video_dit", "video_dit_2", "audio_dit", "dual_tower_bridge", "video_vae", "audio_vae"):
        assert f"{component}:" in out
    assert "ready" in out


def test_truncated_shard_is_named(ckpt_copy, tmp_path):
    shard = next((ckpt_copy / "video_dit_2").glob("*-00002-of-00003.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-100])
    fails = _failures(run_checks(ckpt_copy, None, tmp_path))
    assert any("truncated" in m and shard.name in m for m in fails), fails


def test_config_that_disagrees_with_weights_fails(ckpt_copy, tmp_path):
    import json

    cfg_path = ckpt_copy / "audio_dit" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["ffn_dim"] += 16
    cfg_path.write_text(json.dumps(cfg))
    fails = _failures(run_checks(ckpt_copy, None, tmp_path))
    assert any("audio_dit" in m and "does not match its config" in m for m in fails), fails


def test_missing_component_folder_fails(ckpt_copy, tmp_path):
    shutil.rmtree(ckpt_copy / "audio_vae")
    fails = _failures(run_checks(ckpt_copy, None, tmp_path))
    assert any("audio_vae" in m for m in fails), fails


def test_shards_checked_against_checkpoint(tiny_checkpoint, tmp_path):
    from mova_train.codecs import codec_identity

    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "shard-000-00000.tar").write_bytes(b"x" * 10)
    info = ShardInfo(name="shard-000-00000.tar", sha256="0" * 64, num_samples=1, num_bytes=10)
    good = Manifest(
        codec_identity=codec_identity(tiny_checkpoint), checkpoint_identity="c", num_samples=1, shards=[info]
    )
    save_manifest(shards, good)
    assert _failures(run_checks(tiny_checkpoint, shards, tmp_path)) == []
    # --deep re-hashes every shard: the fake checksum is caught.
    assert any("checksum" in m for m in _failures(run_checks(tiny_checkpoint, shards, tmp_path, deep=True)))
    save_manifest(
        shards, Manifest(codec_identity="other", checkpoint_identity="c", num_samples=1, shards=[info])
    )
    assert any("re-encode" in m for m in _failures(run_checks(tiny_checkpoint, shards, tmp_path)))
    (shards / "shard-000-00000.tar").unlink()
    assert any("missing shard" in m for m in _failures(run_checks(None, shards, tmp_path)))


def test_memory_advice_names_the_recipe_the_planner_fits():
    """doctor's advice comes from the planner's figures for the recipes (configs/memory/plans.json)."""
    assert memory_advice(150).startswith("+memory=gpu141:")
    assert memory_advice(85).startswith("+memory=gpu80:")  # an 80 GB A100/H100 reports ~85e9 bytes
    assert memory_advice(51).startswith("+memory=gpu48:")
    assert memory_advice(25.4).startswith("+memory=gpu24:")  # an RTX 4090
    assert "smaller than every memory recipe" in memory_advice(16)
    assert "pinned host RAM" in memory_advice(85) and "193 frames at 352x640" in memory_advice(85)
