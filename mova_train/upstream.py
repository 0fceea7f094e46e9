"""Workarounds for upstream libraries, in one place, each with the version it was written against.

DeepSpeed 0.19.8 / torch 2.13 (training) and transformers 5.23 (the UMT5 text encoder and its tokenizer). Keep
every such patch here so it is easy to drop when the upstream fix lands. (The decord 0.6.0 small-width decode
fallback lives beside the decoder it guards, in `mova_train/media.py`.)
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # transformers is imported only by the functions that need it (the trainer never does)
    from transformers import T5TokenizerFast, UMT5Config, UMT5EncoderModel


# --- third-party banners ----------------------------------------------------------------------------------------
# Messages that say nothing a user can act on, printed once per process (so once per rank plus once by the launcher).
# Each entry: logger name -> message prefixes dropped from it, with why. Two banners are fixed where they start
# instead: setuptools' "`project.license` as a TOML table is deprecated" (twice per `make setup`) by an SPDX string in
# pyproject.toml, and the launcher's own OMP_NUM_THREADS / accelerator lines by `quiet_launcher_env` below.
KNOWN_BANNERS: dict[str, tuple[str, ...]] = {
    # DeepSpeed 0.19.8 `accelerator/real_accelerator.py`, on every import without a GPU: on a CPU machine that is
    # the intended accelerator (the demo, the tests), and on a GPU machine torch's own CUDA errors say more.
    "DeepSpeed": (
        "Setting accelerator to CPU",
        # DeepSpeed 0.19.8 `runtime/engine.py`: our GroupMaskedAdamW is AdamW with per-group masking; the config
        # check sets `zero_allow_untested_optimizer` on purpose, and the equivalence with ZeRO's own path is tested.
        "**** You are using ZeRO with an untested optimizer",
    ),
    # matplotlib 3.11, once per fresh cache directory (each new machine, each CI run): the cache is built either way.
    "matplotlib.font_manager": ("Matplotlib is building the font cache",),
}


class _DropPrefixes(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(message.startswith(p) for p in self.prefixes)


def silence_known_banners() -> None:
    """Drop the messages in KNOWN_BANNERS (standard library only, so any entry point may call it first; filters on a
    logger persist when the library later configures its handlers). Idempotent."""
    for name, prefixes in KNOWN_BANNERS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropPrefixes) for f in logger.filters):
            logger.addFilter(_DropPrefixes(prefixes))


def quiet_launcher_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for `accelerate launch` / torchrun on CPU that spares the launcher's own banners, which run before
    any of our code: torchrun's "Setting OMP_NUM_THREADS environment variable for each process to be 1" (it sets 1
    when unset; we set the same value) and DeepSpeed's "Setting accelerator to CPU" in the launcher process
    (DS_ACCELERATOR=cpu is what it detects anyway). Only for machines without a GPU."""
    env = dict(os.environ if env is None else env)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("DS_ACCELERATOR", "cpu")
    return env


# --- DeepSpeed 0.19.8 / torch 2.13 ----------------------------------------------------------------------------


