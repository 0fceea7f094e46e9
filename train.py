"""Training entry point: `accelerate launch train.py +experiment=voice_lora [key=value ...]` (see configs/).

A configuration or data problem (a ValueError naming the field, file or key) exits with status 2 and one line,
printed by rank 0 only (the other ranks exit with the same status, quietly); Hydra itself reports unknown keys and
groups while composing (status 1).
"""

import os
import sys

import hydra

from mova_train.config import register_configs
from mova_train.upstream import silence_known_banners

silence_known_banners()  # before DeepSpeed / matplotlib are imported by the trainer (see KNOWN_BANNERS)
register_configs()


# train.py keeps @hydra.main rather than mova_train.config.compose_config (which every other tool and the tests
# use): it gives the training command Hydra's own command line (key=value / +group=name overrides, --cfg job,
# --help, --multirun, the status-1 composition errors) that users, the launch scripts and the docs rely on. Both read
# the same configs/ folder with the same registered schema, so they compose the same config.
@hydra.main(config_path="configs", config_name="train", version_base=None)
def main(cfg) -> None:
    # Imported after Hydra has parsed the command line, on purpose: --help and --cfg job answer without loading
    # the trainer (DeepSpeed, accelerate, wandb).
    from mova_train.training.trainer import run

    try:
        run(cfg)
    except ValueError as e:
        if os.environ.get("RANK", "0") == "0":  # every rank validates the same config: say it once
            message = " ".join(str(e).split())
            print(f"train.py: error: {message}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
