"""`data_tools empty-prompt SHARDS --checkpoint CKPT`: add the empty-prompt embedding that caption dropout
(`data.caption_dropout`) needs to a shard folder written before `prepare`/`encode` stored it.

Writes `SHARDS/empty_prompt.safetensors` (tensor `text` [n_tokens, Dt]: "" encoded by the checkpoint's UMT5 exactly
as encode embeds captions, in the folder's latent dtype) and records it in `manifest.json`. Only the text encoder is
loaded; the checkpoint's codecs must be the ones the shards were encoded with.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from data_tools.common import DataToolsError, log
from data_tools.encode import LATENT_DTYPES, write_empty_prompt_file
from mova_train.codecs.identity import codec_identity
from mova_train.data.contract import load_manifest, save_manifest
from mova_train.names import MODEL_INDEX_NAME


def add_empty_prompt(shards: str | Path, checkpoint: str | Path, *, device: str = "cpu") -> tuple[str, str]:
    """Write the folder's empty-prompt file and record it in its manifest; returns (file name, sha256)."""
    folder, ckpt = Path(shards), Path(checkpoint)
    manifest = load_manifest(folder)  # a folder without manifest.json is refused with its path named
    if not (ckpt / MODEL_INDEX_NAME).is_file():
        raise DataToolsError(f"--checkpoint {ckpt}: not a MOVA checkpoint folder (no {MODEL_INDEX_NAME})")
    identity = codec_identity(ckpt)
    if identity != manifest.codec_identity:
        raise DataToolsError(
            f"--checkpoint {ckpt}: its codecs ({identity[:16]}…) are not the ones {folder} was encoded with "
            f"({manifest.codec_identity[:16]}…); use that checkpoint"
        )
    latent_dtype = manifest.options.get("latent_dtype", "bfloat16")
    if latent_dtype not in LATENT_DTYPES:
        raise DataToolsError(
            f"{folder}/manifest.json: options.latent_dtype {latent_dtype!r} is not one of {LATENT_DTYPES}"
        )
    codec_dtype = manifest.options.get("codec_dtype", "float32")
    from mova_train.codecs import load_codecs  # imported here: pulls in transformers

    codecs = load_codecs(
        ckpt, device=device, dtype=getattr(torch, codec_dtype, torch.float32), components=("text_encoder",)
    )
    with torch.inference_mode():
        name, sha256 = write_empty_prompt_file(codecs, folder, getattr(torch, latent_dtype))
    manifest.empty_prompt_file, manifest.empty_prompt_sha256 = name, sha256
    save_manifest(folder, manifest)
    return name, sha256


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("shards", help="shard folder (with manifest.json) written by prepare / encode")
    parser.add_argument(
        "--checkpoint", required=True, help="the MOVA checkpoint the shards were encoded with"
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")


def run(args: argparse.Namespace) -> int:
    name, sha256 = add_empty_prompt(args.shards, args.checkpoint, device=args.device)
    log(
        f"empty-prompt: wrote {Path(args.shards) / name} (sha256 {sha256[:16]}…) and recorded it in manifest.json"
    )
    return 0
