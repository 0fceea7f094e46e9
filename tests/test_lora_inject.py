"""PEFT injection on the tiny MOVA model: freezing, no-op inits, scale, merge maths, state dicts and errors."""

from __future__ import annotations

import math

import pytest
import torch

from mova_train.lora import (
    LoraConfig,
    LoraError,
    apply_lora,
    describe_lora,
    extract_lora_state,
    load_lora_state_dict,
    lora_parameters,
    lora_state_dict,
    merge_lora,
    randomize_lora,
    remove_lora,
    set_active_adapters,
    set_lora_scale,
)
from mova_train.models import build_mova, get_model_config

CFG = LoraConfig(
    rank=4,
    alpha=8.0,
    targets={
        "video_dit_2": ["self_attn", "ffn"],
        "audio_dit": ["text_cross_attn"],
        "dual_tower_bridge": ["bridge_a2v", "bridge_v2a"],
    },
)


def fresh_model():
    return build_mova(get_model_config("tiny"), device="cpu", seed=0)


def tiny_inputs(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = model.config
    return dict(
        video_latents=torch.randn(1, 16, 2, 4, 4, generator=g),  # [B, 16, T, h, w]
        video_cond=torch.randn(1, 20, 2, 4, 4, generator=g),
        audio_latents=torch.randn(1, c.audio_latent_dim, 6, generator=g),  # [B, Ca, L]
        text=torch.randn(1, 7, c.text_dim, generator=g),  # [B, N, Dt]
        timestep_video=torch.tensor([512.0]),
        expert="video_dit_2",
    )


def run(model, inputs):
    with torch.no_grad():
        return model(**inputs)


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def linear_weights(model, component, paths):
    """{path: (W, bias-less weight tensor)} read through PEFT wrappers or plain Linear modules."""
    named = dict(getattr(model, component).named_modules())
    out = {}
    for path in paths:
        module = named[path]
        base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        out[path] = base.weight.detach().clone()
    return out


def test_apply_freezes_base_and_counts_trainable():
    model = fresh_model()
    expected = sum(r.trainable_params for r in describe_lora(model, CFG))
    targets = apply_lora(model, CFG)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    assert {n.split(".")[0] for n in trainable} == set(targets) == set(CFG.targets)
    assert all(p.dtype == torch.float32 for p in lora_parameters(model))


@pytest.mark.parametrize("init", ["default", "gaussian", "orthogonal"])
def test_inits_start_as_a_no_op(init):
    model = fresh_model()
    inputs = tiny_inputs(model)
    base = run(model, inputs)
    apply_lora(model, LoraConfig(rank=4, alpha=4.0, init=init, targets=CFG.targets))
    out = run(model, inputs)
    if init == "orthogonal":  # B A = 0 exactly only in exact arithmetic
        assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(base, out))
    else:
        assert same(base, out)


def test_training_changes_only_the_adapter():
    model = fresh_model()
    inputs = tiny_inputs(model)
    base_before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, CFG)
    lora_before = {k: v.clone() for k, v in lora_state_dict(model).items()}
    # Every parameter is handed to the optimizer, weight decay on: frozen ones must still not move.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        pred_video, pred_audio = model(**inputs)
        loss = pred_video.square().mean() + pred_audio.square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if ".lora_" not in k}
    assert after.keys() == base_before.keys()
    assert all(torch.equal(after[k], base_before[k]) for k in base_before)
    changed = [k for k, v in lora_state_dict(model).items() if not torch.equal(v, lora_before[k])]
    assert len(changed) == len(lora_before)


def test_scale_zero_reproduces_the_base_and_scale_one_the_adapter():
    model = fresh_model()
    inputs = tiny_inputs(model)
    base = run(model, inputs)
    apply_lora(model, CFG)
    randomize_lora(model, seed=3)
    trained = run(model, inputs)
    assert not same(base, trained)
    set_lora_scale(model, 0.0)
    assert same(base, run(model, inputs))
    set_lora_scale(model, 1.0)
    assert same(trained, run(model, inputs))
    remove_lora(model)
    assert same(base, run(model, inputs))


@pytest.mark.parametrize("use_rslora", [False, True])
def test_merge_equals_w_plus_scale_b_a(use_rslora):
    cfg = LoraConfig(rank=4, alpha=8.0, use_rslora=use_rslora, targets=CFG.targets)
    model = fresh_model()
    targets = apply_lora(model, cfg)
    randomize_lora(model, seed=5)
    user_scale = 0.5
    set_lora_scale(model, user_scale)
    state = lora_state_dict(model)
    before = {c: linear_weights(model, c, paths) for c, paths in targets.items()}
    merge_lora(model)
    scaling = user_scale * (cfg.alpha / math.sqrt(cfg.rank) if use_rslora else cfg.alpha / cfg.rank)
    for component, paths in targets.items():
        after = linear_weights(model, component, paths)
        for path in paths:
            a = state[f"{component}.{path}.lora_A.weight"].double()
            b = state[f"{component}.{path}.lora_B.weight"].double()
            expected = before[component][path].double() + scaling * (b @ a)
            torch.testing.assert_close(after[path].double(), expected, rtol=1e-6, atol=1e-6)
    assert not any(".lora_" in n for n, _ in model.named_parameters())


