"""`make demo`: the whole job end to end on CPU with the tiny model and the bundled synthetic clips.

Every stage runs as the command a user would type (printed before it runs), so the demo doubles as a walkthrough:
synthesize clips → tiny checkpoint → `data_tools prepare` → 2-process DeepSpeed training → export → sample.
Rerunning reuses finished stages (the checkpoint, the shards) and resumes or restarts the run as the trainer does.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from mova_train.media import read_mp4
from mova_train.names import EXPERTS, MODEL_INDEX_NAME
from mova_train.run_layout import list_checkpoints
from mova_train.upstream import quiet_launcher_env

DEMO_PROMPT = "a red square bounces across the screen, a click on every bounce"
REPO = Path(__file__).resolve().parents[2]  # mova_train/cli/demo.py -> the repository root
TIMINGS_NAME = (
    "timings.json"  # seconds per stage of the last demo run (`python -m mova_train.bench cli` prints it)
)


def _run(cmd: list[str], *, env: dict | None = None) -> float:
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=REPO, env=env)
    if result.returncode != 0:
        raise SystemExit(f"demo: step failed with exit code {result.returncode}: {shlex.join(cmd)}")
    return time.perf_counter() - start


def plot_losses(metrics: Path, out: Path) -> Path:
    """Loss curve (total, video, audio per optimizer step, coloured by expert) from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "loss" in r and r.get("loss") is not None]
    if not rows:
        raise SystemExit(f"demo: {metrics} has no loss rows")
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r["loss"] for r in rows], color="black", label="loss", linewidth=1.5)
    for key, colour in (("loss_video", "tab:blue"), ("loss_audio", "tab:orange")):
        if all(key in r for r in rows):
            ax.plot(steps, [r[key] for r in rows], color=colour, label=key, linewidth=1, alpha=0.8)
    for expert, marker in zip(EXPERTS, ("^", "v")):
        pts = [(r["step"], r["loss"]) for r in rows if r.get("expert") == expert]
        if pts:
            ax.scatter(*zip(*pts), marker=marker, s=18, label=f"step on {expert}", zorder=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("flow-matching MSE")
    ax.set_title("tiny_demo training loss")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mova_train.cli.demo", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="where everything is written")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps of the demo run")
    parser.add_argument(
        "--processes", type=int, default=2, help="training processes (DeepSpeed ZeRO-2 over gloo)"
    )
    parser.add_argument("--clips", type=int, default=4, help="synthetic clips to generate")
    args = parser.parse_args(argv)

    out = args.out.resolve()
    py = sys.executable
    # quiet_launcher_env: OMP_NUM_THREADS=1 and DS_ACCELERATOR=cpu, what the launcher would pick, minus its banners
    env = {**quiet_launcher_env(), "TOKENIZERS_PARALLELISM": "false", "WANDB_SILENT": "true"}
    raw, ckpt, shards, run_dir = out / "raw", out / "checkpoint", out / "shards", out / "run"
    adapters, renders = out / "adapters", out / "renders"
    timings: dict[str, float] = {}

    if not (raw / "captions.jsonl").exists():
        timings["synth"] = _run(
            [py, "-m", "data_tools", "synth", str(raw), "--clips", str(args.clips)], env=env
        )
    if not (ckpt / MODEL_INDEX_NAME).exists():
        timings["make_tiny"] = _run([py, "-m", "mova_train.cli.make_tiny", str(ckpt)], env=env)
    timings["prepare"] = _run(
        [
            py, "-m", "data_tools", "prepare", str(raw),
            "--checkpoint", str(ckpt), "--out", str(shards),
            "--frames", "17", "--buckets", "64x112,112x64,64x64", "--stride", "12", "--shard-size-mb", "0.5",
            "--export-clips", str(out / "clips"),
        ],
        env=env,
    )  # fmt: skip
    timings["verify"] = _run([py, "-m", "data_tools", "verify", str(shards)], env=env)
    rerun_note = already_trained(run_dir, args.steps)
    if rerun_note:
        print(f"\ndemo: {rerun_note}", flush=True)
    timings["train"] = _run(
        [
            py, "-m", "accelerate.commands.launch",
            "--config_file", str(REPO / "launch/accelerate/cpu_zero2.yaml"),
            "--num_processes", str(args.processes),
            "train.py", "+experiment=tiny_demo",
            f"model.checkpoint={ckpt}", f"data.shards={shards}", f"trainer.run_dir={run_dir}",
            f"trainer.max_steps={args.steps}", "deepspeed=zero2",
        ],
        env=env,
    )  # fmt: skip
    for fmt in ("mova", "peft"):
        timings[f"export {fmt}"] = _run(
            [py, "-m", "mova_train.cli.export", str(run_dir), "--out", str(adapters / fmt), "--format", fmt],
            env=env,
        )
    timings["sample"] = _run(
        [
            py, "-m", "mova_train.cli.sample", "--checkpoint", str(ckpt),
            "--lora", str(adapters / "mova"), "--prompt", DEMO_PROMPT,
            "--image", str(_first_frame_png(out)), "--frames", "17", "--size", "64x112",
            "--steps", "8", "--seed", "0", "--out", str(renders),
        ],
        env=env,
    )  # fmt: skip
    loss_png = plot_losses(run_dir / "metrics.jsonl", out / "loss.png")

    mp4s = sorted(renders.glob("*.mp4"))
    sheets = sorted(renders.glob("*.png"))
    (out / TIMINGS_NAME).write_text(json.dumps({k: round(v, 2) for k, v in timings.items()}, indent=1) + "\n")
    print("\n=== mova-train demo finished ===")
    print(f"synthetic clips : {raw}")
    print(f"tiny checkpoint : {ckpt}")
    print(f"shards          : {shards}  (aligned clips to watch: {out / 'clips'})")
    print(f"run directory   : {run_dir}  (metrics.jsonl, config.yaml, logs/, checkpoints/, wandb/)")
    print(f"adapters        : {adapters / 'mova'} and {adapters / 'peft'}")
    print(f"renders         : {', '.join(str(p) for p in mp4s) or renders}")
    print(
        f"contact sheets  : {', '.join(str(p) for p in sheets) or '-'}  (frames, waveform, spectrogram, A/V sync)"
    )
    print(f"loss curve      : {loss_png}")
    print(
        "timings (s)     : "
        + ", ".join(f"{k} {v:.0f}" for k, v in timings.items())
        + f"  ({out / TIMINGS_NAME})"
    )
    if rerun_note:
        print(f"note            : {rerun_note}")
    return 0


def already_trained(run_dir: Path, steps: int) -> str | None:
    """What a rerun should be told when the run dir already holds the last step: the trainer resumes there and
    trains nothing (the same command resumes, by design), so the numbers shown are the earlier run's."""
    found = list_checkpoints(run_dir)
    if not found or found[-1][0] < steps:
        return None
    return (
        f"{run_dir} already holds step {found[-1][0]} (--steps {steps}): training resumes there and trains nothing; "
        "run `make clean` (or delete that folder) to train again"
    )


def _first_frame_png(out: Path) -> Path:
    """The reference image for the render: frame 0 of the first exported clip (MOVA is image-conditioned)."""
    from PIL import Image

    png = out / "reference.png"
    if png.exists():
        return png
    clips = sorted((out / "clips").rglob("*.mp4"))
    if not clips:
        raise SystemExit(f"demo: no exported clips under {out / 'clips'} to take a reference frame from")
    frames, _, _, _ = read_mp4(clips[0], with_audio=False)
    Image.fromarray(frames[0]).save(png)
    return png


if __name__ == "__main__":
    sys.exit(main())
