"""Strict safetensors IO in the layout of the released MOVA checkpoints (single file or shards + index).

Every problem a user can cause (missing file, truncated shard, wrong key, wrong shape) raises `CheckpointError`
naming the file, the key and the shapes, never a stack trace from deep inside torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors import safe_open
from torch import nn

from mova_train.names import CONFIG_NAME, INDEX_SUFFIX

_SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}


class CheckpointError(ValueError):
    """A checkpoint folder or file that cannot be loaded as asked; the message names what and where."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_json(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing file: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid UTF-8 JSON: {e}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} must hold a JSON object, found {type(obj).__name__}")
    return obj


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    """Write JSON (sorted keys, trailing newline) to a temp file in the same folder, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    write_bytes_atomic(path, data.encode("utf-8"))


_TORCH_TO_SAFETENSORS = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def _safetensors_header(
    specs: Iterable[tuple[str, str, list[int], int]], metadata: dict[str, str] | None
) -> bytes:
    """The 8-byte length + JSON header (padded with spaces to 8 bytes) for tensors given as (name, safetensors
    dtype, shape, byte size) in file order, and `metadata` (sorted keys)."""
    header: dict[str, object] = {}
    if metadata:
        for k, v in metadata.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise ValueError(f"safetensors metadata must map str to str; got {k!r}: {type(v).__name__}")
        header["__metadata__"] = {k: metadata[k] for k in sorted(metadata)}
    offset = 0
    for name, dtype, shape, nbytes in specs:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-(8 + len(text)) % 8)
    return struct.pack("<Q", len(text)) + text


def _tensor_bytes(name: str, t: torch.Tensor) -> bytes:
    if t.dtype not in _TORCH_TO_SAFETENSORS:
        raise ValueError(f"tensor {name!r} has dtype {t.dtype}, which safetensors files do not hold")
    if t.device.type == "meta":
        raise ValueError(f"tensor {name!r} is on the meta device and has no data to write")
    return t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


SAFETENSORS_TO_TORCH = {v: k for k, v in _TORCH_TO_SAFETENSORS.items()}


def encode_safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """Safetensors bytes of `tensors` (sorted by name) and `metadata` (sorted keys): same input, same bytes.

    safetensors 0.8's own `save_file` keeps the metadata in a hash map, so its bytes change from process to
    process; checkpoints and exports must be byte-identical, so we write the (small, documented) format ourselves:
    u64 little-endian header length, the JSON header padded with spaces to 8 bytes, then the tensor data.
    """
    chunks = [_tensor_bytes(name, tensors[name]) for name in sorted(tensors)]
    specs = [
        (name, _TORCH_TO_SAFETENSORS[tensors[name].dtype], list(tensors[name].shape), len(data))
        for name, data in zip(sorted(tensors), chunks)
    ]
    return _safetensors_header(specs, metadata) + b"".join(chunks)


def write_safetensors_streaming(
    path: str | os.PathLike,
    specs: dict[str, tuple[torch.dtype, list[int]]],
    tensor_for: Callable[[str], torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write the same bytes as `encode_safetensors` without holding the tensors: `specs` gives each tensor's dtype
    and shape up front, `tensor_for(name)` produces one tensor at a time (sorted by name), which is written and
    dropped. Atomic like `write_bytes_atomic`: a temp file in the same folder, fsync, rename."""
    names = sorted(specs)
    for name in names:
        if specs[name][0] not in _TORCH_TO_SAFETENSORS:
            raise ValueError(
                f"tensor {name!r} has dtype {specs[name][0]}, which safetensors files do not hold"
            )
    header = _safetensors_header(
        [
            (n, _TORCH_TO_SAFETENSORS[specs[n][0]], list(specs[n][1]), _nbytes(specs[n][0], specs[n][1]))
            for n in names
        ],
        metadata,
    )
    with atomic_file(path) as f:
        f.write(header)
        for name in names:
            t = tensor_for(name)
            dtype, shape = specs[name]
            if t.dtype != dtype or list(t.shape) != list(shape):
                raise ValueError(
                    f"tensor {name!r} came out {t.dtype} {list(t.shape)}, announced {dtype} {list(shape)}"
                )
            if t.device.type == "meta":
                raise ValueError(f"tensor {name!r} is on the meta device and has no data to write")
            f.write(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().data)  # no copy
            del t


