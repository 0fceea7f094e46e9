"""Benchmarks, one module per area, behind one command: `python -m mova_train.bench AREA [options]`.

Each area module provides `run_<name>_bench(args) -> int | None` and `add_bench_args(parser)` for its options, and
is imported only when chosen; `common` holds the timing and peak-memory helpers they share. Benchmarks print
figures and never assert timings. (Data preparation stages have their own: `python -m data_tools bench`.)
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, function, one-line description)
COMMANDS = {
    "cli": (
        "mova_train.bench.cli",
        "run_cli_bench",
        "start-up time of every command's --help, its heavy imports, and the last demo's stage timings",
    ),
    "model": (
        "mova_train.bench.models",
        "run_model_bench",
        "forward+backward time, memory and TFLOP/s of one dual-tower step (tiny on CPU; full size on a GPU)",
    ),
    "codecs": (
        "mova_train.bench.codecs",
        "run_codecs_bench",
        "encode/decode speed of the video VAE, DAC and UMT5",
    ),
    "data": (
        "mova_train.bench.data",
        "run_data_bench",
        "read throughput of the shard loader (samples/s, MB/s) on a shard folder or random latents",
    ),
    "train": ("mova_train.bench.training", "run_train_bench", "training-step throughput of the full trainer"),
    "gpu": (
        "mova_train.bench.gpu",
        "run_gpu_bench",
        "one-shot GPU benchmark: kernel rates, step time at 3 depths extrapolated to 40+30 layers, MFU (--dry-run: CPU)",
    ),
    "export": (
        "mova_train.bench.export",
        "run_export_bench",
        "peak memory of a merged export against the base shard size (written tensor by tensor)",
    ),
    "load": (
        "mova_train.bench.load",
        "run_load_bench",
        "peak host memory per rank when 2 ranks load a mid-size base under ZeRO-3 (full vs rank-local loading)",
    ),
    "sampling": (
        "mova_train.bench.sampling",
        "run_sampling_bench",
        "sampling time and peak memory with both experts resident vs --offload-experts",
    ),
}


def main(argv: list[str] | None = None) -> int:
    from mova_train.upstream import silence_known_banners

    silence_known_banners()
    argv = sys.argv[1:] if argv is None else list(argv)
    top = argparse.ArgumentParser(
        prog="python -m mova_train.bench",
        description="Print speed and memory figures. Benchmarks never assert timings.",
        epilog="subcommands:\n"
        + "\n".join(f"  {k:8s} {v[2]}" for k, v in COMMANDS.items())
        + "\n\nRun `python -m mova_train.bench SUBCOMMAND --help` for its options."
        + "\nThe data preparation stages are benchmarked by `python -m data_tools bench`.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    top.add_argument("command", choices=sorted(COMMANDS), help="what to benchmark")
    top.add_argument("options", nargs=argparse.REMAINDER, help="options of the subcommand")
    if not argv:
        top.print_usage(sys.stderr)
        print("bench: error: choose a subcommand: " + ", ".join(COMMANDS), file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        top.print_help()
        return 0
    if argv[0] not in COMMANDS:
        print(
            f"bench: error: unknown subcommand {argv[0]!r}; choose from {', '.join(COMMANDS)}",
            file=sys.stderr,
        )
        return 2
    name, rest = argv[0], argv[1:]
    module_name, func_name, description = COMMANDS[name]
    # Imported only when chosen, on purpose: each area loads torch and its own packages, and `--help` should not wait.
    try:
        module = importlib.import_module(module_name)
        run = getattr(module, func_name)
    except (ImportError, AttributeError) as e:
        print(f"bench {name}: error: not available ({module_name}.{func_name}: {e})", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog=f"python -m mova_train.bench {name}", description=description)
    add_args = getattr(module, "add_bench_args", None)
    if add_args is not None:
        add_args(parser)
    args = parser.parse_args(rest)
    try:
        code = run(args)
    except ValueError as e:
        print(f"bench {name}: error: {e}", file=sys.stderr)
        return 2
    return int(code or 0)
