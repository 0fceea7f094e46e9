"""Deterministic, resumable WebDataset shard writing (one writer per rank) and the manifest that lists the shards.

A shard is written as `shard-RRR-IIIII.tar.tmp` and renamed when complete, so a reader never sees half a shard.
Tar members have fixed order, mtime, owner and mode, so the same samples give byte-identical shards. After each
rename, a line is appended to the rank's journal (`_progress/rank-RRR.jsonl`) naming the clips the shard holds
and the clips skipped since the previous shard; a rerun skips everything the journal lists and rebuilds only the
unfinished shard, so no clip is lost or duplicated.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from data_tools.common import DataToolsError, sha256_file
from mova_train.data.contract import shard_name

PROGRESS_DIR = "_progress"
TMP_SUFFIX = ".tmp"


def journal_path(out_dir: Path, rank: int) -> Path:
    return out_dir / PROGRESS_DIR / f"rank-{rank:03d}.jsonl"


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


@dataclass
class ShardRecord:
    """One journal line: a finished shard and the clips it holds (or that were skipped before it closed)."""

    name: str
    index: int
    sha256: str
    num_bytes: int
    clip_ids: list[str]
    skipped: list[dict] = field(default_factory=list)  # {"clip_id", "reason", "relpath"}
    samples: list[dict] = field(default_factory=list)  # per-clip summary for the manifest and the report


def read_journal(path: Path) -> list[ShardRecord]:
    """Finished shards of one rank, in order. A torn last line (killed mid-write) is ignored."""
    if not path.is_file():
        return []
    records: list[ShardRecord] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(ShardRecord(**json.loads(line)))
        except (json.JSONDecodeError, TypeError) as e:
            if number == len(lines):
                break
            raise DataToolsError(
                f"progress journal {path}, line {number} is corrupt ({e}); use --overwrite"
            ) from None
    return records


def append_journal(path: Path, record: ShardRecord) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record.__dict__, sort_keys=True, ensure_ascii=False) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


class ShardWriter:
    """Writes samples into size-targeted shards of one rank; `close()` finishes the last (partial) shard.

    A shard closes when adding the next sample would pass `target_bytes` (a shard always holds at least one
    sample) or when it holds `max_samples` samples (0 = no limit).
    """

    def __init__(
        self, out_dir: Path, rank: int, *, start_index: int, target_bytes: int, max_samples: int = 0
    ) -> None:
        self.out_dir, self.rank = Path(out_dir), rank
        self.index = start_index
        self.target_bytes, self.max_samples = target_bytes, max_samples
        self.journal = journal_path(self.out_dir, rank)
        self._tar: tarfile.TarFile | None = None
        self._file = None
        self._bytes = 0
        self._clip_ids: list[str] = []
        self._samples: list[dict] = []
        self._skipped: list[dict] = []
        self.finished: list[ShardRecord] = []

    @property
    def _path(self) -> Path:
        return self.out_dir / shard_name(self.rank, self.index)

    def _open(self) -> None:
        tmp = self._path.with_name(self._path.name + TMP_SUFFIX)
        # both stay open across write() calls until the shard is finished or aborted
        self._file = open(tmp, "wb")  # noqa: SIM115
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT)  # noqa: SIM115
        self._bytes = 0

    def write(self, sample: dict, summary: dict) -> None:
        """sample: the member dict of `contract.encode_sample` (`__key__` + bytes); summary: facts for the
        manifest/report (bucket, seconds, shapes, ...)."""
        key = sample["__key__"]
        members = [(f"{key}.{ext}", data) for ext, data in sample.items() if not ext.startswith("__")]
        size = sum(len(d) + 1024 for _, d in members)  # + header and padding, roughly
        if self._tar is not None and (
            self._bytes + size > self.target_bytes
            or (self.max_samples and len(self._clip_ids) >= self.max_samples)
        ):
            self._finish()
        if self._tar is None:
            self._open()
        for name, data in members:
            _tar_member(self._tar, name, data if isinstance(data, bytes) else str(data).encode("utf-8"))
        self._bytes += size
        self._clip_ids.append(key)
        self._samples.append(summary)

    def skip(self, clip_id: str, reason: str, relpath: str = "") -> None:
        self._skipped.append({"clip_id": clip_id, "reason": reason, "relpath": relpath})

    def _finish(self) -> None:
        assert self._tar is not None and self._file is not None
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        tmp = self._path.with_name(self._path.name + TMP_SUFFIX)
        os.replace(tmp, self._path)
        record = ShardRecord(
            name=self._path.name,
            index=self.index,
            sha256=sha256_file(self._path),
            num_bytes=self._path.stat().st_size,
            clip_ids=self._clip_ids,
            skipped=self._skipped,
            samples=self._samples,
        )
        append_journal(self.journal, record)
        self.finished.append(record)
        self.index += 1
        self._tar = self._file = None
        self._clip_ids, self._samples, self._skipped = [], [], []

    def close(self) -> None:
        if self._tar is not None:
            self._finish()
        elif self._skipped:
            # skips after the last shard still need a journal line so a rerun does not retry them
            append_journal(
                self.journal,
                ShardRecord(name="", index=-1, sha256="", num_bytes=0, clip_ids=[], skipped=self._skipped),
            )
            self._skipped = []

    def abort(self) -> None:
        """Drop the unfinished shard (its .tmp file) after an error."""
        if self._tar is not None:
            try:
                self._tar.close()
                self._file.close()
            finally:
                tmp = self._path.with_name(self._path.name + TMP_SUFFIX)
                if tmp.exists():
                    tmp.unlink()
            self._tar = self._file = None


def remove_stale_tmp(out_dir: Path, rank: int) -> list[Path]:
    """Delete unfinished shards of this rank left by an interrupted run."""
    stale = sorted(out_dir.glob(f"shard-{rank:03d}-*.tar{TMP_SUFFIX}"))
    for path in stale:
        path.unlink()
    return stale
