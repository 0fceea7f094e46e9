"""Shard loader exact resume: state after k batches -> fresh loader -> the same batches as the uninterrupted run."""

import json

import pytest
import torch

from mova_train.data.config import DataConfig
from mova_train.data.errors import LoaderStateError
from mova_train.data.loader import build_loader
from mova_train.data.synthetic import write_synthetic_shards

TEXT_LEN = 16
NUM_RESAMPLED = 24  # batches compared in resampled runs (several passes over the 5 shards)


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    # 5 shards of uneven size and 3 buckets so readers hold partial batches and uneven buffers when stopped.
    write_synthetic_shards(folder, num_shards=5, samples_per_shard=7, buckets=("32x48", "48x32", "32x32"))
    return folder


def _loader(folder, *, num_workers, resample, rank=0, world_size=1):
    cfg = DataConfig(
        shards=str(folder), batch_size=2, num_workers=num_workers, shuffle_buffer=5, resample=resample
    )
    return build_loader(
        cfg, rank=rank, world_size=world_size, seed=3, text_len=TEXT_LEN, expected_codec_identity=None
    )


def _take(loader, n):
    """The first n batches of a fresh iter() (fewer if a finite epoch ends), then the iterator is dropped."""
    it = iter(loader)
    out = [b for _, b in zip(range(n), it)]
    del it
    return out


def _run(loader, *, resample, num_batches=None):
    """The rest of the stream: NUM_RESAMPLED batches, or the current and the next epoch of a finite stream."""
    if resample:
        return _take(loader, num_batches)
    return list(loader) + list(loader)


def _assert_same(got, want):
    assert [b.keys for b in got] == [b.keys for b in want]
    for a, b in zip(got, want):
        for name in ("video", "first_frame", "audio", "text", "text_lengths"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name


@pytest.mark.parametrize("resample", [False, True])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_yields_exactly_the_uninterrupted_batches(shard_dir, num_workers, resample):
    full = _run(
        _loader(shard_dir, num_workers=num_workers, resample=resample),
        resample=resample,
        num_batches=NUM_RESAMPLED,
    )
    stops = [1, 7, len(full) // 2 - 1] if not resample else [1, 7, 16]
    assert not resample or len(full) == NUM_RESAMPLED
    for k in stops:
        first = _loader(shard_dir, num_workers=num_workers, resample=resample)
        head = _take(first, k)
        state = json.loads(json.dumps(first.state_dict()))  # must survive JSON (trainer_state.json)
        resumed = _loader(shard_dir, num_workers=num_workers, resample=resample)
        resumed.load_state_dict(state)
        rest = _run(resumed, resample=resample, num_batches=NUM_RESAMPLED - k)
        _assert_same(head + rest, full)
        assert resumed.num_batches == len(full)
        assert resumed.epoch == (0 if resample else 2)


def test_resume_twice_and_after_an_epoch_boundary(shard_dir):
    full_loader = _loader(shard_dir, num_workers=2, resample=False)
    full = list(full_loader) + list(full_loader) + list(full_loader)
    loader = _loader(shard_dir, num_workers=2, resample=False)
    got = list(loader)  # epoch 0 complete: the state now points at the start of epoch 1
    got += _take(loader, 3)
    for _ in range(2):  # resume, read a little, resume again
        state = json.loads(json.dumps(loader.state_dict()))
        loader = _loader(shard_dir, num_workers=2, resample=False)
        loader.load_state_dict(state)
        got += _take(loader, 2)
    loader2 = _loader(shard_dir, num_workers=2, resample=False)
    loader2.load_state_dict(json.loads(json.dumps(loader.state_dict())))
    got += list(loader2) + list(loader2)
    assert len(got) == len(full) and loader2.epoch == 3
    _assert_same(got, full)


def test_a_new_iter_continues_where_the_last_batch_left_off(shard_dir):
    full = _take(_loader(shard_dir, num_workers=2, resample=True), 12)
    loader = _loader(shard_dir, num_workers=2, resample=True)
    got = _take(loader, 5) + _take(loader, 7)
    _assert_same(got, full)
    stale = iter(loader)
    next(stale)
    fresh = iter(loader)
    with pytest.raises(RuntimeError, match="superseded"):
        next(stale)
    del fresh


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_on_two_ranks(shard_dir, num_workers):
    for rank in (0, 1):
        full = _take(_loader(shard_dir, num_workers=num_workers, resample=True, rank=rank, world_size=2), 10)
        first = _loader(shard_dir, num_workers=num_workers, resample=True, rank=rank, world_size=2)
        head = _take(first, 4)
        resumed = _loader(shard_dir, num_workers=num_workers, resample=True, rank=rank, world_size=2)
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
        _assert_same(head + _take(resumed, 6), full)


def _keys_of(batches) -> list[str]:
    return [k for b in batches for k in b.keys]


@pytest.mark.parametrize("workers", [(0, 0, 0), (1, 0, 2)])
def test_an_epoch_continues_on_another_number_of_ranks_and_workers(shard_dir, workers):
    """2 ranks -> 1 rank -> 2 ranks (and other reader counts), stopping mid-epoch each time: every sample of the
    epoch is handed out exactly once over the three legs, none skipped, none twice."""
    everything = sorted(_keys_of(_loader(shard_dir, num_workers=0, resample=False)))
    assert len(everything) == 35
    seen: list[str] = []
    first = [_loader(shard_dir, num_workers=workers[0], resample=False, rank=r, world_size=2) for r in (0, 1)]
    for loader in first:
        seen += _keys_of(_take(loader, 3))
    middle = _loader(shard_dir, num_workers=workers[1], resample=False)
    middle.load_resplit_state([json.loads(json.dumps(x.state_dict())) for x in first])
    seen += _keys_of(_take(middle, 4))
    last = [_loader(shard_dir, num_workers=workers[2], resample=False, rank=r, world_size=2) for r in (0, 1)]
    for loader in last:
        loader.load_resplit_state([json.loads(json.dumps(middle.state_dict()))])
        seen += _keys_of(list(loader))  # the rest of the epoch
    assert sorted(seen) == everything


def test_a_state_of_other_data_settings_is_not_continued(shard_dir):
    saved = [_loader(shard_dir, num_workers=0, resample=False, rank=r, world_size=2) for r in (0, 1)]
    for loader in saved:
        _take(loader, 1)
    other = _loader(shard_dir, num_workers=0, resample=True)
    with pytest.raises(LoaderStateError, match="resample=False"):
        other.load_resplit_state([x.state_dict() for x in saved])
