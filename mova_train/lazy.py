"""Lazy package exports (PEP 562): a package lists where each public name lives and imports that module on first
use, so importing the package (e.g. for a config schema or `--help`) does not load torch or PEFT."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(
    package: str, homes: dict[str, str], namespace: dict[str, Any]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """`__getattr__` and `__dir__` for `package`: `homes` maps a name to its module (relative, ".x", or absolute);
    a resolved name is stored in `namespace` (the package's globals), so it is looked up once."""

    def __getattr__(name: str) -> Any:
        home = homes.get(name)
        if home is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = importlib.import_module(package + home if home.startswith(".") else home)
        value = getattr(module, name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(homes))

    return __getattr__, __dir__
