"""The installed packages are exactly the pinned set (requirements/lock.txt) that the golden-loss file was made with,
so a fresh clone's `make setup` reproduces it; the pins and the golden file move together."""

from __future__ import annotations

import json
import re
from importlib import metadata

import torch
from packaging.requirements import Requirement

from mova_train.config import PROJECT_ROOT
from tests.train_utils import LOCK_FILE, lock_sha256

GOLDEN = PROJECT_ROOT / "tests" / "golden" / "train_tiny_demo_zero2_losses.json"


def read_lock() -> dict[str, str]:
    pins = {}
    for n, line in enumerate(LOCK_FILE.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        req = Requirement(line)
        (spec,) = req.specifier
        assert spec.operator == "==", f"{LOCK_FILE.name}:{n}: {line!r} is not an exact pin"
        pins[req.name] = spec.version
    return pins


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_lock_pins_every_direct_dependency():
    pins = {canonical(n) for n in read_lock()}
    direct = [Requirement(r) for r in metadata.requires("mova-train") or []]
    unpinned = [r.name for r in direct if canonical(r.name) not in pins and r.name != "torch"]
    assert not unpinned, f"{LOCK_FILE.name} does not pin {unpinned}; run `make lock`"
    assert not any(canonical(n) in ("torch", "mova-train") for n in pins), (
        "torch is pinned by the Makefile only"
    )


def test_installed_packages_match_the_lock():
    wrong = {}
    for name, version in read_lock().items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed = None
        if installed != version:
            wrong[name] = f"pinned {version}, installed {installed}"
    assert not wrong, f"the environment differs from {LOCK_FILE.name} (install with `make setup`): {wrong}"


def test_golden_file_was_made_with_these_pins():
    golden = json.loads(GOLDEN.read_text())
    assert golden["lock_sha256"] == lock_sha256(), (
        f"{LOCK_FILE.name} changed after {GOLDEN.name} was made: regenerate the golden file in the same change "
        "(README: Pinned dependencies)"
    )
    assert golden["torch"] == torch.__version__.split("+")[0]