def test_dora_forward_and_merge_agree_with_the_formula():
    cfg = LoraConfig(rank=4, alpha=4.0, use_dora=True, targets={"audio_dit": ["self_attn"]})
    model = fresh_model()
    inputs = tiny_inputs(model)
    targets = apply_lora(model, cfg)
    randomize_lora(model, seed=7)
    trained = run(model, inputs)
    state = lora_state_dict(model)
    assert any(k.endswith("lora_magnitude_vector.weight") for k in state)
    before = linear_weights(model, "audio_dit", targets["audio_dit"])
    merge_lora(model)
    after = linear_weights(model, "audio_dit", targets["audio_dit"])
    for path in targets["audio_dit"]:
        key = f"audio_dit.{path}"
        w = (
            before[path].double()
            + (b := state[f"{key}.lora_B.weight"].double()) @ state[f"{key}.lora_A.weight"].double()
        )
        assert b.shape[1] == 4
        m = state[f"{key}.lora_magnitude_vector.weight"].double()
        expected = w * (m / w.norm(dim=1)).unsqueeze(1)  # DoRA: magnitude x direction, row-wise
        torch.testing.assert_close(after[path].double(), expected, rtol=1e-5, atol=1e-6)
    merged = run(model, inputs)
    assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(trained, merged))


def test_state_dict_roundtrip_and_extraction_from_a_wrapped_full_state():
    model = fresh_model()
    apply_lora(model, CFG)
    randomize_lora(model, seed=11)
    state = lora_state_dict(model)
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in state)
    wrapped = {f"module.{k}": v for k, v in model.state_dict().items()}  # e.g. a DeepSpeed/DDP wrapper prefix
    extracted = extract_lora_state(wrapped)
    assert extracted.keys() == state.keys() and all(torch.equal(extracted[k], state[k]) for k in state)

    other = fresh_model()
    apply_lora(other, CFG)
    load_lora_state_dict(other, state)
    inputs = tiny_inputs(model)
    assert same(run(model, inputs), run(other, inputs))


def test_load_errors_name_the_problem():
    model = fresh_model()
    apply_lora(model, CFG)
    state = lora_state_dict(model)
    key_a = next(k for k in state if k.endswith("lora_A.weight"))

    small = fresh_model()
    apply_lora(small, LoraConfig(rank=2, alpha=2.0, targets=CFG.targets))
    with pytest.raises(LoraError, match="rank mismatch .*rank 4.*rank 2"):
        load_lora_state_dict(small, state)

    wrong_in = dict(state)
    wrong_in[key_a] = torch.zeros(4, state[key_a].shape[1] + 1)
    with pytest.raises(LoraError, match="in_features .*another base"):
        load_lora_state_dict(model, wrong_in)

    missing = {k: v for k, v in state.items() if k != key_a}
    with pytest.raises(LoraError, match="missing 1 key"):
        load_lora_state_dict(model, missing)
    with pytest.raises(LoraError, match="not a canonical adapter key"):
        load_lora_state_dict(model, {"blocks.0.self_attn.q.lora_A.weight": state[key_a]})
    with pytest.raises(LoraError, match="already has an adapter named 'default'"):
        apply_lora(model, CFG)
    with pytest.raises(LoraError, match="unknown adapter"):
        set_active_adapters(model, ["nope"])


def test_two_active_adapters_add_their_updates():
    model = fresh_model()
    cfg = LoraConfig(rank=4, alpha=4.0, targets={"audio_dit": ["ffn"]})
    for seed, name in enumerate(("one", "two")):
        apply_lora(model, cfg, adapter_name=name)
        randomize_lora(model, seed=seed, adapter_name=name)
    layer = model.audio_dit.blocks[0].ffn[0]
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(0))
    outs = {}
    with torch.no_grad():
        for names in ([], ["one"], ["two"], ["one", "two"]):
            set_active_adapters(model, names)
            outs[tuple(names)] = layer(x)
    base = outs[()]
    torch.testing.assert_close(base, layer.get_base_layer()(x))
    torch.testing.assert_close(
        outs[("one", "two")] - base, (outs[("one",)] - base) + (outs[("two",)] - base), rtol=1e-5, atol=1e-6
    )
