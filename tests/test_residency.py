"""Expert residency and the expert schedule: phases of `objective.expert_switch_every` optimizer steps, their exact
resume and the refused resume of another schedule; only the active expert's frozen weights on the accelerator (on
CPU: the `meta` device stands for it, and real tensors' storage shows what was copied); a micro-step never runs
the idle expert's modules."""

from __future__ import annotations

import pytest
import torch

from mova_train.config import ConfigValueError, required_components
from mova_train.lora import LoraConfig, apply_lora
from mova_train.models import build_mova, get_model_config
from mova_train.names import EXPERTS
from mova_train.training import checkpoint as ckpt_io
from mova_train.training.config import ObjectiveConfig
from mova_train.training.objective import ExpertChooser
from mova_train.training.residency import ExpertResidency, build_residency, resident_experts
from mova_train.training.trainer import Trainer, run, to_train_config, validate_config
from tests.train_utils import compose_train, read_metrics, reset_accelerate, tiny_overrides

HIGH, LOW = EXPERTS


pytestmark = pytest.mark.usefixtures("fresh_accelerate")  # tests/conftest.py


def experts_per_step(chooser: ExpertChooser, gas: int, steps: int) -> list[list[str]]:
    return [[chooser.expert(s * gas + i) for i in range(gas)] for s in range(steps)]


@pytest.mark.parametrize("gas", [1, 2])
def test_schedule_of_switch_every_1_2_3(gas):
    one = ExpertChooser(
        ObjectiveConfig(expert="alternate", expert_switch_every=1), seed=0, gradient_accumulation_steps=gas
    )
    # 1: the reference, per micro-step (an optimizer step with accumulation trains both experts)
    assert [one.expert(m) for m in range(6)] == [HIGH, LOW, HIGH, LOW, HIGH, LOW]
    for n in (2, 3):
        alt = ExpertChooser(
            ObjectiveConfig(expert="alternate", expert_switch_every=n),
            seed=0,
            gradient_accumulation_steps=gas,
        )
        steps = experts_per_step(alt, gas, 4 * n)
        assert all(len(set(micro)) == 1 for micro in steps)  # one expert per optimizer step
        assert [micro[0] for micro in steps] == ([HIGH] * n + [LOW] * n) * 2
        ratio = ExpertChooser(
            ObjectiveConfig(expert="ratio", high_noise_ratio=0.3, expert_switch_every=n), seed=7,
            gradient_accumulation_steps=gas,
        )  # fmt: skip
        picks = [micro[0] for micro in experts_per_step(ratio, gas, 600 * n)]
        blocks = [picks[i : i + n] for i in range(0, len(picks), n)]
        assert all(len(set(b)) == 1 for b in blocks)  # one draw per block of n steps
        assert abs([b[0] for b in blocks].count(HIGH) / len(blocks) - 0.3) < 0.06
        again = ExpertChooser(
            ObjectiveConfig(expert="ratio", high_noise_ratio=0.3, expert_switch_every=n), seed=7,
            gradient_accumulation_steps=gas,
        )  # fmt: skip
        assert [micro[0] for micro in experts_per_step(again, gas, 600 * n)] == picks  # pure in (seed, step)
    only = ExpertChooser(ObjectiveConfig(expert=f"only:{LOW}", expert_switch_every=3), seed=0)
    assert {only.expert(m) for m in range(20)} == {LOW}


