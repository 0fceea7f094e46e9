"""Package layering: lower layers never import higher ones. Every module under mova_train/ and data_tools/ is
parsed (not imported), and every import is checked: at module top, inside functions, relative ones resolved,
and `importlib.import_module("...")` with a literal name."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("mova_train", "data_tools")

# importer package -> packages it must never import
RULES = {
    "mova_train.models": (
        "mova_train.training",
        "mova_train.data",
        "mova_train.sampling",
        "mova_train.lora",
    ),
    "mova_train.data": (
        "mova_train.training",
        "mova_train.models",
        "mova_train.sampling",
        "mova_train.lora",
        # mova_train.config imports the data group's schema (mova_train.data.config): importing it back is a cycle
        "mova_train.config",
    ),
    # the training groups' schemas, which mova_train.config assembles: importing it back is a cycle
    "mova_train.training.config": ("mova_train.config",),
    "mova_train.codecs": ("mova_train.training", "mova_train.sampling", "mova_train.lora"),
    "data_tools": ("mova_train.training",),
    # the leaf modules every layer may use import nothing of the project (docs/MAP.md)
    "mova_train.names": ("mova_train",),
    "mova_train.errors": ("mova_train",),
    "mova_train.run_layout": ("mova_train",),
    "mova_train.progress": ("mova_train",),
    "mova_train.lazy": ("mova_train",),
    # the trainer reaches DeepSpeed only through its backend
    "mova_train.training.trainer": ("deepspeed",),
    # the memory planner, like cli/ and bench/, may import everything; the library never imports it
    **{
        package: ("mova_train.plan",)
        for package in ("mova_train.training", "mova_train.sampling", "mova_train.lora", "mova_train.config")
    },
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> list[tuple[str, Path]]:
    return sorted(
        (_module_name(p), p) for package in PACKAGES for p in (REPO / package).rglob("*.py") if p.is_file()
    )


def _resolve(module: str, is_package: bool, level: int, name: str | None) -> str:
    """The absolute name of `from <level dots><name> import ...` written in `module`."""
    if level == 0:
        return name or ""
    base = module.split(".")
    if not is_package:
        base.pop()  # a module's relative imports start from its package
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def imports_of(module: str, path: Path) -> Iterator[tuple[int, str]]:
    """(line, imported module) for every import in the file; `from a import b` yields `a` and `a.b` (b may be a
    submodule)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, is_package, node.level, node.module)
            yield node.lineno, target
            for alias in node.names:
                if alias.name != "*":
                    yield node.lineno, f"{target}.{alias.name}"
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            yield node.lineno, node.args[0].value


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_the_scanner_sees_every_kind_of_import():
    modules = dict(_modules())
    assert {"mova_train.models.checkpoint", "mova_train.data.loader", "data_tools.encode"} <= set(modules)
    # relative (models/checkpoint.py: `from ..checkpoint_io import ...`)
    relative = {
        n for _, n in imports_of("mova_train.models.checkpoint", modules["mova_train.models.checkpoint"])
    }
    assert "mova_train.checkpoint_io" in relative
    # inside a function body (encode loads the codecs lazily)
    encode = {n for _, n in imports_of("data_tools.encode", modules["data_tools.encode"])}
    assert "mova_train.codecs" in encode


@pytest.mark.parametrize("layer", sorted(RULES))
def test_lower_layers_never_import_higher_ones(layer):
    forbidden = RULES[layer]
    scanned = 0
    violations = []
    for module, path in _modules():
        if not _within(module, layer):
            continue
        scanned += 1
        for line, name in imports_of(module, path):
            hit = next((f for f in forbidden if _within(name, f)), None)
            if hit:
                violations.append(
                    f"{path.relative_to(REPO)}:{line} imports {name} ({layer} must not use {hit})"
                )
    assert scanned, f"no module of {layer} found"
    assert not violations, "\n".join(sorted(set(violations)))