def _nbytes(dtype: torch.dtype, shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n * torch.empty((), dtype=dtype).element_size()


def write_safetensors(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
):
    """Atomically write a byte-deterministic safetensors file."""
    write_bytes_atomic(path, encode_safetensors(tensors, metadata))


def _default_mode() -> int:
    """File mode a plain `open()` would give (mkstemp's 0600 would make shared checkpoints unreadable)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file to write that appears at `path` only when complete: a temp file in the same folder, fsync,
    then rename over `path`; on an error the temp file is removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, _default_mode())
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to a temp file in the same folder, fsync, then rename over `path`."""
    with atomic_file(path) as f:
        f.write(data)


def _shard_name(weights_name: str, i: int, n: int) -> str:
    return f"{weights_name}-{i:05d}-of-{n:05d}.safetensors"


def save_component(
    folder: str | os.PathLike,
    state_dict: dict[str, torch.Tensor],
    *,
    config: dict | None,
    weights_name: str,
    num_shards: int = 1,
    config_name: str = CONFIG_NAME,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write one component folder: `<weights_name>.safetensors`, or shards + HF-style index, plus its config.

    Keys are written in sorted order and split into `num_shards` contiguous groups of roughly equal bytes, so the
    same state dict always gives byte-identical files. Each file is written aside and renamed when complete.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    keys = sorted(state_dict)
    if len(keys) < num_shards:
        raise ValueError(f"cannot split {len(keys)} tensors into {num_shards} shards")
    tensors = {k: state_dict[k].detach().to("cpu").contiguous() for k in keys}
    meta = {"format": "pt", **(metadata or {})}

    groups: list[list[str]] = []
    if num_shards == 1:
        groups = [keys]
    else:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        target = total / num_shards
        current: list[str] = []
        acc = 0
        for i, k in enumerate(keys):
            current.append(k)
            acc += tensors[k].numel() * tensors[k].element_size()
            remaining_keys = len(keys) - i - 1
            remaining_groups = num_shards - len(groups) - 1
            if remaining_groups > 0 and (
                acc >= target * (len(groups) + 1) or remaining_keys == remaining_groups
            ):
                groups.append(current)
                current = []
        groups.append(current)
        assert len(groups) == num_shards and all(groups), "shard split produced an empty shard"

    weight_map: dict[str, str] = {}
    for i, group in enumerate(groups, start=1):
        name = f"{weights_name}.safetensors" if num_shards == 1 else _shard_name(weights_name, i, num_shards)
        write_safetensors(folder / name, {k: tensors[k] for k in group}, meta)
        weight_map.update({k: name for k in group})
    if num_shards > 1:
        total_size = sum(t.numel() * t.element_size() for t in tensors.values())
        write_json_atomic(
            folder / f"{weights_name}{INDEX_SUFFIX}",
            {"metadata": {"total_size": total_size}, "weight_map": weight_map},
        )
    if config is not None:
        write_json_atomic(folder / config_name, config)


@dataclass(frozen=True)
class SafetensorsHeader:
    """The header of one safetensors file: parsed, as stored, and where the tensor data starts."""

    path: Path
    entries: dict  # the parsed JSON: {key: {"dtype", "shape", "data_offsets"}} and maybe "__metadata__"
    raw: bytes  # the header JSON exactly as stored in the file (after the 8-byte length)
    file_size: int

    @property
    def data_start(self) -> int:
        """Byte offset of the tensor data in the file (data_offsets count from here)."""
        return 8 + len(self.raw)


def read_safetensors_header(path: str | os.PathLike) -> SafetensorsHeader:
    """Read a safetensors header without reading tensor data; validate that the file holds all its data.

    The one safetensors header parser of the project: every problem raises CheckpointError naming the file.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path} is truncated or not a safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n <= 0 or 8 + n > size:
                raise CheckpointError(
                    f"{path} is truncated or not a safetensors file (header length {n}, file {size} bytes)"
                )
            raw = f.read(n)
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path} has a corrupt safetensors header") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} has a corrupt safetensors header")
    end = 0
    for k, v in header.items():
        if k == "__metadata__":
            continue
        try:
            end = max(end, int(v["data_offsets"][1]))
        except (KeyError, TypeError, IndexError, ValueError):
            raise CheckpointError(f"{path}: corrupt header entry for {k!r}") from None
    if 8 + n + end > size:
        raise CheckpointError(
            f"{path} is truncated: its header describes {8 + n + end} bytes but the file has {size} "
            "(an interrupted download? re-download this file)"
        )
    return SafetensorsHeader(path=path, entries=header, raw=raw, file_size=size)


def list_weight_files(folder: str | os.PathLike, *, weights_name: str) -> dict[str, list[str]]:
    """Map each weight file of a component folder to the keys it should hold (from the index if sharded)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"missing component folder: {folder}")
    index = folder / f"{weights_name}{INDEX_SUFFIX}"
    single = folder / f"{weights_name}.safetensors"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index} has no 'weight_map'")
        files: dict[str, list[str]] = {}
        for key, name in weight_map.items():
            files.setdefault(name, []).append(key)
        for name in files:
            if not (folder / name).is_file():
                raise CheckpointError(f"missing shard file {folder / name} (listed in {index.name})")
        return files
    if single.is_file():
        return {single.name: []}
    found = sorted(p.name for p in folder.glob("*.safetensors"))
    raise CheckpointError(
        f"no weights in {folder}: expected {single.name} or {index.name}"
        + (f"; found {', '.join(found)}" if found else "")
    )


