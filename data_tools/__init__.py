"""Data preparation for MOVA LoRA training: raw videos -> aligned paired clips -> WebDataset shards of latents.

Run as `python -m data_tools <command>`; one module per stage (synth, scan, plan, align, encode, shards, verify,
prepare, export, report, bench).
"""

from data_tools.common import DATA_TOOLS_VERSION, DataToolsError

__all__ = ["DATA_TOOLS_VERSION", "DataToolsError"]
