"""`python -m mova_train.cli.export`: every format reproduces the trained model, with the project's own loader and as
each tool's loader applies it (official MOVA, DiffSynth, ComfyUI, PEFT); no file's keys land on another component;
determinism; errors."""

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
    LoraError,
    apply_adapters,
    apply_lora,
    base_identity,
    lora_state_dict,
    merge_lora,
    randomize_lora,
    save_adapters,
)
from mova_train.lora.export import ExportError, export_adapter
from mova_train.lora.formats import read_any_adapter
from mova_train.models.checkpoint import load_mova

ROOT = Path(__file__).resolve().parents[1]
RANK, ALPHA = 4, 8.0
CFG = LoraConfig(
    rank=RANK,
    alpha=ALPHA,
    targets={
        "video_dit": ["self_attn"],
        "video_dit_2": ["text_cross_attn", "self_attn"],
        "audio_dit": ["self_attn"],
        "dual_tower_bridge": ["bridge_a2v", "bridge_v2a"],
    },
)
# The Linear layers each component's presets must hit, from the spec's key names (ARCHITECTURE.md §3.1, §5.2).
EXPECTED = {
    "video_dit": r"blocks\.\d+\.self_attn\.[qkvo]",
    "video_dit_2": r"blocks\.\d+\.(cross_attn|self_attn)\.[qkvo]",
    "audio_dit": r"blocks\.\d+\.self_attn\.[qkvo]",
    "dual_tower_bridge": r"(audio_to_video|video_to_audio)_conditioners\.\d+\.inner\.[qkvo]",
}
FORMATS = ("peft", "mova", "mova-official", "diffsynth", "comfyui", "merged")
ADAPTER_FORMATS = FORMATS[:-1]


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


def write_run(run_dir: Path, model, identity: str, *, step: int, base: Path) -> Path:
    config = f"name: export_test\nmodel:\n  checkpoint: {base.resolve()}\nlora: {{}}\n"
    meta = {"step": str(step), "base_identity": identity, "training_config": config}
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
    write_run(
        run_dir, model, identity, step=3, base=tiny_checkpoint
    )  # an older checkpoint: must not be picked
    randomize_lora(model, seed=2)
    write_run(run_dir, model, identity, step=7, base=tiny_checkpoint)
    (run_dir / "checkpoints" / ".tmp-step-00000009").mkdir()  # in progress: ignored
    # the run records its base by absolute path: merged finds it there, and no exported file carries the path
    (run_dir / "config.yaml").write_text(
        f"name: export_test\nmodel:\n  checkpoint: {tiny_checkpoint.resolve()}\n"
    )
    exports = {fmt: tmp / "out" / fmt for fmt in FORMATS}
    for fmt, out in exports.items():
        export_adapter(run_dir, out, fmt)
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


def _merged_reference(setup):
    """The trained model with its adapters merged in (W + alpha/rank * B@A), per component parameter dict."""
    reference = load_mova(setup["ckpt"])
    apply_adapters(reference, setup["exports"]["mova"])
    merge_lora(reference)
    return {c: dict(getattr(reference, c).named_parameters()) for c in CFG.targets}


def _base_params(setup, component):
    return dict(getattr(load_mova(setup["ckpt"], components=(component,)), component).named_parameters())


