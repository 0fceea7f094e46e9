"""One writer per run directory: `<run_dir>/.lock`, held by the main process of the running job.

The lock is a JSON file {host, pid, started, heartbeat, token} created with O_EXCL (atomic on local filesystems and
NFS v3+/Lustre/GPFS); a background thread rewrites its heartbeat every `stale_after / 6` seconds. Another job finds
it and refuses to start, naming the holder. A lock is stale, and taken over with a warning, when its holder ran on
this host and its pid is gone, or when its heartbeat is older than `stale_after` seconds (a holder on another host
that crashed). Takeover renames the stale file away first, so two jobs taking over at once cannot both win.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from mova_train.run_layout import LOCK_FILE

logger = logging.getLogger("mova_train.training")


class RunDirLockedError(ValueError):
    """Another live training holds the run directory."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    def __init__(self, run_dir: Path, *, stale_after: float = 120.0):
        self.path = Path(run_dir) / LOCK_FILE
        self.stale_after = float(stale_after)
        self.token = uuid.uuid4().hex
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.started = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> dict:
        return {
            "host": self.host,
            "pid": self.pid,
            "started": self.started,
            "heartbeat": time.time(),
            "token": self.token,
        }

    def read_holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            # Being written this very moment, or cut by a crash: judge it by its age alone.
            try:
                return {"heartbeat": self.path.stat().st_mtime, "host": "?", "pid": -1}
            except FileNotFoundError:
                return None

    def why_stale(self, holder: dict) -> str | None:
        """Why `holder` no longer holds the lock, or None while it is alive."""
        age = time.time() - float(holder.get("heartbeat", 0))
        if holder.get("host") == self.host and isinstance(holder.get("pid"), int) and holder["pid"] > 0:
            if not _pid_alive(holder["pid"]):
                return f"its process {holder['pid']} on this host is gone"
            return None
        if age > self.stale_after:
            return f"its last heartbeat is {age:.0f} s old (> {self.stale_after:.0f} s)"
        return None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(20):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self.read_holder()
                if holder is None:
                    continue  # released meanwhile
                reason = self.why_stale(holder)
                if reason is None:
                    age = time.time() - float(holder.get("heartbeat", 0))
                    raise RunDirLockedError(
                        f"{self.path.parent} is in use by another training (host {holder.get('host')}, pid "
                        f"{holder.get('pid')}, last heartbeat {age:.0f} s ago; lock file {self.path}). Wait for it "
                        "to end, or use another trainer.run_dir"
                    ) from None
                aside = self.path.with_name(f"{LOCK_FILE}.stale-{self.token}")
                try:
                    os.replace(self.path, aside)
                except FileNotFoundError:
                    continue  # another job took it over first; look again
                logger.warning(
                    "taking over the lock of %s from host %s pid %s: %s",
                    self.path.parent, holder.get("host"), holder.get("pid"), reason,
                )  # fmt: skip
                aside.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self._record(), f)
            break
        else:
            raise RunDirLockedError(f"could not take the lock {self.path}: other jobs keep taking it")
        self._thread = threading.Thread(target=self._beat, name="mova-run-lock", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        interval = max(1.0, self.stale_after / 6)
        while not self._stop.wait(interval):
            holder = self.read_holder()
            if holder is None or holder.get("token") != self.token:
                logger.error(
                    "the lock %s was taken by another job (%s); this run no longer holds it",
                    self.path,
                    holder,
                )
                return
            tmp = self.path.with_name(f"{LOCK_FILE}.{self.token}.tmp")
            tmp.write_text(json.dumps(self._record()), encoding="utf-8")
            os.replace(tmp, self.path)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
            holder = self.read_holder()
            if holder is not None and holder.get("token") == self.token:
                self.path.unlink(missing_ok=True)