def test_schedule_settings_are_validated_and_only_loads_one_expert(tiny_checkpoint, two_clips, tmp_path):
    for field, value, allowed in (
        ("expert_switch_every", 0, "expected optimizer steps >= 1"),
        ("expert_switch_every", 1.5, "expected optimizer steps >= 1"),
        ("idle_expert", "gpu", "allowed: host, device"),
    ):
        with pytest.raises(ConfigValueError, match=f"objective.{field}={value!r} is not allowed; {allowed}"):
            ObjectiveConfig(**{field: value}).validate()
    cfg = to_train_config(
        compose_train(tiny_overrides(tiny_checkpoint, two_clips, tmp_path, f"objective.expert=only:{LOW}"))
    )
    assert required_components(cfg) == (LOW, "audio_dit", "dual_tower_bridge")  # the other is never read
    assert resident_experts(cfg.objective) == (LOW,)
    assert resident_experts(ObjectiveConfig()) == (HIGH,)  # idle expert on the host: one at a time
    assert resident_experts(ObjectiveConfig(idle_expert="device")) == EXPERTS
    assert resident_experts(ObjectiveConfig(), zero_stage=3) == EXPERTS  # DeepSpeed's partitions, both


def test_resume_in_the_middle_of_a_phase_equals_the_uninterrupted_run(tiny_checkpoint, two_clips, tmp_path):
    common = ["trainer.max_steps=4", "trainer.save_every=100", "trainer.gradient_accumulation_steps=2",
              "objective.expert_switch_every=3"]  # fmt: skip
    whole = run(compose_train(tiny_overrides(tiny_checkpoint, two_clips, tmp_path / "whole", *common)))
    assert whole.step == 4
    rows = read_metrics(tmp_path / "whole")
    assert [r["experts"] for r in rows] == [[HIGH, HIGH]] * 3 + [[LOW, LOW]]
    split = tiny_overrides(tiny_checkpoint, two_clips, tmp_path / "split", *common)
    reset_accelerate()
    first = run(compose_train([*split, "trainer.max_steps_per_run=2"]))  # stops inside the first phase
    state = ckpt_io.read_trainer_state(first.last_checkpoint)
    assert state["expert_schedule"] == {
        "expert": "alternate", "expert_switch_every": 3, "phase": 0, "phase_expert": HIGH,
    }  # fmt: skip
    reset_accelerate()
    assert run(compose_train(split)).step == 4
    resumed = read_metrics(tmp_path / "split")
    assert [r["experts"] for r in resumed] == [r["experts"] for r in rows]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in rows]
    assert [r["grad_norm"] for r in resumed] == [r["grad_norm"] for r in rows]

    reset_accelerate()
    with pytest.raises(ckpt_io.ResumeError) as e:  # another schedule: refused before any model loads
        run(compose_train([*split, "trainer.max_steps=6", "objective.expert_switch_every=2"]))
    message = str(e.value)
    assert "\n" not in message and "its expert schedule differs" in message
    assert "objective.expert_switch_every: checkpoint has 3, this run has 2" in message
    assert "expert of the phase: checkpoint has 'video_dit_2', this run has 'video_dit'" in message


def tiny_lora_model():
    model = build_mova(get_model_config("tiny"), device="cpu", seed=0)
    apply_lora(
        model, LoraConfig(rank=4, alpha=4.0, targets={c: ["self_attn"] for c in (*EXPERTS, "audio_dit")})
    )
    return model


def frozen(model, component):
    return [p for p in getattr(model, component).parameters() if not p.requires_grad]


def test_only_the_active_experts_frozen_weights_go_to_the_accelerator():
    model = tiny_lora_model()
    before = {e: [p.detach().clone() for p in frozen(model, e)] for e in EXPERTS}
    residency = ExpertResidency(
        model, "meta"
    )  # `meta` stands for the accelerator: devices are real, data not
    residency.place()
    assert {p.device.type for p in model.parameters() if p.requires_grad} == {"meta"}  # every LoRA parameter
    assert {
        p.device.type for c in ("audio_dit", "dual_tower_bridge") for p in getattr(model, c).parameters()
    } == {"meta"}
    assert {p.device.type for e in EXPERTS for p in frozen(model, e)} == {"cpu"}
    ignored = set(model._ddp_params_and_buffers_to_ignore)
    assert ignored == {
        n for n, p in model.named_parameters() if n.startswith(EXPERTS) and not p.requires_grad
    }
    for active, idle in ((HIGH, LOW), (LOW, HIGH), (HIGH, LOW)):
        residency.activate(active)
        assert {p.device.type for p in frozen(model, active)} == {"meta"}
        assert {p.device.type for p in frozen(model, idle)} == {"cpu"}
        assert residency.device_bytes()[idle] == 0
        assert residency.device_bytes()[active] == sum(
            p.numel() * p.element_size() for p in frozen(model, active)
        )
        assert all(torch.equal(p, q) for p, q in zip(frozen(model, idle), before[idle]))  # host copy intact
    assert residency.swaps == 3


