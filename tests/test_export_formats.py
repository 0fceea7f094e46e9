"""`python -m mova_train.cli.export`: peft / mova / comfyui / merged reproduce the trained model; determinism; errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from mova_train.checkpoint_io import read_component_header
from mova_train.cli.export import main as export_main
from mova_train.lora import (
    LoraConfig,
    apply_adapters,
    apply_lora,
    base_identity,
    lora_state_dict,
    merge_lora,
    randomize_lora,
    save_adapters,
)
from mova_train.lora.export import ExportError, export_adapter
from mova_train.models.checkpoint import load_mova

ROOT = Path(__file__).resolve().parents[1]
RANK, ALPHA = 4, 8.0
CFG = LoraConfig(
    rank=RANK,
    alpha=ALPHA,
    targets={
        "video_dit": ["self_attn"],
        "video_dit_2": ["text_cross_attn", "ffn"],
        "audio_dit": ["self_attn"],
        "dual_tower_bridge": ["bridge_a2v", "bridge_v2a"],
    },
)
# The Linear layers each component's presets must hit, from the spec's key names (ARCHITECTURE.md §3.1, §5.2).
EXPECTED = {
    "video_dit": r"blocks\.\d+\.self_attn\.[qkvo]",
    "video_dit_2": r"blocks\.\d+\.(cross_attn\.[qkvo]|ffn\.[02])",
    "audio_dit": r"blocks\.\d+\.self_attn\.[qkvo]",
    "dual_tower_bridge": r"(audio_to_video|video_to_audio)_conditioners\.\d+\.inner\.[qkvo]",
}
FORMATS = ("peft", "mova", "comfyui", "merged")


def inputs_for(model, expert, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = model.config
    return dict(
        video_latents=torch.randn(1, 16, 2, 4, 4, generator=g),  # [B, 16, T, h, w]
        video_cond=torch.randn(1, 20, 2, 4, 4, generator=g),
        audio_latents=torch.randn(1, c.audio_latent_dim, 6, generator=g),  # [B, Ca, L]
        text=torch.randn(1, 7, c.text_dim, generator=g),  # [B, N, Dt]
        timestep_video=torch.tensor([950.0 if expert == "video_dit" else 300.0]),
        expert=expert,
    )


def outputs(model):
    with torch.no_grad():
        return [t for expert in ("video_dit", "video_dit_2") for t in model(**inputs_for(model, expert))]


def write_run(run_dir: Path, model, identity: str, *, step: int) -> Path:
    meta = {"step": str(step), "base_identity": identity, "training_config": "name: export_test\nlora: {}\n"}
    ckpt = run_dir / "checkpoints" / f"step-{step:08d}"
    save_adapters(ckpt / "adapter", model, CFG, metadata=meta)
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": step}))
    return ckpt


@pytest.fixture(scope="module")
def setup(tiny_checkpoint, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    identity = base_identity(tiny_checkpoint)
    model = load_mova(tiny_checkpoint)
    base_out = outputs(model)
    apply_lora(model, CFG)
    run_dir = tmp / "run"
    randomize_lora(model, seed=1)
    write_run(run_dir, model, identity, step=3)  # an older checkpoint: must not be picked
    randomize_lora(model, seed=2)
    write_run(run_dir, model, identity, step=7)
    (run_dir / "checkpoints" / ".tmp-step-00000009").mkdir()  # in progress: ignored
    (run_dir / "config.yaml").write_text("name: export_test\n")
    exports = {fmt: tmp / "out" / fmt for fmt in FORMATS}
    for fmt, out in exports.items():
        export_adapter(run_dir, out, fmt, checkpoint=tiny_checkpoint if fmt == "merged" else None)
    return dict(
        ckpt=tiny_checkpoint,
        identity=identity,
        run_dir=run_dir,
        base_out=base_out,
        trained_out=outputs(model),
        state=lora_state_dict(model),
        exports=exports,
        tmp=tmp,
    )


def test_trained_model_differs_from_base(setup):
    assert all(not torch.equal(a, b) for a, b in zip(setup["base_out"], setup["trained_out"]))


def test_mova_export_reloads_bit_exactly(setup):
    model = load_mova(setup["ckpt"])
    apply_adapters(model, setup["exports"]["mova"], expected_base_identity=setup["identity"])
    assert all(torch.equal(a, b) for a, b in zip(outputs(model), setup["trained_out"]))


def test_mova_keys_are_exactly_the_targeted_linears(setup):
    file = setup["exports"]["mova"] / "adapters.safetensors"
    with safe_open(str(file), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
        metadata = f.metadata()
    expected = {}
    for component, pattern in EXPECTED.items():
        header = read_component_header(setup["ckpt"] / component, weights_name="diffusion_pytorch_model")
        for key, (shape, _dtype) in header.items():
            m = re.fullmatch(rf"({pattern})\.weight", key)
            if m:
                out_features, in_features = shape
                expected[f"{component}.{m.group(1)}.lora_A.weight"] = (RANK, in_features)
                expected[f"{component}.{m.group(1)}.lora_B.weight"] = (out_features, RANK)
    assert shapes == expected
    assert metadata["rank"] == str(RANK) and float(metadata["alpha"]) == ALPHA
    assert set(json.loads(metadata["targets"])) == set(EXPECTED)
    assert metadata["step"] == "7" and metadata["base_identity"] == setup["identity"]
    assert "export_test" in metadata["training_config"]


def test_peft_export_loads_with_peft_bit_exactly(setup):
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    folder = setup["exports"]["peft"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(CFG.targets)
    model = load_mova(setup["ckpt"])
    for component in CFG.targets:  # PEFT's own loader on each component module
        PeftModel.from_pretrained(getattr(model, component), folder / component)
    assert all(torch.equal(a, b) for a, b in zip(outputs(model), setup["trained_out"]))

    model = load_mova(setup["ckpt"])
    for component in CFG.targets:  # the diffusers-style path: inject from the config, then set the state
        config = json.loads((folder / component / "adapter_config.json").read_text())
        peft_config = PeftLoraConfig(
            **{k: v for k, v in config.items() if k not in ("peft_type", "peft_version")}
        )
        module = inject_adapter_in_model(peft_config, getattr(model, component))
        result = set_peft_model_state_dict(
            module, load_file(str(folder / component / "adapter_model.safetensors"))
        )
        assert not result.unexpected_keys
    assert all(torch.equal(a, b) for a, b in zip(outputs(model), setup["trained_out"]))


def test_comfyui_export_applies_like_comfyui(setup):
    folder = setup["exports"]["comfyui"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{c}.safetensors" for c in CFG.targets)
    # ComfyUI: W + strength * (alpha / rank) * up @ down, with up = lora_B, down = lora_A, keyed by module path.
    reference = load_mova(setup["ckpt"])
    apply_adapters(reference, setup["exports"]["mova"])
    merge_lora(reference)
    for component in CFG.targets:
        from safetensors.torch import load_file

        tensors = load_file(str(folder / f"{component}.safetensors"))
        base = dict(getattr(load_mova(setup["ckpt"], components=(component,)), component).named_parameters())
        merged = dict(getattr(reference, component).named_parameters())
        modules = {k[len("diffusion_model.") : -len(".alpha")] for k in tensors if k.endswith(".alpha")}
        assert all(k.startswith("diffusion_model.") for k in tensors)
        assert len(tensors) == 3 * len(modules)
        for path in modules:
            down = tensors[f"diffusion_model.{path}.lora_A.weight"]
            up = tensors[f"diffusion_model.{path}.lora_B.weight"]
            alpha = tensors[f"diffusion_model.{path}.alpha"].item()
            w = base[f"{path}.weight"] + (alpha / down.shape[0]) * (up @ down)
            torch.testing.assert_close(w, merged[f"{path}.weight"], rtol=1e-5, atol=1e-6)


def test_merged_export_reproduces_outputs_in_the_released_layout(setup):
    out, ckpt = setup["exports"]["merged"], setup["ckpt"]
    model = load_mova(out)
    for a, b in zip(outputs(model), setup["trained_out"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    base_files = sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file())
    out_files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert out_files == sorted(base_files + ["mova_train_export.json"])
    for component in CFG.targets:
        base_header = read_component_header(ckpt / component, weights_name="diffusion_pytorch_model")
        assert read_component_header(out / component, weights_name="diffusion_pytorch_model") == base_header
        for file in (out / component).glob("*.safetensors"):
            with safe_open(str(file), framework="pt") as f:
                assert f.metadata()["step"] == "7" and f.metadata()["base_identity"] == setup["identity"]
    for name in ("text_encoder", "video_vae", "audio_vae", "model_index.json"):  # untouched: byte copies
        for src in [ckpt / name] if (ckpt / name).is_file() else (ckpt / name).rglob("*.*"):
            assert (out / src.relative_to(ckpt)).read_bytes() == src.read_bytes()


def test_scale_zero_merge_reproduces_the_base(setup, tmp_path):
    export_adapter(setup["run_dir"], tmp_path / "m0", "merged", checkpoint=setup["ckpt"], scale=0.0)
    model = load_mova(tmp_path / "m0")
    assert all(torch.equal(a, b) for a, b in zip(outputs(model), setup["base_out"]))


def test_exporting_twice_is_byte_identical(setup):
    again = setup["tmp"] / "again"
    code = (
        "import sys; from mova_train.lora.export import export_adapter\n"
        "for fmt in ('peft', 'mova', 'comfyui', 'merged'):\n"
        "    export_adapter(sys.argv[1], sys.argv[2] + '/' + fmt, fmt,"
        " checkpoint=sys.argv[3] if fmt == 'merged' else None)\n"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345", OMP_NUM_THREADS="1")
    subprocess.run(
        [sys.executable, "-c", code, str(setup["run_dir"]), str(again), str(setup["ckpt"])],
        check=True,
        cwd=ROOT,
        env=env,
        capture_output=True,
    )
    first = setup["tmp"] / "out"
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in files:
        assert (first / rel).read_bytes() == (again / rel).read_bytes(), rel


def test_source_resolution(setup, tmp_path):
    ckpt7 = setup["run_dir"] / "checkpoints" / "step-00000007"
    for source in (ckpt7, ckpt7 / "adapter", ckpt7 / "adapter" / "adapters.safetensors"):
        export_adapter(source, tmp_path / "x", "mova")
        assert (tmp_path / "x" / "adapters.safetensors").read_bytes() == (
            setup["exports"]["mova"] / "adapters.safetensors"
        ).read_bytes()


def test_bad_input_gives_clear_errors(setup, tmp_path, tiny_checkpoint):
    run_dir = setup["run_dir"]
    with pytest.raises(ExportError, match="unknown export format 'onnx'"):
        export_adapter(run_dir, tmp_path / "o", "onnx")
    with pytest.raises(ExportError, match="needs --checkpoint"):
        export_adapter(run_dir, tmp_path / "o", "merged")
    with pytest.raises(ExportError, match="does not exist"):
        export_adapter(tmp_path / "nope", tmp_path / "o", "mova")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="holds no adapter"):
        export_adapter(tmp_path / "empty", tmp_path / "o", "mova")
    (tmp_path / "emptyrun" / "checkpoints").mkdir(parents=True)
    with pytest.raises(ExportError, match="no complete checkpoint"):
        export_adapter(tmp_path / "emptyrun", tmp_path / "o", "mova")
    with pytest.raises(ExportError, match="--scale only applies"):
        export_adapter(run_dir, tmp_path / "o", "peft", scale=0.5)

    # another base: same architecture, different weights -> identity mismatch
    import shutil

    from safetensors.torch import load_file, save_file

    other = tmp_path / "other_base"
    shutil.copytree(tiny_checkpoint, other)
    weights = other / "audio_dit" / "diffusion_pytorch_model.safetensors"
    tensors = {k: v + 0.5 for k, v in load_file(str(weights)).items()}
    save_file(tensors, str(weights), metadata={"format": "pt"})
    with pytest.raises(ExportError, match="trained on another base checkpoint"):
        export_adapter(run_dir, tmp_path / "o", "merged", checkpoint=other)
    export_adapter(run_dir, tmp_path / "forced", "merged", checkpoint=other, allow_base_mismatch=True)

    # DoRA cannot be expressed in ComfyUI's format
    dora_cfg = LoraConfig(rank=2, alpha=2.0, use_dora=True, targets={"audio_dit": ["ffn"]})
    model = load_mova(tiny_checkpoint, components=("audio_dit",))
    apply_lora(model, dora_cfg)
    save_adapters(tmp_path / "dora", model, dora_cfg, metadata={"step": "1"})
    with pytest.raises(ExportError, match="DoRA"):
        export_adapter(tmp_path / "dora", tmp_path / "o", "comfyui")


def test_cli_exit_codes(setup, tmp_path, capsys):
    assert export_main([str(setup["run_dir"]), "--out", str(tmp_path / "o"), "--format", "onnx"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown export format 'onnx'") and "\n" not in err
    assert export_main([str(setup["run_dir"]), "--out", str(tmp_path / "o"), "--format", "mova"]) == 0
    assert (tmp_path / "o" / "adapters.safetensors").is_file()
