"""Training entry point: `accelerate launch train.py +experiment=voice_lora [key=value ...]` (see configs/).

A configuration or data problem (a ValueError naming the field, file or key) exits with status 2 and one line;
Hydra itself reports unknown keys and groups while composing (status 1).
"""

import sys

import hydra

from mova_train.config import register_configs

register_configs()


@hydra.main(config_path="configs", config_name="train", version_base=None)
def main(cfg) -> None:
    from mova_train.training.trainer import run

    try:
        run(cfg)
    except ValueError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
