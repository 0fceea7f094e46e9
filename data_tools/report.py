"""`data_tools report FOLDER`: the kept/skipped summary of a prepared shard folder, every skip with its reason and
source file (from FOLDER/report.jsonl, or from the sources table and clip plan when encoding has not run yet).

Skips come in kinds, counted apart: leftovers (the tail or a gap of a file that gave clips: ordinary planning),
clips dropped by --skip-silent/--skip-frozen, skipped files (unusable or too short, with the reason) and clips
that failed to encode.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from data_tools.common import (
    PLAN_NAME,
    REPORT_NAME,
    SOURCES_NAME,
    DataToolsError,
    read_jsonl,
    write_bytes_atomic,
    write_jsonl_atomic,
)
from data_tools.shards import journal_path, read_journal

# Building and writing the report: `encode` does it on rank 0 once every rank finished.


def plan_report_rows(sources: list[dict] | None, plan_rows: list[dict]) -> list[dict]:
    """Report rows of the tables alone (before encoding): scan skips, rejected plan spans and kept plan clips."""
    rows: list[dict] = []
    planned_sources = {r.get("source_id") for r in plan_rows}
    for src in sources or []:
        if src.get("status") != "ok" and src.get("source_id") not in planned_sources:
            rows.append(
                {"stage": "scan", "status": "skipped", "source": src["relpath"], "reason": src["reason"]}
            )
    for r in plan_rows:
        if r["status"] == "kept":
            rows.append(
                {
                    "stage": "plan",
                    "status": "kept",
                    "source": r["relpath"],
                    "clip_id": r["clip_id"],
                    "seconds": round(float(r["end_s"]) - float(r["start_s"]), 6),
                    "reason": "",
                }
            )
            continue
        stage = (
            "scan"
            if r["clip_id"].endswith("-source") and r["reason"].startswith("source skipped")
            else "plan"
        )
        rows.append(
            {
                "stage": stage,
                "status": "skipped",
                "source": r.get("relpath", ""),
                "clip_id": r["clip_id"],
                "start_s": r.get("start_s"),
                "end_s": r.get("end_s"),
                "reason": r["reason"].removeprefix("source skipped by scan: "),
            }
        )
    for row in rows:
        row["kind"] = skip_kind(row)
    return rows


def build_report(out: Path, world_size: int, sources: list[dict] | None, plan_rows: list[dict]) -> list[dict]:
    """One row per source skip, rejected span, encode skip and kept clip, with its reason and source file."""
    rows = [r for r in plan_report_rows(sources, plan_rows) if r["status"] != "kept"]
    for rank in range(world_size):
        for record in read_journal(journal_path(out, rank)):
            for s in record.skipped:
                rows.append(
                    {
                        "stage": "encode",
                        "status": "skipped",
                        "kind": "failed",
                        "source": s["relpath"],
                        "clip_id": s["clip_id"],
                        "reason": s["reason"],
                    }
                )
            for s in record.samples:
                rows.append(
                    {
                        "stage": "encode",
                        "status": "kept",
                        "kind": "kept",
                        "source": s["relpath"],
                        "clip_id": s["clip_id"],
                        "shard": record.name,
                        "bucket": s["bucket"],
                        "reason": "",
                    }
                )
    rows.sort(key=lambda r: (r["source"], r.get("clip_id", ""), r["stage"]))
    return rows


# --------------------------------------------------------------------------------------------------------------
# kinds of skips: planning leftovers are not errors

# reasons of `plan` rows that are ordinary remainders of cutting a usable source into clips
LEFTOVER_REASONS = {
    "tail of ": "tail shorter than one clip",
    "left out so that clips do not cut inside sound": "left out so that clips do not cut inside sound",
}
# reasons of `plan` rows for clips the user asked to drop (--skip-silent, --skip-frozen)
FILTER_REASONS = {"silent (": "silent", "frozen picture": "frozen picture"}


def skip_kind(row: dict) -> str:
    """kept | leftover (a tail or gap of a used source) | filtered | file (a whole source skipped) | failed."""
    if row["status"] == "kept":
        return "kept"
    if row.get("kind"):
        return row["kind"]
    reason = row.get("reason", "")
    if row.get("stage") == "encode":
        return "failed"
    if row.get("stage") == "plan" and any(reason.startswith(p) for p in LEFTOVER_REASONS):
        return "leftover"
    if row.get("stage") == "plan" and any(reason.startswith(p) for p in FILTER_REASONS):
        return "filtered"
    return "file"


def reason_label(reason: str) -> str:
    """The reason without its numbers and details, to count skips by kind ("no audio track", "silent")."""
    for table in (LEFTOVER_REASONS, FILTER_REASONS):
        for prefix, label in table.items():
            if reason.startswith(prefix):
                return label
    if reason.startswith("source has ") and "shorter than one clip" in reason:
        return "shorter than one clip"
    reason = re.sub(r"^caption file \S+ ", "caption file ", reason)
    return re.split(r" \(|: |; ", reason, maxsplit=1)[0].strip() or "unknown"


def count_reasons(rows: list[dict]) -> list[tuple[str, int, list[str]]]:
    """(reason label, number of rows, their distinct source files in order), most frequent reason first."""
    groups: dict[str, list[str]] = {}
    for r in rows:
        groups.setdefault(reason_label(r.get("reason", "")), []).append(r.get("source", ""))
    result = [(label, len(files), list(dict.fromkeys(files))) for label, files in groups.items()]
    return sorted(result, key=lambda x: (-x[1], x[0]))


def summary_line(rows: list[dict]) -> str:
    """'kept 24 clips from 10 files; 20 leftovers (tail shorter than one clip: 12, ...); skipped 2 files (...)'."""
    kept = [r for r in rows if r["status"] == "kept"]
    kinds: dict[str, list[dict]] = {}
    for r in rows:
        if r["status"] != "kept":
            kinds.setdefault(skip_kind(r), []).append(r)
    parts = [f"kept {_count(len(kept), 'clip')} from {_count(len({r['source'] for r in kept}), 'file')}"]
    for kind, text in (
        ("leftover", "{}"),
        ("filtered", "dropped {}"),
        ("file", "skipped {}"),
        ("failed", "{} failed to encode"),
    ):
        group = kinds.get(kind)
        if not group:
            continue
        counts = ", ".join(f"{label}: {n}" for label, n, _ in count_reasons(group))
        if kind == "file":
            number = _count(len({r["source"] for r in group}), "file")
        else:
            number = _count(len(group), "leftover" if kind == "leftover" else "clip")
        parts.append(f"{text.format(number)} ({counts})")
    return "; ".join(parts)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def format_report(rows: list[dict]) -> str:
    lines = [summary_line(rows)]
    for r in rows:
        if r["status"] == "kept":
            continue
        kind = skip_kind(r)
        where = r["source"] + (f" [{r['clip_id']}]" if r.get("clip_id") else "")
        word = "leftover" if kind == "leftover" else "dropped" if kind == "filtered" else "skipped"
        lines.append(f"  {word} ({r['stage']}) {where}: {r['reason']}")
    return "\n".join(lines)


def write_report(out: Path, rows: list[dict]) -> str:
    write_jsonl_atomic(out / REPORT_NAME, rows)
    text = format_report(rows)
    write_bytes_atomic(out / "report.txt", (text + "\n").encode("utf-8"))
    return text


def load_report(folder: str | Path) -> list[dict]:
    folder = Path(folder)
    if (folder / REPORT_NAME).is_file():
        return read_jsonl(folder / REPORT_NAME, what="report")
    sources = (
        read_jsonl(folder / SOURCES_NAME, what="sources table") if (folder / SOURCES_NAME).is_file() else []
    )
    plan_rows = read_jsonl(folder / PLAN_NAME, what="clip plan") if (folder / PLAN_NAME).is_file() else []
    rows = plan_report_rows(sources, plan_rows)
    if not rows:
        raise DataToolsError(f"{folder} has no {REPORT_NAME}, {SOURCES_NAME} or {PLAN_NAME}")
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", help="shard folder written by prepare/encode (or a folder with the tables)")


def run(args: argparse.Namespace) -> int:
    print(format_report(load_report(args.folder)))
    return 0