def read_component_header(
    folder: str | os.PathLike, *, weights_name: str
) -> dict[str, tuple[tuple[int, ...], str]]:
    """`{key: (shape, dtype)}` of a component from its safetensors headers only (no tensor data is read)."""
    folder = Path(folder)
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    for name, listed in list_weight_files(folder, weights_name=weights_name).items():
        header = read_safetensors_header(folder / name).entries
        keys = {k for k in header if k != "__metadata__"}
        if listed and set(listed) != keys:
            missing = sorted(set(listed) - keys)
            extra = sorted(keys - set(listed))
            raise CheckpointError(
                f"{folder / name} does not match its index: "
                + (f"missing {missing[:5]}" if missing else "")
                + (f" unlisted {extra[:5]}" if extra else "")
            )
        for k in keys:
            if k in out:
                raise CheckpointError(f"key {k!r} appears in two files of {folder}")
            out[k] = (
                tuple(header[k]["shape"]),
                _SAFETENSORS_DTYPES.get(header[k]["dtype"], header[k]["dtype"]),
            )
    return out


def _key_files(folder: Path, weights_name: str) -> dict[str, str]:
    files = list_weight_files(folder, weights_name=weights_name)
    out: dict[str, str] = {}
    for name in files:
        for k in read_safetensors_header(folder / name).entries:
            if k != "__metadata__":
                out[k] = name
    return out