def skip_cpu_shm_comm_build() -> None:
    """DeepSpeed 0.19.8 on CPU: `deepspeed.comm.torch.TorchBackend` JIT-compiles its shared-memory all-reduce
    (`deepspeed_shm_comm`, C++, 60-75 s on the first launch of a machine, and it needs g++). Only
    `inference_all_reduce` (DeepSpeed inference / AutoTP) uses it; training's collectives go through
    torch.distributed (gloo). Mark it unavailable so DeepSpeed skips the build, as on a non-Linux host."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def log_cpu_adam_build_notice(ds_config: dict | None, log) -> None:
    """DeepSpeed 0.19.8 JIT-compiles its CPU Adam (`cpu_adam`, C++, about a minute, needs g++) the first time an
    optimizer is offloaded to CPU (`deepspeed=zero3_offload`); say so before the silent minute. Cached afterwards
    under ~/.cache/torch_extensions (or TORCH_EXTENSIONS_DIR)."""
    zero = (ds_config or {}).get("zero_optimization", {})
    if str(zero.get("offload_optimizer", {}).get("device", "none")) == "cpu":
        log(
            "DeepSpeed compiles its CPU Adam op on the first optimizer offload on this machine (about a minute, "
            "needs a C++ compiler); later runs reuse it"
        )


# --- DeepSpeed 0.19.8 / torch 2.13 ----------------------------------------------------------------------------


def silence_known_warnings() -> None:
    """torch 2.13 + DeepSpeed 0.19.8: every ZeRO collective warns that `all_gather_into_tensor` /
    `reduce_scatter_tensor` are deprecated (a FutureWarning per call, per rank), burying the training log."""
    warnings.filterwarnings(
        "ignore",
        message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
        category=FutureWarning,
    )


def set_collective_timeout(timeout) -> None:
    """torch 2.13: `init_process_group(timeout=...)` sets the timeout of the default group only; every group made
    later with `new_group()` (DeepSpeed's data-parallel group, which ZeRO's gradient all-reduce uses) takes the
    module defaults, 30 min (gloo) / 10 min (NCCL). Set those defaults too, before any group exists, so a stalled
    peer ends the run within `trainer.collective_timeout_min` whatever group it stalls."""
    import torch.distributed.distributed_c10d as c10d

    c10d.default_pg_timeout = timeout
    c10d.default_pg_nccl_timeout = timeout


def relink_zero_optimizer_states(engine) -> None:
    """DeepSpeed 0.19.8, ZeRO stage 1/2: each trainable parameter's view of its optimizer state is linked once,
    right after the first optimizer step. A parameter group that sat out that step (the idle expert's adapters,
    masked by GroupMaskedAdamW) had no state then, so its views stay empty and `safe_get_full_optimizer_state` /
    `safe_set_full_optimizer_state` fail with "exp_avg not found in optimizer state fragment". Link again, now
    that the groups have state. (ZeRO-3 reads the state directly and needs nothing.)"""
    optimizer = engine.optimizer
    if hasattr(optimizer, "_lazy_init_hp_params_optimizer_state"):
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()


def clear_zero3_stale_grads(engine) -> None:
    """DeepSpeed 0.19.8, ZeRO stage 3 without optimizer offload.

    ZeRO-3 keeps reduced gradient partitions in one flat buffer and, after an optimizer step, only overwrites the
    slices of parameters that take part in the next backward. A parameter that sits out a step (the idle video
    expert of the MoE) keeps its previous gradient: it counts again in the global grad norm (and a non-finite one
    makes every following step overflow). Zeroing the buffer after each optimizer step restores the semantics of
    ZeRO-2 and plain PyTorch (an unused parameter has no gradient).
    """
    if (
        engine is None
        or not hasattr(engine, "zero_optimization_stage")
        or engine.zero_optimization_stage() != 3
    ):
        return
    optimizer = getattr(engine, "optimizer", None)
    buffer = getattr(optimizer, "grad_partitions_flat_buffer", None)
    if buffer is not None:
        buffer.zero_()


def forget_zero3_module_trace(engine) -> None:
    """DeepSpeed 0.19.8, ZeRO stage 3: call before a forward that runs the other video expert than the last one.

    ZeRO-3 records the order in which modules ran and, once the trace is complete, prefetches the parameters of the
    modules that come next in it. The first module of our forward (the model itself) is the same for both experts,
    so after an expert switch the trace still matches there and the prefetch gathers the idle expert's first
    modules (up to stage3_prefetch_bucket_size elements) before the next module invalidates it. Invalidating the
    trace first makes that forward fetch only what it runs; the new expert's trace is recorded on the next one."""
    offload = getattr(getattr(engine, "optimizer", None), "parameter_offload", None)
    if offload is None:
        return
    coordinator = offload.get_param_coordinator()
    if coordinator.is_complete_trace():
        coordinator._invalidate_trace()


# --- transformers 5.23 (in 4.x the calls below differ as noted) ----------------------------------------------


def build_umt5_encoder(config: UMT5Config) -> UMT5EncoderModel:
    """UMT5EncoderModel on the current default device with eager attention.

    transformers 5 picks SDPA for UMT5 by default; the reference (transformers 4.x, where T5-family models only had
    eager attention with the additive position bias) ran eager. We pin eager so our embeddings follow the reference
    arithmetic. In 4.x the private `_attn_implementation` attribute is also what the model reads.
    """
    from transformers import UMT5EncoderModel

    config._attn_implementation = "eager"
    return UMT5EncoderModel(config)


def load_t5_tokenizer(folder: str | os.PathLike) -> T5TokenizerFast:
    """The T5/UMT5 tokenizer saved in `folder`, offline only (never reaches for the Hub).

    In transformers 5, `T5TokenizerFast` is an alias of the tokenizers-backed `T5Tokenizer`; in 4.x it is the fast
    class itself. Both read `tokenizer.json` (+ `tokenizer_config.json`).
    """
    from mova_train.checkpoint_io import CheckpointError  # torch: not needed by the banner filters above

    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"missing tokenizer folder: {folder}")
    if not (folder / "tokenizer.json").is_file() and not (folder / "spiece.model").is_file():
        raise CheckpointError(f"{folder} holds neither tokenizer.json nor spiece.model")
    from transformers import T5TokenizerFast

    try:
        return T5TokenizerFast.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot load the tokenizer in {folder}: {e}") from None


def t5_tokenizer_from_vocab(vocab: list[tuple[str, float]], *, model_max_length: int) -> T5TokenizerFast:
    """A T5 tokenizer (Unigram, Metaspace, trailing </s>) from `[(piece, log_prob), ...]` whose first three pieces
    are <pad>, </s>, <unk>.

    Uses the transformers 5 constructor `T5Tokenizer(vocab=...)`; 4.x's T5TokenizerFast has no `vocab` argument
    (there one would pass `tokenizer_object=`), so this helper is the single place to adapt.
    """
    if [p for p, _ in vocab[:3]] != ["<pad>", "</s>", "<unk>"]:
        raise ValueError(f"vocab must start with <pad>, </s>, <unk>; got {[p for p, _ in vocab[:3]]}")
    from transformers import T5TokenizerFast

    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=model_max_length)
