"""Shard loader on bad data: codec identity, truncated shards, NaN / malformed samples, the rejected fraction."""

import logging
import math

import pytest
import torch
from webdataset import TarWriter

from mova_train.data.config import DataConfig
from mova_train.data.contract import encode_sample
from mova_train.data.errors import CodecIdentityError, LoaderError, ShardReadError, TooManyRejectedError
from mova_train.data.loader import build_loader
from mova_train.data.stats import MIN_SAMPLES_FOR_REJECT_CHECK
from mova_train.data.synthetic import make_synthetic_sample, shard_name, write_shard, write_shard_set

IDENTITY = "synthetic-codecs"
TEXT_LEN = 16


# Tests that damage a shard on purpose to reach a later check pass verify_checksums=False: the manifest's sha256
# (checked first by default) would quarantine the shard before it is read.
def _loader(shards, *, expected=IDENTITY, **kw):
    cfg = DataConfig(shards=str(shards), **{"batch_size": 2, "shuffle_buffer": 4, "resample": False, **kw})
    return build_loader(
        cfg, rank=0, world_size=1, seed=0, text_len=TEXT_LEN, expected_codec_identity=expected
    )


def _shards(num_shards=4, per_shard=6, *, seed=0, bad=(), identity=IDENTITY):
    """Shards of valid samples; `bad` maps a global sample number to a function that spoils it in place."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(num_shards):
        shard = []
        for k in range(per_shard):
            n = i * per_shard + k
            meta, tensors = make_synthetic_sample(
                f"clip_{n:03d}",
                bucket=("32x48", "48x32")[n % 2],
                audio_channels=128,  # MOVA's DAC width: shards without a manifest are checked against it
                codec_identity=identity,
                generator=g,
            )
            if n in dict(bad):
                dict(bad)[n](meta, tensors)
            shard.append((meta, tensors))
        out.append(shard)
    return out


def _nan(meta, tensors):
    tensors["audio"][0, 0] = math.nan


def _keys(loader):
    return sorted(k for b in loader for k in b.keys)


def test_codec_identity_mismatch_fails_before_reading(tmp_path):
    write_shard_set(tmp_path, _shards(), codec_identity=IDENTITY)
    with pytest.raises(CodecIdentityError) as err:
        _loader(tmp_path, expected="base-checkpoint-codecs")
    message = str(err.value)
    assert IDENTITY in message and "base-checkpoint-codecs" in message and "manifest.json" in message
    assert len(_keys(_loader(tmp_path, expected=None))) == 24  # None skips the check


def test_without_manifest_each_sample_identity_is_checked(tmp_path):
    write_shard_set(tmp_path, _shards(identity="other-codecs"), codec_identity="other-codecs")
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(TooManyRejectedError, match="codec_identity=24"):
        _keys(_loader(f"{tmp_path}/shard-000-{{00000..00003}}.tar"))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_nan_sample_is_rejected_and_counted(tmp_path, num_workers):
    write_shard_set(tmp_path, _shards(bad={5: _nan}))
    loader = _loader(tmp_path, num_workers=num_workers)
    keys = _keys(loader)
    assert keys == sorted(f"clip_{n:03d}" for n in range(24) if n != 5)
    stats = loader.stats
    assert stats["rejected"] == {"non_finite": 1} and stats["seen"] == 24 and stats["accepted"] == 23
    assert "clip_005" in stats["examples"]["non_finite"]


def test_too_many_rejected_raises_at_epoch_end(tmp_path):
    write_shard_set(tmp_path, _shards(bad={n: _nan for n in range(0, 24, 4)}))  # 6 of 24 = 25 %
    with pytest.raises(TooManyRejectedError, match=r"6 of 24.*non_finite=6"):
        _keys(_loader(tmp_path, num_workers=2))
    assert len(_keys(_loader(tmp_path, max_rejected_fraction=0.25))) == 18


def test_too_many_rejected_raises_while_resampling(tmp_path):
    write_shard_set(tmp_path, _shards(bad={n: _nan for n in range(0, 24, 3)}))  # a third are bad
    loader = _loader(tmp_path, resample=True)
    it = iter(loader)
    with pytest.raises(TooManyRejectedError, match="non_finite"):
        for _ in range(1000):
            next(it)
    assert loader.num_batches * 2 < MIN_SAMPLES_FOR_REJECT_CHECK


def test_malformed_samples_are_rejected_by_reason(tmp_path):
    shards = _shards(num_shards=1, per_shard=8)
    g = torch.Generator().manual_seed(1)
    # Same bucket, other frame count: consistent with its own metadata, not with the manifest's shapes.
    odd = make_synthetic_sample("clip_odd", bucket="32x48", num_frames=13, audio_channels=128, generator=g)
    write_shard_set(tmp_path, shards)
    spoilt = list(shards[0])
    meta, tensors = spoilt[1]
    spoilt[1] = ({**meta, "height": 40}, tensors)  # breaks validate_sample
    spoilt.append(odd)
    with TarWriter(str(tmp_path / shard_name(0)), encoder=False) as w:
        for meta, tensors in spoilt:
            raw = encode_sample(meta, tensors)
            if meta["clip_id"] == "clip_002":
                raw["__key__"] = "renamed_in_tar"  # tar key and metadata clip_id disagree
            w.write(raw)
    loader = _loader(tmp_path, verify_checksums=False, batch_size=1, max_rejected_fraction=1.0)
    keys = _keys(loader)
    assert not {"clip_001", "clip_002", "renamed_in_tar", "clip_odd"} & set(keys)
    assert loader.stats["rejected"] == {"invalid": 1, "key_mismatch": 1, "shape_mismatch": 1}
    assert len(keys) == 6


@pytest.mark.parametrize("num_workers", [0, 2])
def test_truncated_shard_is_counted_when_resampling(tmp_path, num_workers, caplog):
    write_shard_set(tmp_path, _shards())
    bad = tmp_path / shard_name(2)
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    loader = _loader(tmp_path, resample=True, num_workers=num_workers, max_rejected_fraction=0.5)
    with caplog.at_level(logging.WARNING, logger="mova_train.data"):
        batches = [b for _, b in zip(range(30), loader)]
    assert len(batches) == 30
    stats = loader.stats
    assert stats["shard_errors"] >= 1 and stats["rejected"]["corrupt_shard"] >= 1
    assert shard_name(2) in stats["examples"]["corrupt_shard"]
    assert any(shard_name(2) in r.getMessage() for r in caplog.records)  # at least the size check at build
    keys = {k for b in batches for k in b.keys}
    assert not {f"clip_{n:03d}" for n in range(15, 18)} & keys  # the tail of shard 2 never appears


@pytest.mark.parametrize("num_workers", [0, 2])
def test_truncated_shard_stops_a_single_pass_naming_it(tmp_path, num_workers):
    write_shard_set(tmp_path, _shards())
    bad = tmp_path / shard_name(1)
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    with pytest.raises(ShardReadError, match=shard_name(1)):
        _keys(_loader(tmp_path, num_workers=num_workers))


def test_shard_shorter_than_its_manifest_is_detected(tmp_path):
    shards = _shards()
    write_shard_set(tmp_path, shards)
    write_shard(tmp_path / shard_name(3), shards[3][:4])  # a valid tar, but 2 samples short
    with pytest.raises(ShardReadError, match="the manifest says 6"):
        _keys(_loader(tmp_path, verify_checksums=False))
    loader = _loader(
        tmp_path, verify_checksums=False, resample=True, max_rejected_fraction=0.5, shuffle_shards=False
    )
    [b for _, b in zip(range(12), loader)]  # one full pass and more
    assert loader.stats["rejected"]["corrupt_shard"] >= 2


def test_sample_missing_its_latents_is_rejected(tmp_path):
    shards = _shards(num_shards=1, per_shard=4)
    write_shard_set(tmp_path, shards)
    with TarWriter(str(tmp_path / shard_name(0)), encoder=False) as w:
        for i, (meta, tensors) in enumerate(shards[0]):
            raw = encode_sample(meta, tensors)
            if i == 2:
                del raw["latents.safetensors"]
            w.write(raw)
    loader = _loader(tmp_path, verify_checksums=False, batch_size=1, max_rejected_fraction=0.5)
    assert _keys(loader) == ["clip_000", "clip_001", "clip_003"]
    assert loader.stats["rejected"] == {"missing_member": 1}


def test_inf_in_bf16_latent_is_rejected(tmp_path):
    g = torch.Generator().manual_seed(0)
    shard = [make_synthetic_sample(f"c{i}", dtype=torch.bfloat16, generator=g) for i in range(3)]
    shard[1][1]["video"][3, 0, 1, 2] = -math.inf
    write_shard_set(tmp_path, [shard])
    loader = _loader(tmp_path, verify_checksums=False, batch_size=1, max_rejected_fraction=0.5)
    assert _keys(loader) == ["c0", "c2"]
    assert loader.stats["rejected"] == {"non_finite": 1}


def test_resampling_with_nothing_usable_fails_instead_of_spinning(tmp_path):
    write_shard_set(tmp_path, _shards())
    (tmp_path / "manifest.json").unlink()  # no manifest: the bucket filter cannot be checked up front
    loader = _loader(f"{tmp_path}/shard-000-{{00000..00003}}.tar", resample=True, buckets=["64x64"])
    with pytest.raises(LoaderError, match=r"without one usable sample matching data.buckets=\['64x64'\]"):
        next(iter(loader))
