"""`data_tools report FOLDER`: the kept/skipped summary of a prepared shard folder, every skip with its reason and
source file (from FOLDER/report.jsonl, or from the sources table and clip plan when encoding has not run yet).
"""

from __future__ import annotations

import argparse
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


def build_report(out: Path, world_size: int, sources: list[dict] | None, plan_rows: list[dict]) -> list[dict]:
    """One row per source skip, rejected span, encode skip and kept clip, with its reason and source file."""
    rows: list[dict] = []
    planned_sources = {r.get("source_id") for r in plan_rows}
    for src in sources or []:
        if src.get("status") != "ok" and src.get("source_id") not in planned_sources:
            rows.append(
                {"stage": "scan", "status": "skipped", "source": src["relpath"], "reason": src["reason"]}
            )
    for r in plan_rows:
        if r["status"] != "kept":
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
    for rank in range(world_size):
        for record in read_journal(journal_path(out, rank)):
            for s in record.skipped:
                rows.append(
                    {
                        "stage": "encode",
                        "status": "skipped",
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
                        "source": s["relpath"],
                        "clip_id": s["clip_id"],
                        "shard": record.name,
                        "bucket": s["bucket"],
                        "reason": "",
                    }
                )
    rows.sort(key=lambda r: (r["source"], r.get("clip_id", ""), r["stage"]))
    return rows


def format_report(rows: list[dict]) -> str:
    kept = [r for r in rows if r["status"] == "kept"]
    skipped = [r for r in rows if r["status"] != "kept"]
    lines = [f"kept {len(kept)} clips; skipped {len(skipped)}"]
    for r in skipped:
        where = r["source"] + (f" [{r['clip_id']}]" if r.get("clip_id") else "")
        lines.append(f"  skipped ({r['stage']}) {where}: {r['reason']}")
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
    rows: list[dict] = []
    if (folder / SOURCES_NAME).is_file():
        for src in read_jsonl(folder / SOURCES_NAME, what="sources table"):
            if src.get("status") != "ok":
                rows.append(
                    {"stage": "scan", "status": "skipped", "source": src["relpath"], "reason": src["reason"]}
                )
    if (folder / PLAN_NAME).is_file():
        for r in read_jsonl(folder / PLAN_NAME, what="clip plan"):
            if r["status"] == "kept":
                rows.append(
                    {
                        "stage": "plan",
                        "status": "kept",
                        "source": r["relpath"],
                        "clip_id": r["clip_id"],
                        "reason": "",
                    }
                )
            elif not r["reason"].startswith("source skipped by scan"):
                rows.append(
                    {
                        "stage": "plan",
                        "status": "skipped",
                        "source": r["relpath"],
                        "clip_id": r["clip_id"],
                        "reason": r["reason"],
                    }
                )
    if not rows:
        raise DataToolsError(f"{folder} has no {REPORT_NAME}, {SOURCES_NAME} or {PLAN_NAME}")
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", help="shard folder written by prepare/encode (or a folder with the tables)")


def run(args: argparse.Namespace) -> int:
    print(format_report(load_report(args.folder)))
    return 0