def check_keys(
    found: dict[str, tuple[int, ...]],
    expected: dict[str, tuple[int, ...]],
    *,
    where: str,
    files: dict[str, str] | None = None,
) -> None:
    """Raise CheckpointError listing missing, unexpected and misshaped keys (the first few of each)."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshaped = sorted(k for k in set(found) & set(expected) if tuple(found[k]) != tuple(expected[k]))
    if not (missing or unexpected or misshaped):
        return
    lines = [f"checkpoint {where} does not match the model built from its config:"]
    if missing:
        lines.append(
            f"  {len(missing)} missing key(s): "
            + ", ".join(missing[:8])
            + (" ..." if len(missing) > 8 else "")
        )
    if unexpected:
        shown = [f"{k} (in {files[k]})" if files and k in files else k for k in unexpected[:8]]
        lines.append(
            f"  {len(unexpected)} unexpected key(s): "
            + ", ".join(shown)
            + (" ..." if len(unexpected) > 8 else "")
        )
    for k in misshaped[:8]:
        file = f" in {files[k]}" if files and k in files else ""
        lines.append(
            f"  shape mismatch for {k}{file}: checkpoint {list(found[k])}, model expects {list(expected[k])}"
        )
    if len(misshaped) > 8:
        lines.append(f"  ... and {len(misshaped) - 8} more shape mismatches")
    raise CheckpointError("\n".join(lines))


def _iter_tensors(
    folder: Path, weights_name: str, device: str | torch.device
) -> Iterable[tuple[str, torch.Tensor]]:
    for name in list_weight_files(folder, weights_name=weights_name):
        path = folder / name
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                for k in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                    yield k, f.get_tensor(k)
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises its own error types for corrupt data
            raise CheckpointError(f"cannot read {path}: {e}") from None


def load_component_state(
    folder: str | os.PathLike,
    *,
    weights_name: str,
    expected: dict[str, tuple[int, ...]] | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    component: str = "",
) -> dict[str, torch.Tensor]:
    """Read every tensor of a component; with `expected`, refuse missing/unexpected/misshaped keys first."""
    folder = Path(folder)
    header = read_component_header(folder, weights_name=weights_name)
    if expected is not None:
        check_keys(
            {k: v[0] for k, v in header.items()},
            expected,
            where=f"{component or folder.name} ({folder})",
            files=_key_files(folder, weights_name),
        )
    out = {}
    for k, t in _iter_tensors(folder, weights_name, device):
        out[k] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    return out


@dataclass(frozen=True)
class TensorLocation:
    """Where one tensor of a component is stored: its file, safetensors dtype, shape and absolute byte span."""

    path: Path
    dtype: str  # safetensors dtype, e.g. "BF16"
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= int(d)
        return n

    @property
    def torch_dtype(self) -> torch.dtype:
        name = _SAFETENSORS_DTYPES.get(self.dtype)
        if name is None or not hasattr(torch, name):
            raise CheckpointError(f"{self.path}: unsupported safetensors dtype {self.dtype!r}")
        return getattr(torch, name)


def locate_tensors(folder: str | os.PathLike, *, weights_name: str) -> dict[str, TensorLocation]:
    """`{key: TensorLocation}` of a component from its safetensors headers (no tensor data is read); every span is
    checked to lie in its file and to hold exactly dtype x shape bytes."""
    folder = Path(folder)
    read_component_header(folder, weights_name=weights_name)  # index agreement, duplicate keys
    out: dict[str, TensorLocation] = {}
    for name in list_weight_files(folder, weights_name=weights_name):
        header = read_safetensors_header(folder / name)
        for key, entry in header.entries.items():
            if key == "__metadata__":
                continue
            try:
                begin, end = (header.data_start + int(o) for o in entry["data_offsets"])
                loc = TensorLocation(
                    folder / name, entry["dtype"], tuple(int(d) for d in entry["shape"]), begin, end
                )
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{folder / name}: corrupt header entry for {key!r}") from None
            if end - begin != loc.numel * torch.empty((), dtype=loc.torch_dtype).element_size():
                raise CheckpointError(
                    f"{folder / name}: tensor {key!r} spans {end - begin} bytes, its dtype {loc.dtype} and shape "
                    f"{list(loc.shape)} need {loc.numel * torch.empty((), dtype=loc.torch_dtype).element_size()}"
                )
            out[key] = loc
    return out


def read_tensor(loc: TensorLocation, start: int = 0, count: int | None = None) -> torch.Tensor:
    """Elements `[start, start + count)` of the flattened tensor at `loc` (all of it by default), as a 1-D tensor of
    its stored dtype. Plain file reads, no memory map: only these bytes enter this process's memory."""
    count = loc.numel - start if count is None else count
    if start < 0 or count < 0 or start + count > loc.numel:
        raise ValueError(f"elements [{start}, {start + count}) are outside a tensor of {loc.numel}")
    out = torch.empty(count, dtype=loc.torch_dtype)
    if count == 0:
        return out
    raw = out.view(torch.uint8).numpy()
    try:
        with open(loc.path, "rb", buffering=0) as f:
            f.seek(loc.begin + start * out.element_size())
            view, done = memoryview(raw), 0
            while done < len(view):
                n = f.readinto(view[done:])
                if not n:
                    raise CheckpointError(f"{loc.path} ended early (truncated while reading?)")
                done += n
    except OSError as e:
        raise CheckpointError(f"cannot read {loc.path}: {e}") from None
    return out


