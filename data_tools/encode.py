"""`data_tools encode`: decode + align every kept clip of a plan, encode it with the frozen codecs of a base
checkpoint (video latents, I2V first-frame latents, audio latents, unpadded text embeddings) and write WebDataset
shards plus `manifest.json` following `mova_train.data.contract`.

Multi-GPU / multi-node: `accelerate launch -m data_tools encode ...`; rank r takes the clips with index % world ==
r (deterministic) and writes `shard-{r:03d}-*.tar`; rank 0 writes the manifest and the report after all ranks
finished. Rerunning the same command after an interruption resumes (see `data_tools.shards`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from data_tools.align import AlignedClip, load_clip, num_audio_samples
from data_tools.common import (
    DATA_TOOLS_VERSION,
    PLAN_NAME,
    REPORT_NAME,
    SOURCES_NAME,
    DataToolsError,
    ensure_writable_dir,
    log,
    progress,
    read_jsonl,
    write_bytes_atomic,
)
from data_tools.distributed import DistContext, distributed_context
from data_tools.export import export_clip
from data_tools.faults import kill_if_requested
from data_tools.manifest import build_manifest
from data_tools.report import build_report, write_report
from data_tools.shards import (
    PROGRESS_DIR,
    ShardRecord,
    ShardWriter,
    journal_path,
    read_journal,
    remove_stale_tmp,
)
from mova_train.data.contract import SCHEMA_VERSION, encode_sample, write_empty_prompt
from mova_train.identity import base_identity
from mova_train.names import MODEL_INDEX_NAME
from mova_train.progress import format_duration

OPTIONS_NAME = "options.json"
LATENT_DTYPES = ("bfloat16", "float32", "float16")


@dataclass
class EncodeOptions:
    checkpoint: str
    out: str
    shard_size_mb: float = 1024.0
    max_samples_per_shard: int = 0
    latent_dtype: str = "bfloat16"
    device: str = "auto"
    codec_dtype: str = "float32"
    workers: int = 1
    export_clips: str | None = None
    overwrite: bool = False
    extra_options: dict = field(
        default_factory=dict
    )  # recorded in the manifest (plan/scan options of prepare)


def encode_clip(codecs, clip: AlignedClip, caption: str, latent_dtype) -> dict:
    """Tensors of one sample: video, first_frame [16, T', h, w], audio [Ca, L], text [n_tokens, Dt]."""
    frames = torch.from_numpy(clip.frames)  # [N, H, W, 3] uint8
    video = frames.permute(3, 0, 1, 2)[None].float().div(127.5).sub(1.0)  # [1, 3, N, H, W] in [-1, 1]
    latents = codecs.video_vae.encode(video)[0]
    first = codecs.video_vae.encode_condition(video[:, :, 0], video.shape[2])[0]
    wave = torch.from_numpy(np.ascontiguousarray(clip.audio))[None, None]  # [1, 1, S]
    audio, _ = codecs.audio_vae.encode(wave)
    out = {"video": latents, "first_frame": first, "audio": audio[0], "text": encode_text(codecs, caption)}
    return {k: v.detach().to("cpu", latent_dtype).contiguous() for k, v in out.items()}


def encode_text(codecs, caption: str) -> torch.Tensor:
    """The unpadded text embedding [n_tokens, Dt] of one caption (float32; the caller casts it)."""
    emb, lengths = codecs.text_encoder.encode([caption])
    return emb[0, : int(lengths[0])]


def write_empty_prompt_file(codecs, out: Path, latent_dtype) -> tuple[str, str]:
    """The shard set's empty-prompt embedding (caption dropout): "" encoded exactly as a caption, stored as
    `empty_prompt.safetensors` in `out`; returns (file name, sha256) for the manifest."""
    text = encode_text(codecs, "").detach().to("cpu", latent_dtype).contiguous()
    return write_empty_prompt(out, text)


def build_meta(row: dict, clip: AlignedClip, codec_identity: str) -> dict:
    return {
        "clip_id": row["clip_id"],
        "source": row["relpath"],
        "start_s": float(row["start_s"]),
        "end_s": float(row["end_s"]),
        "fps": float(row["fps"]),
        "num_frames": int(row["num_frames"]),
        "height": int(row["height"]),
        "width": int(row["width"]),
        "bucket": row["bucket"],
        "audio_sample_rate": int(clip.sample_rate),
        "num_audio_samples": int(clip.audio.shape[0]),
        "audio_offset_s": float(clip.audio_offset_s),
        "stream_offset_s": round(float(clip.stream_offset_s), 6),
        "caption": row["caption"],
        "content_sha256": clip.content_sha256(row["caption"]),
        "codec_identity": codec_identity,
        "data_tools_version": DATA_TOOLS_VERSION,
        "schema_version": SCHEMA_VERSION,
        "notes": clip.notes,
    }


def plan_digest(rows: list[dict]) -> str:
    text = json.dumps(rows, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _fingerprint(opts: EncodeOptions, kept: list[dict], codec_identity: str, world_size: int) -> dict:
    """What decides the bytes of the shards; a resume with anything different is refused."""
    return {
        "plan_sha256": plan_digest(kept),
        "codec_identity": codec_identity,
        "world_size": world_size,
        "shard_size_mb": opts.shard_size_mb,
        "max_samples_per_shard": opts.max_samples_per_shard,
        "latent_dtype": opts.latent_dtype,
        "codec_dtype": opts.codec_dtype,
        "data_tools_version": DATA_TOOLS_VERSION,
    }


def clear_outputs(out: Path) -> None:
    for path in list(out.glob("shard-*.tar")) + list(out.glob("shard-*.tar.tmp")):
        path.unlink()
    for name in ("manifest.json", REPORT_NAME, "report.txt"):
        if (out / name).exists():
            (out / name).unlink()
    shutil.rmtree(out / PROGRESS_DIR, ignore_errors=True)


def check_resume(out: Path, fingerprint: dict, *, overwrite: bool) -> None:
    """Rank 0: refuse to mix shards of different runs; `--overwrite` starts over."""
    path = out / PROGRESS_DIR / OPTIONS_NAME
    if overwrite:
        clear_outputs(out)
    elif path.is_file():
        previous = json.loads(path.read_text(encoding="utf-8"))
        changed = sorted(k for k in set(previous) | set(fingerprint) if previous.get(k) != fingerprint.get(k))
        if changed:
            details = "; ".join(f"{k}: {previous.get(k)!r} -> {fingerprint.get(k)!r}" for k in changed)
            raise DataToolsError(
                f"{out} holds shards of a different run ({details}); use a new --out folder or pass --overwrite"
            )
    elif any(out.glob("shard-*.tar")):
        raise DataToolsError(
            f"{out} already holds shard files not written by this tool; use a new --out folder"
        )
    write_bytes_atomic(path, (json.dumps(fingerprint, sort_keys=True, indent=1) + "\n").encode("utf-8"))


def encode_rank(
    codecs,
    rows: list[dict],
    out: Path,
    ctx: DistContext,
    opts: EncodeOptions,
    codec_identity: str,
    latent_dtype,
) -> list[ShardRecord]:
    """Encode this rank's clips, resuming after the clips its journal lists."""
    journal = read_journal(journal_path(out, ctx.rank))
    done = {c for r in journal for c in r.clip_ids} | {s["clip_id"] for r in journal for s in r.skipped}
    remove_stale_tmp(out, ctx.rank)
    todo = [r for r in rows if r["clip_id"] not in done]
    if done and todo:
        log(f"encode[rank {ctx.rank}]: resuming, {len(rows) - len(todo)} clips done, {len(todo)} to go")
    start_index = 1 + max((r.index for r in journal if r.name), default=-1)
    writer = ShardWriter(
        out,
        ctx.rank,
        start_index=start_index,
        target_bytes=int(opts.shard_size_mb * 1024 * 1024),
        max_samples=opts.max_samples_per_shard,
    )

    def load(row: dict) -> AlignedClip | DataToolsError:
        try:
            return load_clip(row, sample_rate=codecs.sample_rate)
        except DataToolsError as e:
            return e
        except Exception as e:  # noqa: BLE001 - a damaged user file must cost one clip, never the run
            return DataToolsError(f"{row['relpath']}: decoding failed ({type(e).__name__}: {e})")

    pool = ThreadPoolExecutor(max(1, opts.workers)) if opts.workers > 0 else None
    written = 0
    try:
        # decode the next clips in background threads while the codecs run on the current one (in order)
        ahead = max(1, 2 * opts.workers)
        futures: list[Future | AlignedClip | DataToolsError] = []
        for i in range(min(ahead, len(todo))):
            futures.append(pool.submit(load, todo[i]) if pool else load(todo[i]))
        bar = progress(range(len(todo)), total=len(todo), desc=f"encode[{ctx.rank}]", unit="clip")
        for i in bar:
            row = todo[i]
            item = futures[i]
            clip = item.result() if isinstance(item, Future) else item
            nxt = i + ahead
            if nxt < len(todo):
                futures.append(pool.submit(load, todo[nxt]) if pool else load(todo[nxt]))
            futures[i] = None  # free the decoded frames
            if isinstance(clip, DataToolsError):
                writer.skip(row["clip_id"], str(clip), row["relpath"])
                continue
            if opts.export_clips:
                export_clip(opts.export_clips, row, clip)
            tensors = encode_clip(codecs, clip, row["caption"], latent_dtype)
            meta = build_meta(row, clip, codec_identity)
            summary = {
                "clip_id": row["clip_id"],
                "relpath": row["relpath"],
                "bucket": row["bucket"],
                "num_frames": int(row["num_frames"]),
                "seconds": int(row["num_frames"]) / float(row["fps"]),
                "caption_chars": len(row["caption"]),
                "caption_words": len(row["caption"].split()),
                "text_tokens": int(tensors["text"].shape[0]),
                "shapes": {k: list(v.shape) for k, v in tensors.items()},
            }
            writer.write(encode_sample(meta, tensors), summary)
            written += 1
            kill_if_requested(written)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        if pool:
            pool.shutdown(wait=True, cancel_futures=True)
    return writer.finished


def encode(plan_rows: list[dict], opts: EncodeOptions, *, sources: list[dict] | None = None) -> dict:
    """Encode the kept clips of `plan_rows` into shards under opts.out; returns a summary (rank 0: manifest)."""
    if opts.latent_dtype not in LATENT_DTYPES:
        raise DataToolsError(f"--latent-dtype {opts.latent_dtype}: allowed {', '.join(LATENT_DTYPES)}")
    if opts.codec_dtype not in ("float32", "bfloat16"):
        raise DataToolsError(f"--codec-dtype {opts.codec_dtype}: allowed float32, bfloat16")
    if opts.shard_size_mb <= 0:
        raise DataToolsError(f"--shard-size-mb {opts.shard_size_mb}: must be positive")
    out = ensure_writable_dir(opts.out, what="shard folder")
    if opts.export_clips:
        ensure_writable_dir(opts.export_clips, what="--export-clips folder")
    ckpt = Path(opts.checkpoint)
    if not (ckpt / MODEL_INDEX_NAME).is_file():
        raise DataToolsError(f"--checkpoint {ckpt}: not a MOVA checkpoint folder (no {MODEL_INDEX_NAME})")
    kept = [r for r in plan_rows if r.get("status") == "kept"]
    if not kept:
        raise DataToolsError("the clip plan has no kept clips; see its rejection reasons (data_tools report)")
    buckets = {r["bucket"] for r in kept}
    rates = {float(r["fps"]) for r in kept}
    if len(rates) != 1:
        raise DataToolsError(f"the clip plan mixes frame rates {sorted(rates)}; plan them apart")
    fps = rates.pop()
    # several frame counts are frame buckets (plan --frames 49,97,193): the loader batches each apart
    frames = sorted({int(r["num_frames"]) for r in kept})
    num_frames = frames[-1]

    ctx = distributed_context(opts.device)
    # imported here: the codecs pull in transformers and the VAEs, and `python -m data_tools` imports every
    # command's module to build its parser
    from mova_train.codecs import load_codecs

    started = time.monotonic()
    log(f"encode[rank {ctx.rank}]: loading the codecs of {ckpt} on {ctx.device}")
    codecs = load_codecs(ckpt, device=ctx.device, dtype=getattr(torch, opts.codec_dtype))
    log(f"encode[rank {ctx.rank}]: codecs loaded in {format_duration(time.monotonic() - started)}")
    identity = codecs.identity
    if ctx.rank == 0:
        check_resume(out, _fingerprint(opts, kept, identity, ctx.world_size), overwrite=opts.overwrite)
    ctx.barrier()
    if ctx.rank != 0:
        # every rank checks the fingerprint rank 0 accepted, so no rank resumes a different run
        check_resume(out, _fingerprint(opts, kept, identity, ctx.world_size), overwrite=False)

    mine = kept[ctx.rank :: ctx.world_size]
    latent_dtype = getattr(torch, opts.latent_dtype)
    with torch.inference_mode():
        encode_rank(codecs, mine, out, ctx, opts, identity, latent_dtype)
    ctx.barrier()
    summary: dict = {"rank": ctx.rank, "world_size": ctx.world_size}
    if ctx.rank == 0:
        with torch.inference_mode():
            empty_prompt = write_empty_prompt_file(codecs, out, latent_dtype)
        options = {
            "num_frames": num_frames,
            **({"frame_buckets": frames} if len(frames) > 1 else {}),
            "fps": fps,
            "buckets": sorted(buckets),
            "shard_size_mb": opts.shard_size_mb,
            "max_samples_per_shard": opts.max_samples_per_shard,
            "latent_dtype": opts.latent_dtype,
            "codec_dtype": opts.codec_dtype,
            "world_size": ctx.world_size,
            "audio_samples_per_clip": num_audio_samples(num_frames, fps, codecs.sample_rate),
            "plan_sha256": plan_digest(kept),
            **opts.extra_options,
        }
        manifest = build_manifest(
            out, ctx.world_size, codecs, base_identity(ckpt), options, empty_prompt=empty_prompt
        )
        report = build_report(out, ctx.world_size, sources, plan_rows)
        summary.update(manifest=asdict(manifest), report=report, report_text=write_report(out, report))
    ctx.barrier()
    return summary


def add_encode_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint", required=True, help="MOVA checkpoint folder whose codecs encode the clips"
    )
    parser.add_argument(
        "--shard-size-mb", type=float, default=1024.0, help="target shard size in MiB (default 1024)"
    )
    parser.add_argument(
        "--max-samples-per-shard",
        type=int,
        default=0,
        help="also close a shard at this many clips (0 = no limit)",
    )
    parser.add_argument(
        "--latent-dtype",
        default="bfloat16",
        choices=LATENT_DTYPES,
        help="dtype of the stored latents (default bfloat16)",
    )
    parser.add_argument(
        "--codec-dtype",
        default="float32",
        choices=("float32", "bfloat16"),
        help="compute dtype of the video VAE and text encoder (the DAC always runs in float32; default float32)",
    )
    parser.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:N or auto (default: the rank's GPU or cpu)"
    )
    parser.add_argument(
        "--export-clips", default=None, metavar="DIR", help="also write each clip as an aligned mp4"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="delete shards of a previous run in --out first"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--plan", required=True, help=f"clip plan written by `plan` ({PLAN_NAME})")
    parser.add_argument(
        "--sources", default=None, help=f"sources table of `scan` ({SOURCES_NAME}), for the report"
    )
    parser.add_argument("--out", required=True, help="shard folder to write (manifest.json, shard-*.tar)")
    parser.add_argument("--workers", type=int, default=1, help="background decoding threads (default 1)")
    add_encode_options(parser)


def options_from_args(args: argparse.Namespace, out: str, extra: dict | None = None) -> EncodeOptions:
    return EncodeOptions(
        checkpoint=args.checkpoint,
        out=out,
        shard_size_mb=args.shard_size_mb,
        max_samples_per_shard=args.max_samples_per_shard,
        latent_dtype=args.latent_dtype,
        device=args.device,
        codec_dtype=args.codec_dtype,
        workers=args.workers,
        export_clips=args.export_clips,
        overwrite=args.overwrite,
        extra_options=extra or {},
    )


def run(args: argparse.Namespace) -> int:
    plan_rows = read_jsonl(args.plan, what="clip plan")
    sources = read_jsonl(args.sources, what="sources table") if args.sources else None
    summary = encode(plan_rows, options_from_args(args, args.out), sources=sources)
    if summary["rank"] == 0:
        log(summary["report_text"])
        m = summary["manifest"]
        log(f"encode: {m['num_samples']} clips in {len(m['shards'])} shards -> {args.out}")
    return 0