def test_residency_with_real_tensors_copies_in_the_active_expert_and_keeps_outputs():
    reference, model = tiny_lora_model(), tiny_lora_model()
    residency = ExpertResidency(model, "cpu")  # the device-generic path with real copies (host = device here)
    residency.place()
    residency.install()
    g = torch.Generator().manual_seed(1)
    c = model.config
    inputs = dict(
        video_latents=torch.randn(1, 16, 2, 4, 4, generator=g), video_cond=torch.randn(1, 20, 2, 4, 4, generator=g),
        audio_latents=torch.randn(1, c.audio_latent_dim, 6, generator=g), text=torch.randn(1, 7, c.text_dim, generator=g),
        timestep_video=torch.tensor([950.0]),
    )  # fmt: skip
    for expert in (HIGH, LOW, HIGH):
        with torch.no_grad():
            got = model(**inputs, expert=expert)  # the forward's hook activates the expert it names
            want = reference(**inputs, expert=expert)
        assert residency.active == expert
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        idle = LOW if expert == HIGH else HIGH
        host = residency.host
        assert all(
            p.data_ptr() == host[id(p)].data_ptr() for p in frozen(model, idle)
        )  # points at its host copy
        assert all(p.data_ptr() != host[id(p)].data_ptr() for p in frozen(model, expert))  # a copy was made
    assert residency.swaps == 3
    # where it does not apply: one expert, both asked resident, ZeRO-3 (DeepSpeed's partitions), a CPU device
    assert (
        build_residency(model, torch.device("meta"), ObjectiveConfig(expert=f"only:{LOW}"), zero_stage=0)
        is None
    )
    assert (
        build_residency(model, torch.device("meta"), ObjectiveConfig(idle_expert="device"), zero_stage=0)
        is None
    )
    assert build_residency(model, torch.device("meta"), ObjectiveConfig(), zero_stage=3) is None
    assert build_residency(model, torch.device("cpu"), ObjectiveConfig(), zero_stage=0) is None


def test_a_micro_step_never_runs_the_idle_experts_modules(tiny_checkpoint, two_clips, tmp_path):
    """What keeps ZeRO-3 from gathering the idle expert: none of its modules runs, forward or backward (ZeRO-3
    gathers in module hooks; its trace prefetch is reset at a switch, see upstream.forget_zero3_module_trace)."""
    cfg = compose_train(tiny_overrides(
        tiny_checkpoint, two_clips, tmp_path, "trainer.max_steps=3", "trainer.save_every=100",
        "objective.expert_switch_every=2",
    ))  # fmt: skip
    trainer = Trainer(validate_config(to_train_config(cfg)))
    trainer.setup()
    calls = dict.fromkeys(EXPERTS, 0)

    def count(expert):
        def hook(*_):
            calls[expert] += 1

        return hook

    for e in EXPERTS:
        for m in getattr(trainer.model, e).modules():
            m.register_forward_pre_hook(count(e))
            m.register_full_backward_pre_hook(count(e))
    seen = []
    for _ in range(3):
        before = dict(calls)
        row = trainer.train_step()
        seen.append(row["expert"])
        idle = LOW if row["expert"] == HIGH else HIGH
        assert calls[idle] == before[idle], f"the idle expert {idle} ran in step {row['step']}"
        assert calls[row["expert"]] > before[row["expert"]]
    trainer.finish()
    assert seen == [HIGH, HIGH, LOW]
