"""`data_tools prepare INPUT_DIR --checkpoint CKPT --out SHARDS`: scan -> plan -> encode in one command.

The sources table, the clip plan and the report are written next to the shards (SHARDS/sources.jsonl, plan.jsonl,
report.jsonl + report.txt). Rerunning the same command resumes an interrupted run; on a finished one it changes
nothing. With `accelerate launch -m data_tools prepare ...`, rank 0 scans and plans, every rank encodes its slice.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from data_tools.common import (
    PLAN_NAME,
    SOURCES_NAME,
    DataToolsError,
    ensure_writable_dir,
    log,
    read_jsonl,
    write_jsonl_atomic,
)
from data_tools.distributed import distributed_context
from data_tools.encode import add_encode_options, encode, options_from_args
from data_tools.plan import add_plan_options, plan, plan_kwargs, summarize_plan
from data_tools.scan import add_scan_options, scan, summarize_sources
from mova_train.names import MODEL_INDEX_NAME


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input_dir", help="folder with the raw videos and captions (searched recursively)")
    parser.add_argument("--out", required=True, help="shard folder to write (created if needed)")
    add_scan_options(parser)
    add_plan_options(parser)
    add_encode_options(parser)


def run(args: argparse.Namespace) -> int:
    # everything a user can get wrong is checked before the first file is probed
    kwargs = plan_kwargs(args)
    if not Path(args.input_dir).is_dir():
        raise DataToolsError(f"input folder {args.input_dir} does not exist or is not a folder")
    if not (Path(args.checkpoint) / MODEL_INDEX_NAME).is_file():
        raise DataToolsError(
            f"--checkpoint {args.checkpoint}: not a MOVA checkpoint folder (no {MODEL_INDEX_NAME})"
        )
    out = ensure_writable_dir(args.out, what="--out folder")
    if args.export_clips:
        ensure_writable_dir(args.export_clips, what="--export-clips folder")

    ctx = distributed_context(args.device)
    if ctx.rank == 0:
        sources = scan(
            args.input_dir,
            captions=args.captions,
            allow_vfr=args.allow_vfr,
            default_caption=args.default_caption,
            workers=args.workers,
        )
        write_jsonl_atomic(out / SOURCES_NAME, sources)
        log(summarize_sources(sources))
        plan_rows = plan(sources, **kwargs)
        write_jsonl_atomic(out / PLAN_NAME, plan_rows)
        log(summarize_plan(plan_rows))
    ctx.barrier()
    if ctx.rank != 0:
        sources = read_jsonl(out / SOURCES_NAME, what="sources table")
        plan_rows = read_jsonl(out / PLAN_NAME, what="clip plan")
    extra = {
        "stride": kwargs["stride"] or kwargs["num_frames"],
        "min_frames": kwargs["min_frames"] or kwargs["num_frames"],
        "max_shift_s": kwargs["max_shift_s"],
        "skip_silent": kwargs["skip_silent"],
        "silence_db": kwargs["silence_db"],
        "skip_frozen": kwargs["skip_frozen"],
        "frozen_threshold": kwargs["frozen_threshold"],
        "allow_vfr": args.allow_vfr,
        "bucket_choices": [b.name for b in kwargs["buckets"]],
    }
    summary = encode(plan_rows, options_from_args(args, str(out), extra), sources=sources)
    if summary["rank"] == 0:
        log(summary["report_text"])
        m = summary["manifest"]
        log(
            f"prepare: {m['num_samples']} clips ({m['total_seconds'] / 3600:.3f} h) in {len(m['shards'])} shards "
            f"-> {out}; check them with: python -m data_tools verify {out}"
        )
    return 0
