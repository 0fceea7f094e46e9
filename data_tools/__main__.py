"""`python -m data_tools <command>`: raw videos -> aligned paired clips -> WebDataset shards of latents.

Commands: synth, scan, plan, export-clips, encode, prepare, empty-prompt, verify, report, bench. `<command> --help` explains each.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# command -> (module, one-line help); only the chosen command's module is imported, so `--help` stays fast
COMMANDS = {
    "synth": (
        "data_tools.synth",
        "write the bundled synthetic dataset (mp4 + captions + sync-event sidecars)",
    ),
    "scan": ("data_tools.scan", "probe every media file of a folder and collect captions -> sources.jsonl"),
    "plan": ("data_tools.plan", "cut sources into fixed-length clips with buckets -> plan.jsonl"),
    "export-clips": (
        "data_tools.export",
        "write each planned clip as an aligned mp4 to watch before encoding",
    ),
    "encode": ("data_tools.encode", "decode + align + encode planned clips with the codecs -> shards"),
    "prepare": ("data_tools.prepare", "scan -> plan -> encode in one command"),
    "empty-prompt": (
        "data_tools.empty_prompt",
        "add the empty-prompt embedding (for data.caption_dropout) to a shard folder written without it",
    ),
    "verify": (
        "data_tools.verify",
        "re-read every shard: checksums, schema, shapes, finite values, identity",
    ),
    "report": ("data_tools.report", "print the kept/skipped summary of a prepared folder"),
    "bench": (
        "data_tools.bench",
        "print decode / audio / encode / shard-read throughput on the synthetic data",
    ),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only `command`'s module is imported (for its options and description), so `--help` and a
    command's own run load nothing they do not use. `command=None` lists every command with its one-line help."""
    parser = argparse.ArgumentParser(
        prog="python -m data_tools",
        description="Data preparation for MOVA LoRA training: scan raw videos, plan clips, align audio to video, "
        "encode latents with the frozen codecs of a base checkpoint, write WebDataset shards, verify them.",
        epilog="Typical use: python -m data_tools prepare VIDEOS --checkpoint CKPT --out SHARDS; "
        "then python -m data_tools verify SHARDS.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        if name != command:
            sub.add_parser(name, help=help_text, description=help_text)
            continue
        module = importlib.import_module(module_name)
        doc = (module.__doc__ or help_text).strip()
        cmd = sub.add_parser(
            name, help=help_text, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        module.add_arguments(cmd)
        cmd.set_defaults(_module=module)
    return parser


def _command_of(argv: list[str]) -> str | None:
    """The subcommand argparse will pick: the first argument that is not an option (the top level has no options
    taking values)."""
    for arg in argv:
        if not arg.startswith("-"):
            return arg if arg in COMMANDS else None
    return None


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from mova_train.upstream import silence_known_banners

    silence_known_banners()
    from data_tools.common import DataToolsError

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_command_of(argv))
    args = parser.parse_args(argv)
    try:
        return int(args._module.run(args) or 0)
    except DataToolsError as e:
        print(f"data_tools {args.command}: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        # the project's user-error types (CheckpointError, ShardFormatError, MediaError, codec errors) are
        # ValueError subclasses; a bare ValueError is a bug and keeps its traceback
        if type(e) is ValueError:
            raise
        print(f"data_tools {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"data_tools {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