def test_comfyui_export_applies_like_comfyui(setup):
    from safetensors.torch import load_file

    folder = setup["exports"]["comfyui"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{c}.safetensors" for c in CFG.targets)
    # ComfyUI: W + strength * (alpha / rank) * up @ down, with up = lora_B, down = lora_A, keyed by module path.
    merged = _merged_reference(setup)
    for component in CFG.targets:
        tensors = load_file(str(folder / f"{component}.safetensors"))
        prefix = "diffusion_model." if component.startswith("video_dit") else f"{component}."
        assert all(k.startswith(prefix) for k in tensors), component
        base = _base_params(setup, component)
        modules = {k[len(prefix) : -len(".alpha")] for k in tensors if k.endswith(".alpha")}
        assert len(tensors) == 3 * len(modules)
        for path in modules:
            down = tensors[f"{prefix}{path}.lora_A.weight"]
            up = tensors[f"{prefix}{path}.lora_B.weight"]
            alpha = tensors[f"{prefix}{path}.alpha"].item()
            w = base[f"{path}.weight"] + (alpha / down.shape[0]) * (up @ down)
            torch.testing.assert_close(w, merged[component][f"{path}.weight"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fmt", ADAPTER_FORMATS)
def test_every_format_reloads_with_our_loader_to_identical_outputs(setup, fmt):
    """rank 4 / alpha 8: a loader that dropped alpha, or applied it twice, would give other outputs."""
    adapter = read_any_adapter(setup["exports"][fmt])
    model = load_mova(setup["ckpt"])
    apply_adapters(
        model, (adapter.state, adapter.cfg, adapter.metadata), expected_base_identity=setup["identity"]
    )
    assert all(torch.equal(a, b) for a, b in zip(outputs(model), setup["trained_out"])), fmt
    assert adapter.metadata["step"] == "7"


def test_mova_official_export_is_what_the_official_loader_reads(setup):
    folder = setup["exports"]["mova-official"]
    weights = torch.load(folder / "lora_weights.pt", map_location="cpu", weights_only=True)
    config = torch.load(folder / "lora_config.pt", map_location="cpu", weights_only=True)
    mova = read_any_adapter(setup["exports"]["mova"]).state
    # exactly our canonical keys (what MOVALoRA's load_lora_weights matches on its modules), the same tensors
    assert sorted(weights) == sorted(mova)
    assert all(torch.equal(weights[k], mova[k]) for k in mova)
    assert config == {"rank": RANK, "alpha": ALPHA, "target_modules": sorted(CFG.targets)}
    assert type(config["rank"]) is int and type(config["alpha"]) is float
    # the official LoRALinear: W x + (alpha / rank) * B A x  ==  our merge
    merged = _merged_reference(setup)
    for key in (k for k in weights if k.endswith(".lora_A.weight")):
        component, path = key[: -len(".lora_A.weight")].split(".", 1)
        b = weights[key.replace("lora_A", "lora_B")]
        w = _base_params(setup, component)[f"{path}.weight"] + config["alpha"] / config["rank"] * (
            b @ weights[key]
        )
        torch.testing.assert_close(w, merged[component][f"{path}.weight"], rtol=1e-5, atol=1e-6)


def test_mova_official_refuses_what_the_official_loader_would_drop(setup, tmp_path, tiny_checkpoint):
    ffn_cfg = LoraConfig(rank=2, alpha=4.0, targets={"audio_dit": ["self_attn", "ffn"]})
    model = load_mova(tiny_checkpoint, components=("audio_dit",))
    apply_lora(model, ffn_cfg)
    save_adapters(tmp_path / "ffn", model, ffn_cfg, metadata={"step": "1"})
    with pytest.raises(
        ExportError, match=r"wraps only layers named q, k, v, o.*audio_dit\.blocks\.0\.ffn\.0"
    ):
        export_adapter(tmp_path / "ffn", tmp_path / "o", "mova-official")
    assert not (tmp_path / "o").exists()
    # a lora_weights.pt changed after export is refused, never unpickled
    copy = tmp_path / "official"
    import shutil

    shutil.copytree(setup["exports"]["mova-official"], copy)
    (copy / "lora_weights.pt").write_bytes((copy / "lora_weights.pt").read_bytes() + b"x")
    with pytest.raises(LoraError, match="is not the file exported with"):
        read_any_adapter(copy)
    with pytest.raises(LoraError, match="never unpickles"):
        read_any_adapter(copy / "lora_weights.pt")
    (copy / "adapters.safetensors").unlink()  # the official loader's files alone: refused, not unpickled
    with pytest.raises(LoraError, match="never unpickles a .pt file"):
        read_any_adapter(copy)


def test_diffsynth_export_applies_like_diffsynth(setup):
    """DiffSynth's GeneralLoRALoader: module name = key without `.lora_B.weight`, matched against the pipeline's
    named_modules (`video_dit`, `video_dit2`, `audio_dit`, `dual_tower_bridge`); W += 1.0 * up @ down (no alpha)."""
    from safetensors.torch import load_file

    tensors = load_file(str(setup["exports"]["diffsynth"] / "diffsynth_lora.safetensors"))
    assert not any(k.endswith(".alpha") for k in tensors)
    names = {"video_dit": "video_dit", "video_dit2": "video_dit_2", "audio_dit": "audio_dit"}
    names["dual_tower_bridge"] = "dual_tower_bridge"
    merged = _merged_reference(setup)
    seen = set()
    for key in (k for k in tensors if k.endswith(".lora_B.weight")):
        name = key[: -len(".lora_B.weight")]
        attr, path = name.split(".", 1)
        component = names[attr]
        up, down = tensors[key], tensors[f"{name}.lora_A.weight"]
        w = _base_params(setup, component)[f"{path}.weight"] + 1.0 * (up @ down)
        torch.testing.assert_close(w, merged[component][f"{path}.weight"], rtol=1e-5, atol=1e-6)
        seen.add(component)
    assert seen == set(CFG.targets)
    assert any(k.startswith("video_dit2.") for k in tensors) and not any(
        k.startswith("video_dit_2.") for k in tensors
    )


def _wan_loader_target(key: str) -> str | None:
    """The module path a Wan 2.1 LoRA loader applies `key` to (ComfyUI's key map, diffusers' Wan converter,
    DiffSynth's loader on one DiT): `diffusion_model.` / `transformer.` prefixes or bare block paths."""
    stem = re.sub(r"\.(lora_[AB](\.default)?\.weight|lora_(up|down)\.weight|alpha)$", "", key)
    for prefix in ("diffusion_model.", "transformer.", "model.diffusion_model.", ""):
        if stem.startswith(prefix) and stem[len(prefix) :].startswith("blocks."):
            return stem[len(prefix) :]
    return None


def test_no_file_has_keys_another_components_loader_would_apply(setup):
    """Per file of every format: a Wan loader handed the file applies keys only from a video expert's own file,
    and a pipeline-level loader (official, DiffSynth) maps each key to the component it was trained for."""
    from safetensors import safe_open

    video_paths = {k[: -len(".weight")] for k in _base_params(setup, "video_dit")}
    audio_paths = {k[: -len(".weight")] for k in _base_params(setup, "audio_dit")}
    assert video_paths & audio_paths  # the towers share block paths: a bare prefix would land audio on video
    checked = 0
    for fmt in ADAPTER_FORMATS:
        for file in sorted(setup["exports"][fmt].rglob("*.safetensors")):
            with safe_open(str(file), framework="pt") as f:
                keys = list(f.keys())  # noqa: SIM118
                component = (f.metadata() or {}).get("component")
            hits = {k for k in keys if _wan_loader_target(k) in video_paths}
            if fmt == "comfyui" and component in ("video_dit", "video_dit_2"):
                assert hits == set(keys), file  # the whole expert file loads as a Wan LoRA
            else:
                assert not hits, (file, sorted(hits)[:3])
            checked += 1
    assert checked >= 8


def test_peft_config_parses_in_the_oldest_peft_allowed(setup):
    """pyproject allows peft >= 0.13. PEFT 0.13.0's LoraConfig fields (read from that release's dataclass) must
    cover every field we write, and today's PEFT must read them as the config we train with."""
    from peft import LoraConfig as PeftLoraConfig

    from mova_train.lora.inject import build_peft_config

    peft_013_fields = {
        "alpha_pattern", "auto_mapping", "base_model_name_or_path", "bias", "fan_in_fan_out", "inference_mode",
        "init_lora_weights", "layer_replication", "layers_pattern", "layers_to_transform", "loftq_config",
        "lora_alpha", "lora_dropout", "megatron_config", "megatron_core", "modules_to_save", "peft_type", "r",
        "rank_pattern", "revision", "runtime_config", "target_modules", "task_type", "use_dora", "use_rslora",
    }  # fmt: skip
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"peft>=0.13,' in pyproject  # the floor these fields were read from
    for folder in sorted(setup["exports"]["peft"].iterdir()):
        written = json.loads((folder / "adapter_config.json").read_text())
        assert set(written) <= peft_013_fields, set(written) - peft_013_fields
        fields = {k: v for k, v in written.items() if k != "peft_type"}
        ours = build_peft_config(CFG, written["target_modules"])
        ours.inference_mode = True
        assert PeftLoraConfig(**fields).to_dict() == ours.to_dict()


def test_exported_metadata_names_the_base_without_local_paths(setup):
    base = str(setup["ckpt"].resolve())
    for file in (p for p in setup["tmp"].joinpath("out").rglob("*") if p.is_file() and p.suffix != ".pt"):
        if file.parent.name in ("text_encoder", "video_vae", "audio_vae", "tokenizer", "scheduler"):
            continue  # byte copies of the base
        data = file.read_bytes()
        assert base.encode() not in data, file
    text = json.loads((setup["exports"]["mova"] / "adapter_config.json").read_text())["metadata"]
    assert f"checkpoint: {setup['ckpt'].name}" in text["training_config"]


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
    """Bit for bit in the weights. (Outputs are compared with a tolerance: the tensors of a loaded checkpoint are
    views of the mmapped file, and CPU kernels round differently by ~5e-7 at another alignment of the data, which
    the longer or shorter metadata of the merged files shifts.)"""
    export_adapter(setup["run_dir"], tmp_path / "m0", "merged", checkpoint=setup["ckpt"], scale=0.0)
    merged, base = load_mova(tmp_path / "m0").state_dict(), load_mova(setup["ckpt"]).state_dict()
    assert merged.keys() == base.keys()
    assert all(torch.equal(merged[k], base[k]) for k in base)
    for a, b in zip(outputs(load_mova(tmp_path / "m0")), setup["base_out"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_exporting_twice_is_byte_identical(setup):
    again = setup["tmp"] / "again"
    code = (
        "import sys; from mova_train.lora.export import export_adapter\n"
        f"for fmt in {FORMATS!r}:\n"
        "    export_adapter(sys.argv[1], sys.argv[2] + '/' + fmt, fmt)\n"
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
    with pytest.raises(ExportError, match="needs the base checkpoint"):
        export_adapter(setup["exports"]["mova"], tmp_path / "o", "merged")  # an adapter outside any run
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


def test_the_sampler_reads_every_export(setup, tmp_path):
    """`sample --lora` takes every folder (and single file) the exporter writes; merging any of them gives the same
    weights bit for bit; a merged export is a checkpoint and is refused with the option to use instead."""
    from mova_train.names import COMPONENTS
    from mova_train.sampling.inputs import SamplingError
    from mova_train.sampling.pipeline import load_adapter, merge_adapters

    exports = setup["exports"]
    sources = [exports[fmt] for fmt in ADAPTER_FORMATS] + [
        exports["diffsynth"] / "diffsynth_lora.safetensors",
        exports["comfyui"] / "audio_dit.safetensors",
        exports["peft"] / "video_dit_2",
    ]
    reference = None
    for source in sources:
        adapter = load_adapter(f"{source}:1.0", base_identity=setup["identity"])
        model = load_mova(setup["ckpt"])
        merge_adapters(model, [adapter], COMPONENTS)
        state = model.state_dict()
        if reference is None:
            reference = state
            for a, b in zip(outputs(model), setup["trained_out"]):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
            continue
        changed = {k for k in state if not torch.equal(state[k], setup_base_state(setup)[k])}
        assert changed, source
        assert all(torch.equal(state[k], reference[k]) for k in changed), source
    with pytest.raises(SamplingError, match="not an adapter: pass it as --checkpoint"):
        load_adapter(str(exports["merged"]))


_BASE_STATE: dict = {}


def setup_base_state(setup):
    if not _BASE_STATE:
        _BASE_STATE.update(load_mova(setup["ckpt"]).state_dict())
    return _BASE_STATE
