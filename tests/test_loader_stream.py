"""Shard loader: rank/worker splitting, bucket purity, text padding, filters, config checks, no unpickling."""

import json
import pickle

import pytest
import torch
from omegaconf import OmegaConf

from mova_train.bench import main as bench_main
from mova_train.bench.data import run_loader_bench
from mova_train.checkpoint_io import sha256_file
from mova_train.data.config import DataConfig, check_data_config
from mova_train.data.contract import encode_sample
from mova_train.data.errors import LoaderStateError
from mova_train.data.loader import build_loader
from mova_train.data.synthetic import make_synthetic_sample, write_shard_set, write_synthetic_shards
from mova_train.errors import ConfigValueError

IDENTITY = "synthetic-codecs"
TEXT_LEN = 16


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    samples = write_synthetic_shards(folder, num_shards=4, samples_per_shard=6)
    return folder, samples


def _loader(folder, *, rank=0, world_size=1, seed=0, **kw):
    cfg = DataConfig(shards=str(folder), **{"batch_size": 2, "shuffle_buffer": 4, "resample": False, **kw})
    return build_loader(
        cfg, rank=rank, world_size=world_size, seed=seed, text_len=TEXT_LEN, expected_codec_identity=IDENTITY
    )


def _epoch_keys(loader) -> list[str]:
    return [k for batch in loader for k in batch.keys]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_two_ranks_cover_every_sample_exactly_once_per_epoch(shard_dir, num_workers):
    folder, samples = shard_dir
    per_rank = [_epoch_keys(_loader(folder, rank=r, world_size=2, num_workers=num_workers)) for r in (0, 1)]
    assert all(per_rank), "each rank must get data"
    assert sorted(per_rank[0] + per_rank[1]) == sorted(samples)
    # Shards, not samples, are split: a rank's keys come from whole shards (key = clip_<shard>_<index>).
    shards_of = [{k.split("_")[1] for k in keys} for keys in per_rank]
    assert not shards_of[0] & shards_of[1]


def test_workers_split_shards_and_idle_workers_are_fine(tmp_path):
    # 3 shards over 2 ranks x 2 workers: one reader gets no shard at all.
    samples = write_synthetic_shards(tmp_path, num_shards=3, samples_per_shard=5)
    per_rank = [_epoch_keys(_loader(tmp_path, rank=r, world_size=2, num_workers=2)) for r in (0, 1)]
    assert sorted(per_rank[0] + per_rank[1]) == sorted(samples)
    one_rank = _epoch_keys(_loader(tmp_path, num_workers=2))
    assert sorted(one_rank) == sorted(samples)


def test_next_epoch_reshuffles_and_still_covers_everything(shard_dir):
    folder, samples = shard_dir
    loader = _loader(folder, batch_size=1)
    first, second = _epoch_keys(loader), _epoch_keys(loader)
    assert sorted(first) == sorted(second) == sorted(samples)
    assert first != second
    assert loader.epoch == 2


