"""`python -m mova_train.bench cli`: how long each command takes to answer `--help` (the cost of starting it), which
heavy packages that imports, and the stage timings of the last `make demo` (`<demo out>/timings.json`).

`--help` must not load torch, PEFT, transformers or DeepSpeed: those are imported when a command runs, not to
print its options (tests/test_first_hour_cli.py checks the imports; this prints the seconds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HEAVY_MODULES = ("torch", "peft", "transformers", "deepspeed")
# (label, the command after `python`): every entry point a user types
HELP_COMMANDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("train.py", ("train.py",)),
    ("data_tools", ("-m", "data_tools")),
    *((f"cli.{tool}", ("-m", f"mova_train.cli.{tool}")) for tool in ("demo", "doctor", "export", "inspect")),
    *((f"cli.{tool}", ("-m", f"mova_train.cli.{tool}")) for tool in ("make_tiny", "sample")),
    ("bench", ("-m", "mova_train.bench")),
)

# Runs an entry point's `--help` in this process and prints which HEAVY_MODULES it left imported (stdout: one JSON
# list; the help text itself is swallowed).
_PROBE = """
import contextlib, io, json, runpy, sys
heavy, target = json.loads(sys.argv[1]), sys.argv[2:]
with contextlib.redirect_stdout(io.StringIO()):
    try:
        if target[0] == "-m":
            sys.argv = [target[1], *target[2:], "--help"]
            runpy.run_module(target[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = [target[0], *target[1:], "--help"]
            runpy.run_path(target[0], run_name="__main__")
    except SystemExit:
        pass
print(json.dumps(sorted(m for m in heavy if m in sys.modules)))
"""


def heavy_imports_of_help(command: tuple[str, ...]) -> list[str]:
    """The HEAVY_MODULES a fresh `python <command> --help` imports."""
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(HEAVY_MODULES), *command],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"python {' '.join(command)} --help failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def time_help(command: tuple[str, ...], repeat: int) -> float:
    """Median wall seconds of `python <command> --help` in a fresh process."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run([sys.executable, *command, "--help"], cwd=REPO, capture_output=True, check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def add_bench_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repeat", type=int, default=3, help="runs per command; the median is printed")
    parser.add_argument(
        "--demo-out", type=Path, default=Path("demo_out"), help="the demo's output folder (its timings.json)"
    )


def run_cli_bench(args: argparse.Namespace) -> int:
    if args.repeat < 1:
        raise ValueError(f"--repeat {args.repeat}: must be at least 1")
    print(f"--help, median of {args.repeat} fresh processes (python {sys.version.split()[0]}):")
    for label, command in HELP_COMMANDS:
        seconds = time_help(command, args.repeat)
        heavy = heavy_imports_of_help(command)
        print(f"  {label:<16} {seconds:6.2f} s   heavy imports: {', '.join(heavy) or 'none'}")
    timings = args.demo_out / "timings.json"
    if timings.is_file():
        stages = json.loads(timings.read_text(encoding="utf-8"))
        total = sum(stages.values())
        print(f"demo stages ({timings}, total {total:.0f} s):")
        for stage, seconds in stages.items():
            print(f"  {stage:<16} {seconds:6.1f} s")
    else:
        print(f"demo stages: {timings} not found (`make demo` writes it)")
    return 0
