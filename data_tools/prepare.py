"""`data_tools prepare INPUT_DIR --checkpoint CKPT --out SHARDS`: scan -> plan -> encode in one command.

The sources table, the clip plan and the report are written next to the shards (SHARDS/sources.jsonl, plan.jsonl,
report.jsonl + report.txt), with the options that decide them (SHARDS/prepare.json). Rerunning the same command
resumes an interrupted run; on a finished one it changes nothing. A run with other options (or other input) on a
folder that already holds shards is refused before anything in it is written, naming each option that differs;
a folder with only the tables (its plan kept nothing, say) is simply planned again. With `accelerate launch -m
data_tools prepare ...`, rank 0 scans and plans, every rank encodes its slice.

When the plan keeps no clip, or less than half of the usable footage, prepare prints the reasons by kind with
example files, the `report` command that lists every one, and the largest `--frames` (4k + 1) that would keep a
clip from every usable file (and from at least half of them, when that is larger).
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from data_tools.common import (
    PLAN_NAME,
    SOURCES_NAME,
    DataToolsError,
    ensure_writable_dir,
    log,
    read_jsonl,
    write_bytes_atomic,
    write_jsonl_atomic,
)
from data_tools.distributed import DistContext, distributed_context
from data_tools.encode import add_encode_options, encode, options_from_args, plan_digest
from data_tools.plan import (
    add_plan_options,
    default_max_shift,
    largest_fitting_frames,
    parse_frames,
    plan,
    plan_kwargs,
)
from data_tools.report import count_reasons, plan_report_rows, skip_kind, summary_line
from data_tools.scan import add_scan_options, scan, summarize_sources
from data_tools.shards import PROGRESS_DIR
from mova_train.names import MODEL_INDEX_NAME

PREPARE_NAME = "prepare.json"
# below this share of the usable footage kept, prepare explains what the plan dropped
KEPT_SHARE_WARNING = 0.5
EXAMPLE_FILES = 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input_dir", help="folder with the raw videos and captions (searched recursively)")
    parser.add_argument("--out", required=True, help="shard folder to write (created if needed)")
    parser.add_argument(
        "--trigger-word",
        default=None,
        metavar="WORD",
        help="prepended to every caption as 'WORD, caption' before encoding (a caption that already starts "
        "with WORD is left as is); recorded in the manifest",
    )
    add_scan_options(parser)
    add_plan_options(parser)
    add_encode_options(parser)


# --------------------------------------------------------------------------------------------------------------
# trigger word


def check_trigger_word(word: str | None) -> str | None:
    if word is None:
        return None
    if not word.strip() or word != word.strip() or "\n" in word or "\r" in word:
        raise DataToolsError(
            f"--trigger-word {word!r}: give a word or phrase on one line, without leading/trailing spaces"
        )
    return word


def with_trigger_word(caption: str, word: str | None) -> str:
    """'WORD, caption'; unchanged when there is no word or the caption already starts with it (as a whole word)."""
    if not word:
        return caption
    if caption.startswith(word) and (len(caption) == len(word) or not caption[len(word)].isalnum()):
        return caption
    return f"{word}, {caption}"


# --------------------------------------------------------------------------------------------------------------
# the options that decide a folder's shards, and the refusal to mix runs


def _frames_option(text) -> int | str:
    """--frames as recorded: one count as a number (as older folders have it), frame buckets as "49,97,193"."""
    frames = parse_frames(text)
    return frames if isinstance(frames, int) else ",".join(str(f) for f in sorted(frames))


def _shortest(frames: int | tuple[int, ...]) -> int:
    """The clip length a source must hold at least once to give a clip (the shortest frame bucket)."""
    return frames if isinstance(frames, int) else min(frames)


def prepare_options(args: argparse.Namespace, world_size: int) -> dict:
    """Every option that changes the tables or the shards, by its flag, as the user gave it (None = default)."""
    return {
        "--frames": _frames_option(args.frames),
        "--fps": float(args.fps),
        "--buckets": ",".join(b.strip() for b in str(args.buckets).split(",") if b.strip()),
        "--stride": args.stride,
        "--min-frames": args.min_frames,
        "--max-shift": args.max_shift,
        "--skip-silent": bool(args.skip_silent),
        "--silence-db": float(args.silence_db),
        "--skip-frozen": bool(args.skip_frozen),
        "--frozen-threshold": float(args.frozen_threshold),
        "--allow-vfr": bool(args.allow_vfr),
        "--default-caption": args.default_caption,
        "--trigger-word": args.trigger_word,
        "--shard-size-mb": float(args.shard_size_mb),
        "--max-samples-per-shard": int(args.max_samples_per_shard),
        "--latent-dtype": args.latent_dtype,
        "--codec-dtype": args.codec_dtype,
        "processes (world size)": int(world_size),
    }


def holds_shards(out: Path) -> bool:
    """Encoding has started in `out` (its tables alone are cheap to make again and are simply replaced)."""
    return (out / PROGRESS_DIR).is_dir() or (out / "manifest.json").is_file() or any(out.glob("shard-*.tar*"))


def existing_options(out: Path) -> dict:
    """The options of the run whose shards `out` holds: prepare.json, or for a folder written before it existed,
    the frame count and rate of its plan."""
    if (out / PREPARE_NAME).is_file():
        try:
            return dict(json.loads((out / PREPARE_NAME).read_text(encoding="utf-8"))["options"])
        except (ValueError, KeyError, TypeError) as e:
            raise DataToolsError(f"{out / PREPARE_NAME} is not a prepare options file ({e})") from None
    kept = [r for r in read_plan(out) if r.get("status") == "kept"]
    return {"--frames": int(kept[0]["num_frames"]), "--fps": float(kept[0]["fps"])} if kept else {}


def read_plan(out: Path) -> list[dict]:
    return read_jsonl(out / PLAN_NAME, what="clip plan") if (out / PLAN_NAME).is_file() else []


def how_to_proceed(out: Path) -> str:
    return (
        f"nothing in {out} was changed; use a new --out folder, or add --overwrite to delete its shards and "
        "start over with these options"
    )


def check_same_options(out: Path, options: dict) -> None:
    """Refuse, before anything is written, a run whose options differ from those of the shards in `out`."""
    if not holds_shards(out):
        return
    previous = existing_options(out)
    old, new = _resolved(previous), _resolved(options)
    # an option listed only when the user's values differ and so do their effects: `--stride 193` repeats the
    # default of --frames 193, and a default that follows a changed --frames is not a change of its own
    changed = [k for k in options if k in previous and previous[k] != options[k] and old.get(k) != new.get(k)]
    if changed:
        details = "; ".join(
            f"{k}: {_show(previous[k])} (existing) vs {_show(options[k])} (now)" for k in changed
        )
        raise DataToolsError(f"{out} holds shards of a different run: {details}; {how_to_proceed(out)}")


def check_same_plan(out: Path, plan_rows: list[dict]) -> None:
    """Same options, other input: refuse when the kept clips differ from those of the shards in `out`."""
    if not holds_shards(out) or not (out / PLAN_NAME).is_file():
        return
    old = [r for r in read_plan(out) if r.get("status") == "kept"]
    new = [r for r in plan_rows if r.get("status") == "kept"]
    if plan_digest(old) == plan_digest(new):
        return
    old_by, new_by = _clips_by_source(old), _clips_by_source(new)
    files = sorted(s for s in old_by.keys() | new_by.keys() if old_by.get(s) != new_by.get(s))
    if files:
        more = f" and {len(files) - EXAMPLE_FILES} more" if len(files) > EXAMPLE_FILES else ""
        what = f"the clips of {len(files)} files differ: {', '.join(files[:EXAMPLE_FILES])}{more}"
    else:
        what = "the same files, found at another path"
    raise DataToolsError(
        f"{out} holds shards of a different run: the input changed since ({what}); {how_to_proceed(out)}"
    )


def _clips_by_source(rows: list[dict]) -> dict[str, str]:
    """{file relative to the input folder: digest of its kept clips, wherever the folder is}."""
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["relpath"], []).append({k: v for k, v in r.items() if k != "path"})
    return {k: plan_digest(v) for k, v in by.items()}


def _resolved(options: dict) -> dict:
    """The options with the defaults that depend on --frames/--fps filled in (None = default)."""
    resolved = dict(options)
    frames, fps = options.get("--frames"), options.get("--fps")
    if frames is not None and fps is not None:
        for key in ("--stride", "--min-frames"):
            if resolved.get(key) is None:
                resolved[key] = frames
        if resolved.get("--max-shift") is None:
            longest = max(parse_frames(frames)) if isinstance(frames, str) else frames
            resolved["--max-shift"] = default_max_shift(longest, fps)
    return resolved


def _show(value) -> str:
    return "default" if value is None else repr(value) if isinstance(value, str) else str(value)


# --------------------------------------------------------------------------------------------------------------
# what the plan dropped


def report_command(out: Path) -> str:
    return f"python -m data_tools report {shlex.quote(str(out))}"


def explain_plan(
    sources: list[dict], plan_rows: list[dict], out: Path, *, num_frames: int, fps: float
) -> str | None:
    """The reasons by kind (count + example files), the report command and a --frames that fits, when the plan
    keeps no clip or less than KEPT_SHARE_WARNING of the usable footage; None when it keeps enough."""
    usable_s = sum(float(s["duration_s"]) for s in sources if s.get("status") == "ok")
    kept_s = sum(float(r["end_s"]) - float(r["start_s"]) for r in plan_rows if r["status"] == "kept")
    if kept_s > 0 and kept_s >= KEPT_SHARE_WARNING * usable_s:
        return None
    rows = plan_report_rows(sources, plan_rows)
    share = (
        f"{kept_s:.1f} s of the {usable_s:.1f} s usable ({100 * kept_s / usable_s:.0f}%)"
        if usable_s
        else "0 s"
    )
    lines = [f"prepare: the plan keeps {share}; what it left out:"]
    for kind, title in (("file", "files skipped"), ("leftover", "leftovers"), ("filtered", "clips dropped")):
        group = [r for r in rows if r["status"] != "kept" and skip_kind(r) == kind]
        for label, count, files in count_reasons(group):
            more = ", ..." if len(files) > EXAMPLE_FILES else ""
            lines.append(f"  {title}, {label}: {count} (e.g. {', '.join(files[:EXAMPLE_FILES])}{more})")
    lines.append(f"  every reason, file by file: {report_command(out)}")
    hint = frames_hint(sources, num_frames=num_frames, fps=fps)
    if hint:
        lines.append(f"  {hint}")
    return "\n".join(lines)


def frames_hint(sources: list[dict], *, num_frames: int, fps: float) -> str | None:
    """'--frames 141 keeps a clip from every usable file' when the clips are longer than some usable files."""
    every = largest_fitting_frames(sources, fps)
    half = largest_fitting_frames(sources, fps, share=0.5)
    if every is None or every >= num_frames:
        return None
    usable = [s for s in sources if s.get("status") == "ok"]
    short = sum(1 for s in usable if (largest_fitting_frames([s], fps) or 0) < num_frames)
    text = (
        f"--frames {num_frames} ({num_frames / fps:.2f} s at {fps:g} fps) is longer than {short} of the "
        f"{len(usable)} usable files; "
        f"--frames {every} ({every / fps:.2f} s) keeps a clip from every one of them"
    )
    if half is not None and half > every and half < num_frames:
        text += f", --frames {half} ({half / fps:.2f} s) from at least half"
    return text + " (frame counts are 4k + 1: the video VAE compresses time 4x)"


# --------------------------------------------------------------------------------------------------------------
# the command


def scan_and_plan(
    args: argparse.Namespace, kwargs: dict, out: Path, options: dict
) -> tuple[list[dict], list[dict]]:
    """Rank 0: scan and plan in memory, refuse a changed input, then write prepare.json and the tables."""
    sources = scan(
        args.input_dir,
        captions=args.captions,
        allow_vfr=args.allow_vfr,
        default_caption=args.default_caption,
        workers=args.workers,
    )
    log(summarize_sources(sources))
    plan_rows = plan(sources, **kwargs)
    for row in plan_rows:
        if row["status"] == "kept":
            row["caption"] = with_trigger_word(row["caption"], args.trigger_word)
    if not args.overwrite:
        check_same_plan(out, plan_rows)
    record = {"options": options, "input_dir": str(args.input_dir)}
    write_bytes_atomic(
        out / PREPARE_NAME, (json.dumps(record, indent=1, sort_keys=True) + "\n").encode("utf-8")
    )
    write_jsonl_atomic(out / SOURCES_NAME, sources)
    write_jsonl_atomic(out / PLAN_NAME, plan_rows)
    log(f"plan: {summary_line(plan_report_rows(sources, plan_rows))}")
    shortest = _shortest(kwargs["num_frames"])
    explanation = explain_plan(sources, plan_rows, out, num_frames=shortest, fps=kwargs["fps"])
    if explanation:
        log(explanation)
    if not any(r["status"] == "kept" for r in plan_rows):
        fits = largest_fitting_frames(sources, kwargs["fps"])
        try_frames = f"; try --frames {fits}" if fits is not None and fits < shortest else ""
        raise DataToolsError(
            f"the clip plan keeps no clip of the {len(sources)} files in {args.input_dir} (reasons above; every "
            f"one: {report_command(out)}){try_frames}"
        )
    return sources, plan_rows


def _from_rank0(ctx: DistContext, error: str | None) -> str | None:
    """Rank 0's error (or None) on every rank, so a refusal on rank 0 stops all ranks instead of hanging them."""
    if ctx.world_size <= 1:
        return error
    import torch.distributed as dist

    box = [error]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def run(args: argparse.Namespace) -> int:
    # everything a user can get wrong is checked before the first file is probed
    kwargs = plan_kwargs(args)
    check_trigger_word(args.trigger_word)
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
    options = prepare_options(args, ctx.world_size)
    if not args.overwrite:
        check_same_options(out, options)  # every rank reads the same files: all refuse together
    error = None
    if ctx.rank == 0:
        try:
            sources, plan_rows = scan_and_plan(args, kwargs, out, options)
        except DataToolsError as e:
            error = str(e)
    error = _from_rank0(ctx, error)
    if error is not None:
        raise DataToolsError(error)
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
        "trigger_word": args.trigger_word,
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