def test_batches_are_bucket_pure_padded_and_exact(shard_dir):
    folder, samples = shard_dir
    loader = _loader(folder, batch_size=3, num_workers=2)
    seen = 0
    for batch in loader:
        assert len(batch) == len(batch.keys) == batch.video.shape[0] == batch.text.shape[0]
        assert batch.text.shape[1] == TEXT_LEN
        h, w = (int(x) for x in batch.bucket.split("x"))
        assert batch.video.shape[-2:] == (h // 8, w // 8) == batch.first_frame.shape[-2:]
        for i, key in enumerate(batch.keys):
            meta, tensors = samples[key]
            assert meta["bucket"] == batch.bucket == batch.meta[i]["bucket"]
            assert torch.equal(batch.video[i], tensors["video"])
            assert torch.equal(batch.first_frame[i], tensors["first_frame"])
            assert torch.equal(batch.audio[i], tensors["audio"])
            n = tensors["text"].shape[0]
            assert batch.text_lengths[i].item() == n
            assert torch.equal(batch.text[i, :n], tensors["text"])
            assert not batch.text[i, n:].any()
            seen += 1
    assert seen == len(samples)
    stats = loader.stats
    assert stats["seen"] == stats["accepted"] == len(samples) and stats["rejected_total"] == 0


def test_bucket_filter_keeps_only_named_buckets(shard_dir):
    folder, samples = shard_dir
    keys = _epoch_keys(_loader(folder, buckets=["48x32"]))
    assert sorted(keys) == sorted(k for k, (m, _) in samples.items() if m["bucket"] == "48x32")
    with pytest.raises(ValueError, match="available"):
        _loader(folder, buckets=["64x64"])


def test_url_list_reads_the_same_as_the_folder(shard_dir):
    folder, _ = shard_dir
    by_folder = [b.keys for b in _loader(folder)]
    by_urls = [b.keys for b in _loader(f"{folder}/shard-000-{{00000..00003}}.tar")]
    assert by_folder == by_urls


def test_text_longer_than_text_len_is_rejected(tmp_path):
    g = torch.Generator().manual_seed(0)
    shard = [make_synthetic_sample(f"c{i}", num_tokens=TEXT_LEN + i, generator=g) for i in range(2)]
    write_shard_set(tmp_path, [shard])
    loader = _loader(tmp_path, batch_size=1, max_rejected_fraction=1.0)
    assert _epoch_keys(loader) == ["c0"]
    assert loader.stats["rejected"] == {"text_too_long": 1}


def test_pickled_members_are_never_loaded(tmp_path):
    """A shard member that would run code when unpickled must be ignored, not decoded."""
    sentinel = tmp_path / "pwned"

    class Bomb:
        def __reduce__(self):
            return (open, (str(sentinel), "w"))

    g = torch.Generator().manual_seed(0)
    shard = [make_synthetic_sample(f"c{i}", generator=g) for i in range(3)]
    write_shard_set(tmp_path, [shard])
    from webdataset import TarWriter  # rewrite the shard with extra pickle members next to the contract's

    with TarWriter(str(tmp_path / "shard-000-00000.tar"), encoder=False) as w:
        for meta, tensors in shard:
            raw = encode_sample(meta, tensors)
            raw["pyd"] = raw["pickle"] = pickle.dumps(Bomb())
            w.write(raw)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["shards"][0]["num_bytes"] = (tmp_path / "shard-000-00000.tar").stat().st_size
    manifest["shards"][0]["sha256"] = sha256_file(tmp_path / "shard-000-00000.tar")  # a consistent manifest
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert sorted(_epoch_keys(_loader(tmp_path, batch_size=1))) == ["c0", "c1", "c2"]
    assert not sentinel.exists()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("batch_size", 0),
        ("num_workers", -1),
        ("shuffle_buffer", 1.5),
        ("resample", "yes"),
        ("buckets", ["352by640"]),
        ("buckets", []),
        ("max_rejected_fraction", 1.5),
        ("shards", ""),
    ],
)
def test_bad_config_fields_are_named(field, value):
    cfg = {"shards": "somewhere", field: value}
    with pytest.raises(ValueError, match=field):
        check_data_config(cfg)


def test_data_config_validates_itself_with_config_value_errors(tmp_path):
    with pytest.raises(ConfigValueError, match=r"^data\.batch_size must be an integer >= 1, got 0$"):
        DataConfig(shards="d", batch_size=0).validated()
    assert DataConfig(shards="d", buckets=[" 32x48 "]).validated().buckets == ["32x48"]
    DataConfig(shards=str(tmp_path / "nowhere")).validated()  # the shards are only resolved when asked
    with pytest.raises(ConfigValueError, match=r"^data\.shards.*not found"):
        DataConfig(shards=str(tmp_path / "nowhere")).validated(check_shards=True)


def test_hydra_structured_config_is_accepted():
    cfg = OmegaConf.merge(OmegaConf.structured(DataConfig), {"shards": "d", "buckets": ["352x640"]})
    assert check_data_config(cfg) == DataConfig(shards="d", buckets=["352x640"])


def test_unknown_config_field_and_missing_folder_are_clear(tmp_path):
    with pytest.raises(ValueError, match="unknown field"):
        check_data_config({"shards": "x", "batchsize": 2})
    with pytest.raises(ValueError, match="manifest.json"):
        _loader(tmp_path)
    with pytest.raises(ValueError, match="not found"):
        _loader(f"{tmp_path}/shard-{{0..1}}.tar")


def test_state_from_another_layout_is_refused(shard_dir):
    folder, _ = shard_dir
    loader = _loader(folder)
    it = iter(loader)
    next(it)
    state = json.loads(json.dumps(loader.state_dict()))
    del it
    with pytest.raises(LoaderStateError, match="batch_size"):
        _loader(folder, batch_size=3).load_state_dict(state)
    with pytest.raises(LoaderStateError, match="world_size"):
        _loader(folder, rank=0, world_size=2).load_state_dict(state)
    with pytest.raises(LoaderStateError, match="seed"):
        _loader(folder, seed=1).load_state_dict(state)


def test_bench_runs_and_reports(shard_dir, capsys):
    folder, _ = shard_dir
    result = run_loader_bench(folder, batch_size=2, max_batches=5, text_len=TEXT_LEN)
    assert result["batches"] == 5 and result["samples"] == 10
    assert "samples/s" in capsys.readouterr().out


def test_bench_cli_bad_path_exits_2(tmp_path, capsys):
    assert bench_main(["data", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bench data: error:") and len(err.strip().splitlines()) == 1
