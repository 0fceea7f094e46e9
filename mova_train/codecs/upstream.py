"""Workarounds and version-specific calls into transformers, kept in one place (written against transformers
5.23; each note says what differs in 4.x).
"""

from __future__ import annotations

import os
from pathlib import Path

from transformers import T5TokenizerFast, UMT5Config, UMT5EncoderModel

from mova_train.checkpoint_io import CheckpointError


def build_umt5_encoder(config: UMT5Config) -> UMT5EncoderModel:
    """UMT5EncoderModel on the current default device with eager attention.

    transformers 5 picks SDPA for UMT5 by default; the reference (transformers 4.x, where T5-family models only had
    eager attention with the additive position bias) ran eager. We pin eager so our embeddings follow the reference
    arithmetic. In 4.x the private `_attn_implementation` attribute is also what the model reads.
    """
    config._attn_implementation = "eager"
    return UMT5EncoderModel(config)


def load_t5_tokenizer(folder: str | os.PathLike) -> T5TokenizerFast:
    """The T5/UMT5 tokenizer saved in `folder`, offline only (never reaches for the Hub).

    In transformers 5, `T5TokenizerFast` is an alias of the tokenizers-backed `T5Tokenizer`; in 4.x it is the fast
    class itself. Both read `tokenizer.json` (+ `tokenizer_config.json`).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"missing tokenizer folder: {folder}")
    if not (folder / "tokenizer.json").is_file() and not (folder / "spiece.model").is_file():
        raise CheckpointError(f"{folder} holds neither tokenizer.json nor spiece.model")
    try:
        return T5TokenizerFast.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot load the tokenizer in {folder}: {e}") from None


def t5_tokenizer_from_vocab(vocab: list[tuple[str, float]], *, model_max_length: int) -> T5TokenizerFast:
    """A T5 tokenizer (Unigram, Metaspace, trailing </s>) from `[(piece, log_prob), ...]` whose first three pieces
    are <pad>, </s>, <unk>.

    Uses the transformers 5 constructor `T5Tokenizer(vocab=...)`; 4.x's T5TokenizerFast has no `vocab` argument
    (there one would pass `tokenizer_object=`), so this helper is the single place to adapt.
    """
    if [p for p, _ in vocab[:3]] != ["<pad>", "</s>", "<unk>"]:
        raise ValueError(f"vocab must start with <pad>, </s>, <unk>; got {[p for p, _ in vocab[:3]]}")
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=model_max_length)
