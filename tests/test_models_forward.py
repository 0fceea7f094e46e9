"""The dual-tower step on the tiny model: shapes, backward, per-sample batching, checkpointing flag, errors."""

import copy

import pytest
import torch

from mova_train.models import build_mova, set_activation_checkpointing
from mova_train.models.layers import attention


@pytest.fixture(scope="module")
def tiny():
    return build_mova("tiny", device="cpu", seed=0)


def _inputs(b=2, seed=0, frames=3, audio=9):
    g = torch.Generator().manual_seed(seed)
    return dict(
        video_latents=torch.randn(b, 16, frames, 4, 6, generator=g),
        video_cond=torch.randn(b, 20, frames, 4, 6, generator=g),
        audio_latents=torch.randn(b, 128, audio, generator=g),
        text=torch.randn(b, 7, 32, generator=g),
        timestep_video=torch.tensor([950.0, 312.5, 20.0])[:b],
    )


def test_forward_shapes_and_backward(tiny):
    x = _inputs()
    pv, pa = tiny(**x, expert="video_dit")
    assert pv.shape == x["video_latents"].shape and pa.shape == x["audio_latents"].shape
    assert torch.isfinite(pv).all() and torch.isfinite(pa).all()
    (pv.square().mean() + pa.square().mean()).backward()
    for name in ("video_dit", "audio_dit", "dual_tower_bridge"):
        grads = [p.grad for p in getattr(tiny, name).parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), name
        assert sum(g.abs().sum() for g in grads) > 0
    assert all(p.grad is None for p in tiny.video_dit_2.parameters())  # the other expert is untouched
    tiny.zero_grad(set_to_none=True)


def test_batch_equals_per_sample_runs(tiny):
    """Per-sample timesteps drive per-sample modulation and head (the reference head only worked for B=1)."""
    x = _inputs(b=3)
    with torch.no_grad():
        pv, pa = tiny(**x, expert="video_dit_2")
        for i in range(3):
            xi = {k: v[i : i + 1] for k, v in x.items()}
            pvi, pai = tiny(**xi, expert="video_dit_2")
            torch.testing.assert_close(pv[i : i + 1], pvi, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(pa[i : i + 1], pai, atol=1e-5, rtol=1e-5)


def test_audio_timestep_defaults_to_video_timestep(tiny):
    x = _inputs()
    with torch.no_grad():
        a = tiny(**x, expert="video_dit")
        b = tiny(**x, timestep_audio=x["timestep_video"], expert="video_dit")
        c = tiny(**x, timestep_audio=torch.tensor([10.0, 10.0]), expert="video_dit")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_activation_checkpointing_gives_identical_outputs_and_grads(tiny):
    x = _inputs()

    def run():
        tiny.zero_grad(set_to_none=True)
        pv, pa = tiny(**x, expert="video_dit")
        (pv.square().mean() + pa.square().mean()).backward()
        grads = {n: q.grad.clone() for n, q in tiny.named_parameters() if q.grad is not None}
        return pv.detach(), pa.detach(), grads

    plain = run()
    n = set_activation_checkpointing(tiny, True)
    assert n == 4 + 4 + 3 + 2 * 3  # blocks of both experts + audio blocks + both bridge directions
    assert all(b.activation_checkpointing for b in tiny.video_dit.blocks)
    try:
        ckpt = run()
    finally:
        set_activation_checkpointing(tiny, False)
    assert torch.equal(plain[0], ckpt[0]) and torch.equal(plain[1], ckpt[1])
    assert plain[2].keys() == ckpt[2].keys() and len(plain[2]) > 0
    for k in plain[2]:
        assert torch.equal(plain[2][k], ckpt[2][k]), k
    tiny.zero_grad(set_to_none=True)


def test_checkpointing_can_target_components(tiny):
    try:
        assert set_activation_checkpointing(tiny, True, components=["audio_dit"]) == 3
        assert not tiny.video_dit.blocks[0].activation_checkpointing
        assert tiny.audio_dit.blocks[0].activation_checkpointing
    finally:
        set_activation_checkpointing(tiny, False)


def test_sdpa_attention_matches_softmax_formula():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 3, 32, generator=g) for n in (5, 7, 7))
    w = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) / 32**0.5, dim=-1)
    ref = torch.einsum("bhqk,bkhd->bqhd", w, v).reshape(2, 5, 96)
    torch.testing.assert_close(attention(q, k, v), ref, atol=1e-5, rtol=1e-5)