def match_module_keys(
    expected: dict[str, tuple[int, ...]],
    folder: str | os.PathLike,
    *,
    weights_name: str,
    component: str = "",
    key_map: Callable[[str], str] | None = None,
    tied: dict[str, str] | None = None,
) -> dict[str, TensorLocation]:
    """Match a module's `{name: shape}` strictly against a component folder (missing, unexpected and misshaped
    keys raise CheckpointError naming them and their files); `{module name: TensorLocation}` of every name.

    `key_map` renames checkpoint keys to module keys. `tied={"alias": "source"}`: the module has both names for one
    tensor and the checkpoint may store either or both."""
    folder = Path(folder)
    tied = tied or {}
    key_map = key_map or (lambda k: k)
    stored = locate_tensors(folder, weights_name=weights_name)
    located = {key_map(k): loc for k, loc in stored.items()}
    found = {k: loc.shape for k, loc in located.items()}
    files = {k: loc.path.name for k, loc in located.items()}
    # Tied names: the checkpoint may omit either name of a pair, but not both.
    for alias, source in tied.items():
        if alias in located and source in located:
            continue
        if alias in located:
            found[source], located[source] = found[alias], located[alias]
        elif source in located:
            found[alias], located[alias] = found[source], located[source]
    check_keys(found, expected, where=f"{component or folder.name} ({folder})", files=files)
    return located


def load_module_strict(
    module: nn.Module,
    folder: str | os.PathLike,
    *,
    weights_name: str,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    component: str = "",
    key_map: Callable[[str], str] | None = None,
    tied: dict[str, str] | None = None,
) -> nn.Module:
    """Fill `module` (possibly on `meta`) from a component folder, strictly, one tensor at a time.

    Keys are matched by `match_module_keys` (`key_map`, `tied`) before anything is read. Each tensor is read from
    its file, moved to `device` and cast to `dtype` (floating tensors only) alone; parameters on `meta` are replaced
    by the loaded tensors (`assign=True`), so peak memory is one copy of the weights on `device` and one tensor in
    host memory."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    located = match_module_keys(
        expected, folder, weights_name=weights_name, component=component, key_map=key_map, tied=tied
    )
    state: dict[str, torch.Tensor] = {}
    loaded: dict[tuple[Path, int], torch.Tensor] = {}  # tied names share one read
    for name, loc in sorted(located.items(), key=lambda kv: (str(kv[1].path), kv[1].begin)):
        t = loaded.get((loc.path, loc.begin))
        if t is None:
            t = read_tensor(loc).reshape(loc.shape).to(device)
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            loaded[(loc.path, loc.begin)] = t
        state[name] = t
    module.load_state_dict(state, strict=True, assign=True)
    return module
