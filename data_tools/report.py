"""`data_tools report FOLDER`: the kept/skipped summary of a prepared shard folder, every skip with its reason and
source file (from FOLDER/report.jsonl, or from the sources table and clip plan when encoding has not run yet).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from data_tools.common import PLAN_NAME, REPORT_NAME, SOURCES_NAME, DataToolsError, read_jsonl
from data_tools.encode import format_report


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