def test_bf16_forward_runs_and_stays_close(tiny):
    x = _inputs()
    model16 = copy.deepcopy(tiny).to(torch.bfloat16)
    with torch.no_grad():
        pv32, _ = tiny(**x, expert="video_dit")
        pv16, pa16 = model16(**x, expert="video_dit")
    assert pv16.dtype == torch.bfloat16 and pa16.dtype == torch.bfloat16
    assert (pv16.float() - pv32).abs().mean() < 0.05 * pv32.abs().mean()


def test_input_errors_name_the_problem(tiny):
    x = _inputs()
    with pytest.raises(ValueError, match="expert must be one of"):
        tiny(**x, expert="video_dit_3")
    with pytest.raises(ValueError, match=r"video_cond must be \[2, 20, 3, 4, 6\]"):
        tiny(**{**x, "video_cond": x["video_cond"][:, :16]}, expert="video_dit")
    with pytest.raises(ValueError, match="divisible by the patch size"):
        tiny(
            **{**x, "video_latents": x["video_latents"][..., :5], "video_cond": x["video_cond"][..., :5]},
            expert="video_dit",
        )
    with pytest.raises(ValueError, match=r"text must be \[2, N, 32\]"):
        tiny(**{**x, "text": x["text"][..., :16]}, expert="video_dit")
    with pytest.raises(ValueError, match="timestep_video"):
        tiny(**{**x, "timestep_video": torch.tensor([1.0, 2.0, 3.0])}, expert="video_dit")
    one = build_mova("tiny", components=("video_dit",), device="cpu", seed=0)
    with pytest.raises(ValueError, match="'audio_dit' is not loaded"):
        one(**x, expert="video_dit")
    with pytest.raises(ValueError, match="unknown component"):
        build_mova("tiny", components=("video_dit", "text_encoder"))


def test_expert_routing_uses_the_config_boundary(tiny):
    assert tiny.expert_for_timestep(900.0) == "video_dit"
    assert tiny.expert_for_timestep(torch.tensor([899.69])) == "video_dit_2"


def test_seeded_builds_are_reproducible_and_experts_differ():
    a = build_mova("tiny", device="cpu", seed=7)
    b = build_mova("tiny", device="cpu", seed=7)
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), n
    assert not torch.equal(
        a.video_dit.blocks[0].self_attn.q.weight, a.video_dit_2.blocks[0].self_attn.q.weight
    )


def test_bridge_scales_zero_decouple_the_towers(tiny):
    """With both bridge directions scaled to 0 the step is exactly the two towers run on their own."""
    x = _inputs()
    with torch.no_grad():
        pv, pa = tiny(**x, expert="video_dit", a2v_scale=0.0, v2a_scale=0.0)
        alone_v = tiny.video_dit(
            torch.cat([x["video_latents"], x["video_cond"]], 1), x["timestep_video"], x["text"]
        )
        alone_a = tiny.audio_dit(x["audio_latents"], x["timestep_video"], x["text"])
        only_a2v = tiny(**x, expert="video_dit", v2a_scale=0.0)
    torch.testing.assert_close(pv, alone_v, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(pa, alone_a, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(only_a2v[1], alone_a, atol=1e-6, rtol=1e-6)  # audio untouched by a2v
    assert (only_a2v[0] - alone_v).abs().max() > 1e-3  # video did receive the audio
