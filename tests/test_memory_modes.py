"""Memory modes of training (issue 11), on the tiny model in this process: each mode gives the same numbers as the
plain step and keeps less for backward."""

from __future__ import annotations

import pytest
import torch

from mova_train.errors import ConfigValueError
from mova_train.lora import LoraConfig, apply_lora, randomize_lora
from mova_train.models import build_mova, set_activation_checkpointing
from mova_train.training.config import ModelConfig
from mova_train.training.synthetic import write_random_shards_for
from mova_train.training.trainer import run
from tests.train_utils import compose_train, read_metrics, reset_accelerate, tiny_overrides

# ---------------------------------------------------------------------------------------------------------------
# Checkpoint regions per dual-tower layer, and activation offload
# ---------------------------------------------------------------------------------------------------------------

LORA = LoraConfig(
    rank=4,
    alpha=8.0,
    targets={
        "video_dit": ["self_attn", "ffn"],
        "audio_dit": ["self_attn", "text_cross_attn"],
        "dual_tower_bridge": ["bridge_a2v", "bridge_v2a"],
    },
)


@pytest.fixture(scope="module")
def lora_tiny():
    """The tiny model in fp32 with LoRA on both towers and both bridge directions, adapters non-zero."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is faster on a shared machine
    model = build_mova("tiny", device="cpu", seed=0)
    apply_lora(model, LORA)
    randomize_lora(model, seed=3)
    yield model.train()
    torch.set_num_threads(threads)


def _inputs(b=2):
    g = torch.Generator().manual_seed(0)
    return dict(
        video_latents=torch.randn(b, 16, 3, 4, 6, generator=g),
        video_cond=torch.randn(b, 20, 3, 4, 6, generator=g),
        audio_latents=torch.randn(b, 128, 9, generator=g),
        text=torch.randn(b, 7, 32, generator=g),
        timestep_video=torch.tensor([950.0, 312.5]),
    )


def _step(model, **mode):
    """One forward + backward in `mode` (None: no checkpointing) -> (outputs, LoRA grads, what backward kept).

    What backward kept is seen through saved-tensor hooks around the whole step, which see every tensor saved
    outside the checkpoint regions (inside a region, the region's own hooks take over): the saves of stream-shaped
    tensors ([B, L, D] of either tower) up to the output heads, and the bytes of all distinct saved storages.
    """
    set_activation_checkpointing(model, mode.pop("enabled", False), **mode)
    x = _inputs()
    stream_shapes = {(2, 18, 96): "video", (2, 9, 64): "audio"}  # 18 = 3 frames x 2 x 3 patches
    saved = {"video": [], "audio": [], "storages": {}}
    before_heads = [True]
    hooks = [
        model.video_dit.head.register_forward_pre_hook(lambda *_: before_heads.__setitem__(0, False)),
        model.audio_dit.head.register_forward_pre_hook(lambda *_: before_heads.__setitem__(0, False)),
    ]

    def pack(t):
        storage = t.untyped_storage()
        saved["storages"][storage.data_ptr()] = storage.nbytes()
        kind = stream_shapes.get(tuple(t.shape))
        if kind and before_heads[0]:
            saved[kind].append(storage.data_ptr())
        return t

    model.zero_grad(set_to_none=True)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            pv, pa = model(**x, expert="video_dit")
        (pv.square().mean() + pa.square().mean()).backward()
    finally:
        for h in hooks:
            h.remove()
        set_activation_checkpointing(model, False)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return (pv.detach(), pa.detach()), grads, saved


def _assert_identical(a, b):
    assert torch.equal(a[0][0], b[0][0]) and torch.equal(a[0][1], b[0][1])
    assert a[1].keys() == b[1].keys() and len(a[1]) > 0
    for name in a[1]:
        assert a[1][name] is not None and torch.equal(a[1][name], b[1][name]), name


def test_layer_regions_are_exact_and_keep_only_the_layer_inputs(lora_tiny):
    plain = _step(lora_tiny)
    blocks = _step(lora_tiny, enabled=True, region="block")
    layers = _step(lora_tiny, enabled=True)  # region="layer", the default
    _assert_identical(plain, blocks)
    _assert_identical(plain, layers)
    assert all(g.abs().sum() > 0 for g in layers[1].values())  # every adapter (A and B) gets a gradient

    # tiny: 4 video layers, 3 audio layers, the bridge in layers 0-2. One region per layer keeps (v, a) entering
    # layers 0-2 and v entering layer 3: nothing else of the layer loop, each a distinct tensor.
    kept = layers[2]
    assert len(kept["video"]) == len(set(kept["video"])) == 4
    assert len(kept["audio"]) == len(set(kept["audio"])) == 3
    # per-block regions also keep the bridged streams entering each block (a second tensor per bridged layer)
    assert len(set(blocks[2]["video"])) == 4 + 3 and len(set(blocks[2]["audio"])) == 3 + 3

    def kept_bytes(s):
        return sum(s["storages"].values())

    assert kept_bytes(layers[2]) < kept_bytes(blocks[2]) < kept_bytes(plain[2])


def test_activation_offload_is_exact_and_keeps_the_layer_inputs_on_the_host(lora_tiny):
    layers = _step(lora_tiny, enabled=True)
    stats = lora_tiny.offload_stats = {}
    try:
        offloaded = _step(lora_tiny, enabled=True, offload=True)
    finally:
        lora_tiny.offload_stats = None
    _assert_identical(layers, offloaded)
    # the layer inputs went to the offload's host copies instead of the graph: 7 tensors (3 x (v, a) + v)
    assert offloaded[2]["video"] == [] and offloaded[2]["audio"] == []
    assert stats["tensors"] == 7 and stats["devices"] == {"cpu"}
    assert stats["bytes"] == 4 * (2 * 18 * 96 * 4) + 3 * (2 * 9 * 64 * 4)  # fp32

    # no grad (inference, held-out loss): no regions, nothing offloaded, the same outputs
    stats = lora_tiny.offload_stats = {}
    set_activation_checkpointing(lora_tiny, True, offload=True)
    try:
        with torch.no_grad():
            pv, pa = lora_tiny(**_inputs(), expert="video_dit")
    finally:
        set_activation_checkpointing(lora_tiny, False)
        lora_tiny.offload_stats = None
    assert stats == {} and torch.equal(pv, layers[0][0]) and torch.equal(pa, layers[0][1])


def test_partial_flags_fall_back_to_block_regions_and_offload_needs_layer_regions(lora_tiny):
    # only the audio tower flagged: no whole layer is, so each flagged block is its own region (still exact)
    plain = _step(lora_tiny)
    audio_only = _step(lora_tiny, enabled=True, components=["audio_dit"])
    _assert_identical(plain, audio_only)
    assert len(set(audio_only[2]["audio"])) > 3  # the bridge's saves of a are not in a region
    with pytest.raises(ValueError, match="region='layer'"):
        set_activation_checkpointing(lora_tiny, True, region="block", offload=True)
    with pytest.raises(ValueError, match="region must be one of layer, block"):
        set_activation_checkpointing(lora_tiny, True, region="tower")


def test_activation_offload_config_is_validated():
    ModelConfig(checkpoint="ckpt", activation_checkpointing=True, activation_offload=True).validate()
    with pytest.raises(
        ConfigValueError, match=r"^model.activation_offload=True .*activation_checkpointing=true"
    ):
        ModelConfig(checkpoint="ckpt", activation_offload=True).validate()
    with pytest.raises(ConfigValueError, match="model.activation_offload='yes'"):
        ModelConfig(checkpoint="ckpt", activation_checkpointing=True, activation_offload="yes").validate()


def test_resume_with_activation_offload_matches_the_uninterrupted_run(tiny_checkpoint, tmp_path):
    shards = write_random_shards_for(tiny_checkpoint, tmp_path / "shards", num_clips=1)
    mode = ("model.activation_checkpointing=true", "model.activation_offload=true")

    def losses(run_dir, *extra):
        reset_accelerate()
        overrides = tiny_overrides(tiny_checkpoint, shards, run_dir, "trainer.max_steps=4", *extra)
        run(compose_train([*overrides, "trainer.save_every=100"]))
        return [r["loss"] for r in read_metrics(run_dir)]

    try:
        plain = losses(tmp_path / "plain")
        whole = losses(tmp_path / "whole", *mode)
        assert losses(tmp_path / "resumed", *mode, "trainer.max_steps_per_run=2") == whole[:2]
        resumed = losses(tmp_path / "resumed", *mode)  # the same command resumes from step 2
    finally:
        reset_accelerate()
    assert len(whole) == 4 and resumed == whole
    assert whole == plain  # the memory mode changes no loss
