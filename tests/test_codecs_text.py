"""UMT5 text encoder: prompt cleaning, 512-token layout, zeroed padding, true lengths, tied embedding storage."""

from __future__ import annotations

import shutil

import pytest
import torch

from mova_train.checkpoint_io import CheckpointError, load_component_state, read_json, save_component
from mova_train.codecs import CodecInputError, load_codecs
from mova_train.codecs.text_encoder import (
    EMBED_KEY,
    SHARED_KEY,
    load_umt5,
    prompt_clean,
)
from mova_train.codecs.tiny import write_tiny_codecs
from mova_train.names import TEXT_ENCODER_WEIGHTS_NAME


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_codecs")
    write_tiny_codecs(out, seed=7)
    return out


@pytest.fixture(scope="module")
def text_encoder(tiny_dir):
    return load_codecs(tiny_dir, components=("text_encoder",)).text_encoder


def test_prompt_clean():
    assert prompt_clean("  a   dog\n\tbarks  ") == "a dog barks"
    assert prompt_clean("rock &amp;amp; roll") == "rock & roll"  # unescaped twice
    assert prompt_clean("cafÃ©") == "café"  # ftfy repairs mojibake
    assert prompt_clean("") == ""


def test_tokenizer_is_t5_like(text_encoder):
    tok = text_encoder.tokenizer
    assert (tok.pad_token, tok.eos_token, tok.unk_token) == ("<pad>", "</s>", "<unk>")
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    ids = tok("A dog barks.")["input_ids"]
    assert ids[-1] == tok.eos_token_id
    assert tok("色调")["input_ids"][-2] == tok.unk_token_id


def test_encode_layout_lengths_and_zeroed_padding(text_encoder):
    prompts = ["A dog barks twice and runs.", "  rain  on a tin roof ", ""]
    emb, lengths = text_encoder.encode(prompts)
    assert emb.shape == (3, 512, 32) and emb.dtype == torch.float32
    # Lengths: the tokenizer's own count for the cleaned prompt (with its trailing EOS), unpadded.
    expected = [len(text_encoder.tokenizer(prompt_clean(p))["input_ids"]) for p in prompts]
    assert lengths.tolist() == expected
    assert lengths[2] == 1  # an empty prompt is just EOS
    for i, n in enumerate(lengths.tolist()):
        assert torch.equal(emb[i, n:], torch.zeros(512 - n, 32))
        assert bool((emb[i, :n].abs().sum(dim=-1) > 0).all())  # every real token keeps its embedding
    # Independent path: the model called directly with the padded ids and mask.
    ids, mask = text_encoder.tokenize(prompts)
    with torch.no_grad():
        direct = text_encoder.module(input_ids=ids, attention_mask=mask).last_hidden_state
    for i, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(emb[i, :n], direct[i, :n], rtol=0, atol=0)


def test_encode_is_deterministic_and_truncates(text_encoder):
    a, _ = text_encoder.encode(["A cat purrs."])
    b, _ = text_encoder.encode(["A cat purrs."])
    assert torch.equal(a, b)
    long_prompt = " ".join(["dog"] * 600)
    emb, lengths = text_encoder.encode([long_prompt])
    assert lengths.tolist() == [512]
    ids, _ = text_encoder.tokenize([long_prompt])
    assert ids[0, -1] == text_encoder.tokenizer.eos_token_id


@pytest.mark.parametrize(
    "bad, match", [("a dog", "list of strings"), ([], "empty"), (["ok", 3], "prompt 1 is a int")]
)
def test_bad_prompts_are_refused(text_encoder, bad, match):
    with pytest.raises(CodecInputError, match=match):
        text_encoder.encode(bad)


def _rewrite(tiny_dir, tmp_path, name, transform):
    src = tiny_dir / "text_encoder"
    state = load_component_state(src, weights_name=TEXT_ENCODER_WEIGHTS_NAME)
    out = tmp_path / name
    save_component(
        out, transform(state), config=read_json(src / "config.json"), weights_name="model", num_shards=3
    )
    return out


def test_either_tied_name_may_be_stored(tiny_dir, tmp_path, text_encoder):
    reference = text_encoder.module.shared.weight
    assert SHARED_KEY in load_component_state(tiny_dir / "text_encoder", weights_name="model")
    variants = {
        "embed_only": lambda s: {(EMBED_KEY if k == SHARED_KEY else k): v for k, v in s.items()},
        "both": lambda s: {**s, EMBED_KEY: s[SHARED_KEY].clone()},
    }
    for name, transform in variants.items():
        module, _ = load_umt5(_rewrite(tiny_dir, tmp_path, name, transform))
        assert torch.equal(module.shared.weight, reference), name
        assert module.shared.weight is module.encoder.embed_tokens.weight, name
    differing = _rewrite(tiny_dir, tmp_path, "differ", lambda s: {**s, EMBED_KEY: s[SHARED_KEY] + 1})
    with pytest.raises(CheckpointError, match="differ"):
        load_umt5(differing)
    neither = _rewrite(
        tiny_dir, tmp_path, "neither", lambda s: {k: v for k, v in s.items() if k != SHARED_KEY}
    )
    with pytest.raises(CheckpointError, match="missing"):
        load_umt5(neither)


def test_missing_tokenizer_is_reported(tiny_dir, tmp_path):
    for name in ("text_encoder", "video_vae"):
        shutil.copytree(tiny_dir / name, tmp_path / name)
    with pytest.raises(CheckpointError, match="tokenizer"):
        load_codecs(tmp_path, components=("text_encoder",))
