"""Dataset features: several shard sets mixed by weight or repeats, caption dropout with the stored empty-prompt
embedding, and frame buckets (plan --frames 49,97,193; batches never mix frame counts)."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from mova_train.data.config import DataConfig, check_data_config
from mova_train.data.contract import EMPTY_PROMPT_NAME, load_manifest
from mova_train.data.errors import CodecIdentityError, LoaderError
from mova_train.data.loader import build_loader
from mova_train.data.shards import resolve_shards
from mova_train.data.synthetic import make_synthetic_sample, write_shard_set
from mova_train.errors import ConfigValueError

TEXT_LEN = 16
TEXT_DIM = 32
BUCKETS_32 = "32x64,64x32,48x48"

pytest_plugins = ["tests.fixtures_data"]


def _write_set(
    folder: Path, prefix: str, shard_sizes: list[int], *, seed: int, frames=(9,), **kwargs
) -> dict:
    """A shard set whose clip ids start with `prefix`; returns {clip id: (meta, tensors)}. Samples cycle through
    `frames` so a set can hold several frame buckets."""
    g = torch.Generator().manual_seed(seed)
    shards, by_key, n = [], {}, 0
    for i, size in enumerate(shard_sizes):
        samples = []
        for k in range(size):
            key = f"{prefix}_{i:02d}_{k:02d}"
            sample = make_synthetic_sample(
                key,
                num_frames=frames[n % len(frames)],
                num_tokens=1 + (n % 5),
                text_dim=TEXT_DIM,
                audio_channels=8,
                generator=g,
                codec_identity=kwargs.get("codec_identity", "synthetic-codecs"),
            )
            samples.append(sample)
            by_key[key] = sample
            n += 1
        shards.append(samples)
    write_shard_set(folder, shards, **kwargs)
    return by_key


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """Set `a`: 4 shards x 2 samples (8), with its empty prompt; set `b`: 4 shards x 4 samples (16), with its own."""
    base = tmp_path_factory.mktemp("mix")
    a = _write_set(base / "a", "a", [2, 2, 2, 2], seed=1, empty_prompt=torch.full((2, TEXT_DIM), 0.5))
    b = _write_set(base / "b", "b", [4, 4, 4, 4], seed=2, empty_prompt=torch.full((3, TEXT_DIM), -0.25))
    return base, {**a, **b}


def _loader(
    shards,
    *,
    seed=3,
    resample=True,
    batch_size=2,
    shuffle_buffer=4,
    text_len=TEXT_LEN,
    num_workers=0,
    **kwargs,
):
    cfg = DataConfig(
        shards=shards,
        batch_size=batch_size,
        num_workers=num_workers,
        shuffle_buffer=shuffle_buffer,
        resample=resample,
        **kwargs,
    )
    return build_loader(cfg, rank=0, world_size=1, seed=seed, text_len=text_len, expected_codec_identity=None)


def _take(loader, n):
    it = iter(loader)
    out = [b for _, b in zip(range(n), it)]
    del it
    return out


def test_weights_give_each_set_its_share_of_the_stream(sets):
    base, _ = sets
    # a: 8 samples, weight 1.25; b: 16 samples, weight 1. b is read once per pass (16 samples), a gets 1.25 x 16 =
    # 20 samples = 10 shard reads: each of its 4 shards twice plus 2 of them chosen by the seed for each pass.
    spec = [{"path": str(base / "a"), "weight": 1.25}, {"path": str(base / "b"), "weight": 1.0}]
    loader = _loader(spec, shuffle_buffer=0, batch_size=1)
    assert loader.shards.pass_length == 10 + 4
    per_pass = 36
    batches = _take(loader, 3 * per_pass)
    for p in range(3):
        counts = Counter(k[0] for b in batches[p * per_pass : (p + 1) * per_pass] for k in b.keys)
        assert counts == {"a": 20, "b": 16}, p
    # the fractional part is a different pair of a's shards from pass to pass, not always the same two
    shard_reads = [
        Counter(k[:4] for b in batches[p * per_pass : (p + 1) * per_pass] for k in b.keys if k[0] == "a")
        for p in range(3)
    ]
    # every a-shard holds 2 samples: read twice -> 4 samples, three times -> 6
    assert all(sorted(r.values()) == [4, 4, 6, 6] for r in shard_reads)
    assert len({frozenset(s for s, n in r.items() if n == 6) for r in shard_reads}) > 1
    assert loader.stats["sets"] == {str(base / "a"): 60, str(base / "b"): 48}
    # the run fingerprint (checkpointer) and the loader state name the same mix; one set keeps its old fingerprint
    assert resolve_shards(spec).fingerprint() == loader.shards.fingerprint()
    assert _loader(str(base / "a")).shards.fingerprint() == resolve_shards(str(base / "a")).fingerprint()
    assert loader.shards.fingerprint() != resolve_shards([str(base / "a"), str(base / "b")]).fingerprint()


def test_repeats_read_a_set_that_many_times_per_epoch(sets):
    base, samples = sets
    spec = [{"path": str(base / "a"), "repeats": 3}, str(base / "b")]
    loader = _loader(spec, resample=False)
    keys = Counter(k for b in loader for k in b.keys)
    assert keys == {k: (3 if k.startswith("a") else 1) for k in samples}
    assert loader.stats["sets"] == {str(base / "a"): 24, str(base / "b"): 16}


@pytest.mark.parametrize(("resample", "num_workers"), [(True, 0), (False, 0), (True, 2)])
def test_a_mixed_loader_resumes_with_identical_samples(sets, resample, num_workers):
    base, _ = sets
    spec = [{"path": str(base / "a"), "weight": 1.25}, {"path": str(base / "b"), "weight": 1.0}]
    if not resample:
        spec = [{"path": str(base / "a"), "repeats": 2}, {"path": str(base / "b")}]

    def run(loader, n=30):
        return _take(loader, n) if resample else list(loader) + list(loader)

    full = run(_loader(spec, resample=resample, caption_dropout=0.3, num_workers=num_workers))
    first = _loader(spec, resample=resample, caption_dropout=0.3, num_workers=num_workers)
    head = _take(first, 7)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = _loader(spec, resample=resample, caption_dropout=0.3, num_workers=num_workers)
    resumed.load_state_dict(state)
    tail = run(resumed, 30 - 7)
    got = head + tail
    assert [b.keys for b in got] == [b.keys for b in full]
    for a, b in zip(got, full):
        for name in ("video", "audio", "text", "text_lengths"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
        assert [m.get("caption_dropped", False) for m in a.meta] == [
            m.get("caption_dropped", False) for m in b.meta
        ]
    # a state of another caption dropout, of the single set, or of another mix, is not continued
    with pytest.raises(LoaderError, match="caption_dropout"):
        _loader(spec, resample=resample, num_workers=num_workers).load_state_dict(state)
    other = _loader(
        [{"path": str(base / "a"), "repeats": 3}, str(base / "b")],
        resample=resample,
        caption_dropout=0.3,
        num_workers=num_workers,
    )
    with pytest.raises(LoaderError, match="shard set"):
        other.load_state_dict(state)
    # a state saved before caption dropout existed (no such layout field) resumes a loader without it
    old = json.loads(json.dumps(state))
    del old["layout"]["caption_dropout"]
    _loader(spec, resample=resample, num_workers=num_workers).load_state_dict(old)


def test_an_elastic_resume_of_a_mix_reads_every_planned_sample_once(sets):
    base, samples = sets
    spec = [{"path": str(base / "a"), "repeats": 2}, str(base / "b")]

    def loader(rank, world):
        cfg = DataConfig(shards=spec, batch_size=2, num_workers=0, shuffle_buffer=3, resample=False)
        return build_loader(
            cfg, rank=rank, world_size=world, seed=5, text_len=TEXT_LEN, expected_codec_identity=None
        )

    ranks = [loader(r, 2) for r in range(2)]
    seen = [k for r in ranks for b in _take(r, 4) for k in b.keys]
    states = [json.loads(json.dumps(r.state_dict())) for r in ranks]
    single = loader(0, 1)
    single.load_resplit_state(states)
    seen += [k for b in single for k in b.keys]
    assert Counter(seen) == {k: (2 if k.startswith("a") else 1) for k in samples}


def test_caption_dropout_replaces_exactly_the_chosen_samples_text(sets):
    base, samples = sets
    empties = {p: load_manifest(base / p) for p in ("a", "b")}
    assert all(m.empty_prompt_file == EMPTY_PROMPT_NAME for m in empties.values())
    spec = [str(base / "a"), str(base / "b")]

    def dropped(seed):
        out = {}
        for batch in _loader(spec, seed=seed, resample=False, caption_dropout=0.5):
            for i, (key, meta) in enumerate(zip(batch.keys, batch.meta)):
                n = int(batch.text_lengths[i])
                text = batch.text[i]
                assert torch.count_nonzero(text[n:]) == 0  # padding stays zero
                if meta.get("caption_dropped"):
                    want = (
                        torch.full((2, TEXT_DIM), 0.5) if key[0] == "a" else torch.full((3, TEXT_DIM), -0.25)
                    )
                else:
                    want = samples[key][1]["text"]
                assert torch.equal(text[:n], want), key
                out[key] = bool(meta.get("caption_dropped"))
        return out

    first, again, other = dropped(3), dropped(3), dropped(4)
    assert set(first) == set(samples)
    assert first == again  # the same seed drops the same captions
    assert first != other  # another seed drops others
    assert 0 < sum(first.values()) < len(first)
    # without dropout nothing is replaced
    assert not any(m.get("caption_dropped") for b in _loader(spec, resample=False) for m in b.meta)


def test_caption_dropout_is_refused_for_a_shard_set_without_the_empty_prompt(sets, tmp_path):
    base, _ = sets
    _write_set(tmp_path / "old", "o", [2], seed=7)  # written before the empty prompt existed
    spec = [str(base / "a"), str(tmp_path / "old")]
    _loader(spec)  # fine without dropout
    with pytest.raises(LoaderError, match=r"python -m data_tools empty-prompt .*old --checkpoint CKPT"):
        _loader(spec, caption_dropout=0.1)
    changed = tmp_path / "changed"
    shutil.copytree(base / "a", changed)
    torch_file = changed / EMPTY_PROMPT_NAME
    torch_file.write_bytes(torch_file.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(LoaderError, match="sha256"):
        _loader(str(changed), caption_dropout=0.1)
    with pytest.raises(ConfigValueError, match=r"data\.caption_dropout"):
        check_data_config({"shards": str(base / "a"), "caption_dropout": 1.0})


def test_bad_shard_lists_are_refused_naming_the_entry(sets, tmp_path):
    base, _ = sets
    a, b = str(base / "a"), str(base / "b")
    bad = {
        r"data\.shards\[1\]: unknown key\(s\) \['wieght'\]": [a, {"path": b, "wieght": 2}],
        r"data\.shards\[0\]\.weight must be a number > 0": [{"path": a, "weight": -1}, b],
        r"data\.shards\[1\]\.repeats must be an integer >= 1": [a, {"path": b, "repeats": 1.5}],
        r"data\.shards\[0\]\.path": [{"weight": 2}],
        r"use one of the two": [{"path": a, "weight": 2}, {"path": b, "repeats": 2}],
        r"names .* twice": [a, a],
        r"non-empty list": [],
    }
    for message, spec in bad.items():
        with pytest.raises(ConfigValueError, match=message):
            DataConfig(shards=spec).validated()
    with pytest.raises(ConfigValueError, match=r"data\.shards\[1\] \(.*missing.*\)"):
        DataConfig(shards=[a, str(tmp_path / "missing")]).validated(check_shards=True)
    _write_set(tmp_path / "other", "x", [2], seed=8, codec_identity="other-codecs")
    with pytest.raises(CodecIdentityError, match="same codecs"):
        _loader([a, str(tmp_path / "other")])
    # the list form composes through Hydra (the command-line override of train.py)
    from mova_train.config import compose_config

    cfg = compose_config([f"data.shards=[{{path:{a},weight:2}},{{path:{b}}}]"])
    assert check_data_config(cfg.data).shards == [{"path": a, "weight": 2.0}, {"path": b, "weight": 1.0}]


def test_batches_never_mix_frame_counts(tmp_path):
    samples = _write_set(tmp_path / "frames", "f", [5, 6], seed=9, frames=(9, 17))
    manifest = load_manifest(tmp_path / "frames")
    assert manifest.frame_counts == {"9": 6, "17": 5}
    assert set(manifest.shapes) == {"32x48/9", "32x48/17"}
    loader = _loader(str(tmp_path / "frames"), resample=False, batch_size=2)
    batches = list(loader)
    assert loader.stats["rejected_total"] == 0  # every sample matches its (bucket, frames) shapes
    assert Counter(k for b in batches for k in b.keys) == dict.fromkeys(samples, 1)
    for b in batches:
        assert len({m["num_frames"] for m in b.meta}) == 1
        assert b.video.shape[2] == (b.meta[0]["num_frames"] - 1) // 4 + 1


def test_frame_buckets_plan_the_longest_length_that_fits(tmp_path):
    from data_tools.plan import parse_frames, plan
    from data_tools.scan import scan
    from data_tools.synth import synthesize

    root = tmp_path / "long"
    synthesize(root, num_clips=1, seconds=6.5, seed=13)  # 156 frames: fits 97, not 193
    sources = scan(root)
    frames = parse_frames("49,97,193")
    assert frames == (193, 97, 49)
    rows = plan(sources, num_frames=frames, fps=24.0, buckets="64x64", max_shift_s=0.3)
    kept = [r for r in rows if r["status"] == "kept"]
    # one 97-frame clip, its 59-frame tail gives one 49-frame clip; the 10 frames left are listed as a tail
    assert [r["num_frames"] for r in kept] == [97, 49]
    for r in kept:
        assert r["end_s"] - r["start_s"] == pytest.approx(r["num_frames"] / 24.0, abs=1e-5)
    assert kept[1]["start_s"] >= kept[0]["end_s"] - 1e-6  # back to back, no overlap (stride = each length)
    side = json.loads((root / kept[0]["relpath"].replace(".mp4", ".events.json")).read_text())
    for r in kept:  # moved cuts still avoid words
        for t in (r["start_s"], r["end_s"]):
            assert not any(a + 0.03 < t < b - 0.03 for a, b in side["speech_spans_s"]), t
    assert any("tail" in r["reason"] for r in rows if r["status"] == "rejected")
    # a source shorter than the shortest length has none; a single length still plans as before
    assert all(
        r["num_frames"] == 49
        for r in plan(sources, num_frames=49, fps=24.0, buckets="64x64")
        if r["status"] == "kept"
    )
    short = plan(sources, num_frames=(193, 241), fps=24.0, buckets="64x64")
    assert [r["status"] for r in short] == ["rejected"] and "193 frames" in short[0]["reason"]


def test_encode_writes_frame_buckets_and_the_empty_prompt(data_input, tiny_checkpoint, tmp_path, capsys):
    """plan --frames 9,33 -> encode with the tiny codecs: both lengths in the manifest and in verify-clean shards,
    batches per (bucket, frames), and empty_prompt.safetensors = "" encoded as a caption (and rewritten identically
    by `data_tools empty-prompt` for a folder that lacks it)."""
    from safetensors.torch import load_file

    from data_tools.__main__ import main
    from data_tools.encode import EncodeOptions, encode, encode_text
    from data_tools.plan import plan
    from data_tools.scan import scan
    from data_tools.verify import verify
    from mova_train.codecs import load_codecs

    sources = [s for s in scan(data_input) if s["relpath"] == "synth_000.mp4"]
    rows = plan(sources, num_frames=(9, 33), fps=24.0, buckets=BUCKETS_32, max_shift_s=0)
    kept = [r for r in rows if r["status"] == "kept"]
    # 2 s = 48 frames: a 33-frame clip, then a 9-frame one from the 15-frame tail
    assert [r["num_frames"] for r in kept] == [33, 9]
    out = tmp_path / "shards"
    encode(rows, EncodeOptions(checkpoint=str(tiny_checkpoint), out=str(out), latent_dtype="float32"))
    manifest = load_manifest(out)
    assert manifest.frame_counts == {"9": 1, "33": 1}
    assert all("/" in k for k in manifest.shapes)
    result = verify(out, checkpoint=tiny_checkpoint)
    assert not result.problems, result.problems
    codecs = load_codecs(tiny_checkpoint, components=("text_encoder",))
    with torch.inference_mode():
        want = encode_text(codecs, "").to(torch.float32)
    stored = load_file(str(out / manifest.empty_prompt_file))["text"]
    assert torch.equal(stored, want) and stored.shape[0] >= 1
    loader = _loader(
        str(out),
        resample=False,
        batch_size=2,
        shuffle_buffer=0,
        caption_dropout=0.9,
        text_len=codecs.text_len,
    )
    batches = list(loader)
    assert sorted(m["num_frames"] for b in batches for m in b.meta) == [9, 33]
    assert all(len({m["num_frames"] for m in b.meta}) == 1 for b in batches)

    old = tmp_path / "old"
    shutil.copytree(out, old)
    (old / EMPTY_PROMPT_NAME).unlink()
    raw = json.loads((old / "manifest.json").read_text())
    raw.update(empty_prompt_file="", empty_prompt_sha256="")
    (old / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(LoaderError, match="empty-prompt"):
        _loader(str(old), caption_dropout=0.1, text_len=codecs.text_len)
    assert main(["empty-prompt", str(old), "--checkpoint", str(tiny_checkpoint)]) == 0
    assert (old / EMPTY_PROMPT_NAME).read_bytes() == (out / EMPTY_PROMPT_NAME).read_bytes()
    assert load_manifest(old).empty_prompt_sha256 == manifest.empty_prompt_sha256
    _loader(str(old), caption_dropout=0.1, text_len=codecs.text_len)
    assert not verify(old).problems
    (old / EMPTY_PROMPT_NAME).write_bytes(b"changed")
    assert any(EMPTY_PROMPT_NAME in p for p in verify(old).problems)


def test_training_on_a_mix_with_caption_dropout_resumes_exactly(tiny_checkpoint, tmp_path):
    """train (in this process, tiny model) on two shard sets with repeats and caption dropout: 2 steps + resume to 4
    gives the losses of 4 uninterrupted steps (the checkpointer's fingerprint and the loader state hold the mix)."""
    from data_tools.empty_prompt import add_empty_prompt
    from mova_train.training.synthetic import write_random_shards_for
    from mova_train.training.trainer import run
    from tests.train_utils import compose_train, read_metrics, reset_accelerate, tiny_overrides

    a = write_random_shards_for(tiny_checkpoint, tmp_path / "a", num_clips=2)
    b = write_random_shards_for(tiny_checkpoint, tmp_path / "b", num_clips=1, seed=1)
    for folder in (a, b):
        add_empty_prompt(folder, tiny_checkpoint)
    mix = [f"data.shards=[{{path:{a},repeats:2}},{{path:{b}}}]", "data.caption_dropout=0.5"]

    def train(run_dir, *extra):
        reset_accelerate()
        overrides = tiny_overrides(tiny_checkpoint, a, run_dir, "trainer.save_every=100", *mix, *extra)
        return run(compose_train(overrides))

    try:
        assert train(tmp_path / "full", "trainer.max_steps=4").step == 4
        assert train(tmp_path / "resumed", "trainer.max_steps=4", "trainer.max_steps_per_run=2").step == 2
        assert train(tmp_path / "resumed", "trainer.max_steps=4").step == 4
    finally:
        reset_accelerate()
    losses = [r["loss"] for r in read_metrics(tmp_path / "full")]
    assert [r["loss"] for r in read_metrics(tmp_path / "resumed")] == losses and len(losses) == 4
