"""Frozen UMT5 text encoder (transformers `UMT5EncoderModel`) + T5 tokenizer, with MOVA's prompt cleaning (spec §9).

Layouts: embeddings [B, 512, D] with the positions at and after each prompt's token count zeroed; lengths [B].
"""

from __future__ import annotations

import html
import logging
import os
import re
from pathlib import Path

import ftfy
import torch
from transformers import T5TokenizerFast, UMT5Config, UMT5EncoderModel

from mova_train.checkpoint_io import CheckpointError, load_module_strict, read_component_header, read_json
from mova_train.codecs.errors import CodecConfigError, CodecInputError
from mova_train.names import CONFIG_NAME, TEXT_ENCODER_WEIGHTS_NAME
from mova_train.upstream import build_umt5_encoder, load_t5_tokenizer

logger = logging.getLogger(__name__)

TEXT_LEN = 512  # tokens per prompt, padded/truncated (spec §9)
# The encoder's embedding is one tensor under two names; a checkpoint may store either or both.
SHARED_KEY = "shared.weight"
EMBED_KEY = "encoder.embed_tokens.weight"


def prompt_clean(text: str) -> str:
    """ftfy fix, HTML-unescape twice, collapse whitespace, strip (the Wan/MOVA prompt cleaning)."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return re.sub(r"\s+", " ", text).strip()


def umt5_config_from_dict(config: dict, *, where: str = "text_encoder config") -> UMT5Config:
    """A UMT5Config from `text_encoder/config.json`; architecture fields are required (no silent defaults)."""
    class_name = config.get("_class_name") or (config.get("architectures") or ["UMT5EncoderModel"])[0]
    if class_name != "UMT5EncoderModel":
        raise CodecConfigError(f"{where}: expected a UMT5EncoderModel config, got {class_name!r}")
    required = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads", "feed_forward_proj")
    missing = [k for k in required if k not in config]
    if missing:
        raise CodecConfigError(f"{where}: missing field(s) {missing}")
    return UMT5Config(**{k: v for k, v in config.items() if not k.startswith("_")})


def build_text_encoder_module(config: dict) -> UMT5EncoderModel:
    """Build on the current default device (wrap in `torch.device("meta")` for a weightless skeleton)."""
    return build_umt5_encoder(umt5_config_from_dict(config))


def load_umt5(
    folder: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[UMT5EncoderModel, dict]:
    """Build from `folder/config.json` on meta and fill strictly; returns (module, config dict).

    The embedding may be stored as `shared.weight`, `encoder.embed_tokens.weight` or both; if both, they must be
    equal. Either way the two names end up as one tensor, as in the model.
    """
    folder = Path(folder)
    config = read_json(folder / CONFIG_NAME)
    cfg = umt5_config_from_dict(config, where=str(folder / CONFIG_NAME))
    with torch.device("meta"):
        module = build_umt5_encoder(cfg)
    header = read_component_header(folder, weights_name=TEXT_ENCODER_WEIGHTS_NAME)
    tied = (
        {SHARED_KEY: EMBED_KEY}
        if EMBED_KEY in header and SHARED_KEY not in header
        else {EMBED_KEY: SHARED_KEY}
    )
    load_module_strict(
        module,
        folder,
        weights_name=TEXT_ENCODER_WEIGHTS_NAME,
        dtype=dtype,
        device=device,
        component="text_encoder",
        tied=tied,
    )
    if not torch.equal(module.shared.weight, module.encoder.embed_tokens.weight):
        raise CheckpointError(
            f"text_encoder ({folder}): both {SHARED_KEY} and {EMBED_KEY} are stored and they differ; "
            "they are one tied tensor in UMT5, so the checkpoint is inconsistent"
        )
    module.encoder.embed_tokens.weight = module.shared.weight  # one tensor again (frees a duplicate copy)
    return module.eval().requires_grad_(False), config


class TextEncoder:
    """Frozen UMT5 encoder: prompts -> ([B, 512, D] embeddings with padding zeroed, true token counts [B])."""

    def __init__(self, module: UMT5EncoderModel, tokenizer: T5TokenizerFast, *, text_len: int = TEXT_LEN):
        self.module = module
        self.tokenizer = tokenizer
        self.text_len = text_len
        if len(tokenizer) > module.config.vocab_size:
            raise CodecConfigError(
                f"text_encoder: the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                f"{module.config.vocab_size}; tokenizer/ and text_encoder/ do not belong together"
            )

    @property
    def dim(self) -> int:
        return int(self.module.config.d_model)

    @property
    def dtype(self) -> torch.dtype:
        return self.module.shared.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.module.shared.weight.device

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Cleaned, tokenized prompts -> (input_ids [B, 512], attention_mask [B, 512]); a trailing EOS is added and
        prompts longer than 512 tokens are truncated."""
        if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
            raise CodecInputError(
                f"text_encoder: prompts must be a list of strings, got {type(prompts).__name__}"
            )
        if not prompts:
            raise CodecInputError("text_encoder: prompts is an empty list")
        bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
        if bad:
            raise CodecInputError(
                f"text_encoder: prompt {bad[0]} is a {type(prompts[bad[0]]).__name__}, expected str"
            )
        tokens = self.tokenizer(
            [prompt_clean(p) for p in prompts],
            max_length=self.text_len,
            padding="max_length",
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        return tokens["input_ids"], tokens["attention_mask"]

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> (embeddings [B, 512, D] float32 with positions >= length zeroed, lengths [B] int64).

        Store `emb[i, :lengths[i]]` to keep shards small; zero-padding back to 512 restores the exact tensor.
        """
        ids, mask = self.tokenize(prompts)
        ids, mask = ids.to(self.device), mask.to(self.device)
        hidden = self.module(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, 512, D]
        lengths = mask.sum(dim=1).long()
        keep = torch.arange(self.text_len, device=self.device)[None, :] < lengths[:, None]  # [B, 512]
        emb = torch.where(keep[..., None], hidden.float(), 0.0)  # +0.0 exactly, so padding can be rebuilt
        return emb, lengths.cpu()


def load_text_encoder(
    text_encoder_dir: str | os.PathLike,
    tokenizer_dir: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[TextEncoder, dict]:
    module, config = load_umt5(text_encoder_dir, dtype=dtype, device=device)
    return TextEncoder(module, load_t5_tokenizer(tokenizer_dir)), config
