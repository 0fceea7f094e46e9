"""accelerate / DeepSpeed plumbing: the Accelerator, the resolved DeepSpeed config, and small collective helpers.
The training backends (`mova_train.training.backend`) build on these.

Nothing here knows about MOVA.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import logging
import math
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mova_train.config import ConfigValueError, TrainConfig, resolve_path
from mova_train.run_layout import heartbeat_file
from mova_train.training.config import check_deepspeed_json, read_deepspeed_json
from mova_train.upstream import log_cpu_adam_build_notice, set_collective_timeout, skip_cpu_shm_comm_build

logger = logging.getLogger(__name__)


def resolve_mixed_precision(cfg: TrainConfig) -> str:
    """`auto` is bf16 where CUDA is available, else no mixed precision."""
    mp = cfg.trainer.mixed_precision
    if mp == "auto":
        return "bf16" if torch.cuda.is_available() else "no"
    if mp == "bf16" and not torch.cuda.is_available():
        logger.warning("trainer.mixed_precision=bf16 on CPU: autocast is slow there; 'no' is the CPU default")
    return mp


def _env_deepspeed_config() -> dict | None:
    """DeepSpeed settings given to `accelerate launch --use_deepspeed` (config file, or stage/offload flags)."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return None
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if path and path != "none":
        where = "accelerate --deepspeed_config_file"
        return read_deepspeed_json(resolve_path(path, field_name=where), where=f"{where}={path!r}")
    zero: dict[str, Any] = {"stage": int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", 2))}
    for key, env in (("offload_optimizer", "OPTIMIZER"), ("offload_param", "PARAM")):
        device = os.environ.get(f"ACCELERATE_DEEPSPEED_OFFLOAD_{env}_DEVICE", "none")
        if device != "none":
            zero[key] = {"device": device}
    return {"zero_optimization": zero}


def _fill(ds: dict, dotted: str, value: Any, source: str) -> None:
    """Set `dotted` where it is missing or "auto"; an explicit different value is a conflict."""
    *parents, leaf = dotted.split(".")
    node = ds
    for p in parents:
        node = node.setdefault(p, {})
    current = node.get(leaf, "auto")
    if current == "auto":
        node[leaf] = value
    elif current != value:
        raise ConfigValueError(
            f'DeepSpeed config sets {dotted}={current!r} but {source}={value!r}; set it to "auto" in the JSON '
            f"or change {source}"
        )


def build_deepspeed_config(cfg: TrainConfig, mixed_precision: str) -> dict | None:
    """The DeepSpeed config to use (Hydra `deepspeed.config` first, else `accelerate launch` flags), with
    every "auto" value filled from the trainer/optim settings; None when DeepSpeed is not used."""
    launcher = _env_deepspeed_config()
    if cfg.deepspeed.config is not None:
        path = resolve_path(cfg.deepspeed.config, field_name="deepspeed.config")
        ds = read_deepspeed_json(path, where=f"deepspeed.config={cfg.deepspeed.config!r}")
        where = f"deepspeed.config: {path}"
        asked = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        if (
            launcher is not None
            and asked is not None
            and str(ds.get("zero_optimization", {}).get("stage")) != asked
        ):
            logger.warning(
                "accelerate launch asked for ZeRO stage %s, deepspeed.config=%s says %s: the Hydra deepspeed group wins",
                asked, cfg.deepspeed.config, ds.get("zero_optimization", {}).get("stage"),
            )  # fmt: skip
    else:
        ds, where = launcher, "the DeepSpeed settings of accelerate launch"
    if ds is None:
        return None
    ds = copy.deepcopy(check_deepspeed_json(ds, where=where))
    _fill(ds, "train_micro_batch_size_per_gpu", cfg.data.batch_size, "data.batch_size")
    _fill(
        ds,
        "gradient_accumulation_steps",
        cfg.trainer.gradient_accumulation_steps,
        "trainer.gradient_accumulation_steps",
    )
    _fill(ds, "gradient_clipping", float(cfg.optim.max_grad_norm), "optim.max_grad_norm")
    _fill(ds, "bf16.enabled", mixed_precision == "bf16", "trainer.mixed_precision")
    _fill(ds, "fp16.enabled", False, "trainer.mixed_precision")
    ds.pop("train_batch_size", None)  # derived by accelerate from micro batch x accumulation x world size
    # Our optimizer is torch AdamW (with per-group masking); DeepSpeed's CPU Adam would ignore the mask.
    ds["zero_allow_untested_optimizer"] = True
    ds["zero_force_ds_cpu_optimizer"] = False
    ds.setdefault("steps_per_print", 2**31 - 1)
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def resolve_runtime(cfg: TrainConfig) -> tuple[str, dict | None]:
    """(mixed precision, DeepSpeed config or None) of a run, checked against the rest of the config; all before
    any process group starts."""
    mixed_precision = resolve_mixed_precision(cfg)
    ds_config = build_deepspeed_config(cfg, mixed_precision)
    if cfg.model.dtype != "float32" and mixed_precision == "no":
        raise ConfigValueError(
            f"model.dtype={cfg.model.dtype!r} with trainer.mixed_precision resolved to 'no': the fp32 adapters "
            "and the low-precision base need bf16 autocast (trainer.mixed_precision=bf16), or use model.dtype=float32"
        )
    return mixed_precision, ds_config


def build_accelerator(cfg: TrainConfig, mixed_precision: str, ds_config: dict | None):
    """The Accelerator (gloo on CPU, NCCL on GPU), with DeepSpeed when `ds_config` is given."""
    from accelerate import Accelerator, DeepSpeedPlugin
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    # The idle video expert takes no part in a step.
    handlers: list = [DistributedDataParallelKwargs(find_unused_parameters=True)]
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if ds_config is not None and "WORLD_SIZE" not in os.environ:
        # DeepSpeed needs a process group even alone: a one-process group on this machine.
        os.environ.update(
            {
                "RANK": "0",
                "LOCAL_RANK": "0",
                "WORLD_SIZE": "1",
                "LOCAL_WORLD_SIZE": "1",
                "MASTER_ADDR": "127.0.0.1",
            }
        )
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if launched or ds_config is not None:
        timeout = datetime.timedelta(minutes=cfg.trainer.collective_timeout_min)
        set_collective_timeout(timeout)
        handlers.append(
            InitProcessGroupKwargs(backend="nccl" if torch.cuda.is_available() else "gloo", timeout=timeout)
        )
    plugin = None
    if ds_config is not None and not torch.cuda.is_available():
        skip_cpu_shm_comm_build()  # no silent 60-75 s C++ build on the first CPU launch
    if ds_config is not None and os.environ.get("RANK", "0") == "0":
        log_cpu_adam_build_notice(
            ds_config, lambda m: print(f"[mova-train] {m}", file=sys.stderr, flush=True)
        )
    if ds_config is not None:
        # `ds_config` already combines the Hydra JSON with the launcher's flags (build_deepspeed_config), so
        # accelerate must not refuse it for fields an accelerate config file also named.
        os.environ.pop("ACCELERATE_CONFIG_DS_FIELDS", None)
        plugin = DeepSpeedPlugin(hf_ds_config=ds_config)
    return Accelerator(
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=cfg.trainer.gradient_accumulation_steps,
        deepspeed_plugin=plugin,
        kwargs_handlers=handlers,
        # accelerate only wraps DDP on CPU (MULTI_CPU) when told so; with DeepSpeed it must stay False.
        cpu=ds_config is None and not torch.cuda.is_available(),
    )


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------------------------
# Collectives (no-ops in a single process)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce(values: list[float], op: str, device: torch.device) -> list[float]:
    """All-reduce a few floats (op: sum | max) in float64."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.tolist()


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) in a single process."""
    return (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)


def sum_across_ranks(t: torch.Tensor) -> torch.Tensor:
    """Sum a device tensor over all ranks, in place; no host read (the caller reads once, when it needs to)."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not is_distributed():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def barrier() -> None:
    if is_distributed():
        dist.barrier()


# ---------------------------------------------------------------------------------------------------------------
# A peer that stops answering


class CollectiveTimeoutError(RuntimeError):
    """A collective did not complete within trainer.collective_timeout_min: a peer stalled or died."""


class PeerHeartbeat:
    """Each rank touches its own file (run_layout.heartbeat_file) from a thread every `interval` seconds, so when
    a collective times out the ranks whose file went quiet (stopped, hung in the kernel, dead) can be named."""

    def __init__(self, run_dir: Path, rank: int, world_size: int, interval: float = 2.0):
        self.files = [heartbeat_file(run_dir, r) for r in range(world_size)]
        self.path, self.interval = self.files[rank], float(interval)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.touch()
        self._thread = threading.Thread(target=self._beat, name="mova-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(OSError):
                self.path.touch()

    def stop(self) -> None:
        self._stop.set()

    close = stop

    def quiet_ranks(self) -> list[tuple[int, float]]:
        """(rank, seconds since its last beat) of every rank quiet for more than three intervals."""
        now, quiet = time.time(), []
        for rank, path in enumerate(self.files):
            try:
                age = now - path.stat().st_mtime
            except FileNotFoundError:
                age = math.inf
            if age > 3 * self.interval:
                quiet.append((rank, age))
        return quiet

    def explain(self, exc: BaseException, timeout_min: float) -> CollectiveTimeoutError | None:
        """A clear error for a collective that timed out or lost its peer, naming the quiet ranks; else None."""
        text = str(exc)
        if not any(
            k in text for k in ("Timed out", "timed out", "Connection closed by peer", "Connection reset")
        ):
            return None
        quiet = self.quiet_ranks()
        who = (
            ", ".join(f"rank {r} (silent for {a:.0f} s)" if math.isfinite(a) else f"rank {r} (never started)"
                      for r, a in quiet)
            or "no rank's heartbeat stopped (a network problem between nodes?)"
        )  # fmt: skip
        return CollectiveTimeoutError(
            f"a collective got no answer within trainer.collective_timeout_min={timeout_min:g} min; stopped "
            f"answering: {who}. Underlying error: {text.splitlines()[0] if text else type(exc).__name__}"
        )


# ---------------------------------------------------------------------------------------------------------------
# ZeRO-3: rank-local loading of the frozen base


def zero3_param_dtype(ds_config: dict, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype DeepSpeed gives the module's parameters: bf16 when its bf16 is on, else the model's own."""
    return torch.bfloat16 if ds_config.get("bf16", {}).get("enabled") is True else model_dtype


def zero3_rank_local_unsupported(ds_config: dict) -> str | None:
    """Why the rank-local loader cannot fill this ZeRO-3 layout (None: it can). Secondary (hpZ) partitions,
    quantised weights and NVMe-swapped partitions are filled by DeepSpeed from full tensors only."""
    zero = ds_config.get("zero_optimization", {})
    if int(zero.get("zero_hpz_partition_size", 1) or 1) > 1:
        return "zero_hpz_partition_size > 1"
    if zero.get("zero_quantized_weights") or zero.get("zero_quantized_nontrainable_weights"):
        return "quantized weights"
    if (zero.get("offload_param") or {}).get("device") == "nvme":
        return "offload_param to nvme"
    return None


class Zero3RankLocalLoader:
    """`load_mova`'s loader under ZeRO-3: no rank ever holds the whole base. The model is built on `meta`, then
    turned into ZeRO-3 parameters module by module with `deepspeed.zero.Init(module=...)` (the conversion
    `deepspeed.initialize` applies to a model built without it), each module's parameters lent a view of one
    reused scratch buffer the size of the largest module: DeepSpeed partitions them and drops the view, so the only
    lasting allocations are the partitions. Each rank then fills its own partition of every tensor straight from
    the safetensors files (plain reads of its byte range): it reads and holds 1/world of the base. The values are
    those DeepSpeed would partition from a full load: stored dtype -> the model dtype -> DeepSpeed's parameter
    dtype, zeros in the padding of the last partition."""

    def __init__(self, ds_config: dict, param_dtype: torch.dtype):
        self.ds_config = ds_config
        self.param_dtype = param_dtype
        self.bytes_read = 0  # tensor bytes this rank read from the files

    def build(self, make):
        import deepspeed
        from deepspeed.accelerator import get_accelerator
        from torch import nn

        with torch.device("meta"):
            model = make()
        buffers = [n for n, _ in model.named_buffers()]
        if buffers:  # the model has none; a buffer would need its own fill
            raise RuntimeError(f"rank-local ZeRO-3 loading does not handle buffers: {buffers[:3]}")
        device = torch.device(get_accelerator().device_name(int(os.environ.get("LOCAL_RANK", "0"))))
        modules = list(model.modules())[::-1]  # every module after all of its descendants
        largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in modules)
        # Uninitialised on purpose: DeepSpeed broadcasts rank 0's scratch and keeps each rank's part, which
        # `load` then overwrites from the files.
        scratch = torch.empty(largest, dtype=self.param_dtype, device=device)
        converted: dict[int, nn.Parameter] = {}  # a parameter shared by two modules stays one parameter
        for module in modules:
            offset, fresh = 0, False
            for name, p in list(module.named_parameters(recurse=False)):
                if id(p) not in converted:
                    view = scratch[offset : offset + p.numel()].view(p.shape)
                    converted[id(p)] = nn.Parameter(view, requires_grad=p.requires_grad)
                    offset, fresh = offset + p.numel(), True
                setattr(module, name, converted[id(p)])
            if fresh:
                deepspeed.zero.Init(module=module, config_dict_or_path=self.ds_config)
        return model

    def load(self, module, folder, *, weights_name: str, dtype: torch.dtype | None, component: str) -> None:
        from mova_train.checkpoint_io import match_module_keys, read_tensor

        # `build` made every parameter a ZeRO-3 one and allowed no buffers: these are all of the state dict
        params = dict(module.named_parameters(remove_duplicate=False))
        expected = {k: tuple(p.ds_shape) for k, p in params.items()}
        located = match_module_keys(expected, folder, weights_name=weights_name, component=component)
        with torch.no_grad():
            for name, p in params.items():
                loc, part = located[name], p.ds_tensor
                size = int(part.ds_numel)
                start = size * dist.get_rank(group=p.ds_process_group)
                count = max(0, min(size, loc.numel - start))
                values = read_tensor(loc, start, count)
                if values.is_floating_point():  # the casts of a full load, then DeepSpeed's
                    values = values.to(dtype or values.dtype).to(self.param_dtype)
                part.narrow(0, 0, count).copy_(values)
                part.narrow(0, count, size - count).zero_()
                self.bytes_read += count * loc.torch_dtype.itemsize
