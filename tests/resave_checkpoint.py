"""Test helper, run as a script: set up the real trainer resuming from a checkpoint (loading it through its
backend), then save again at once, with no step in between, so the two checkpoints can be compared.

    python tests/resave_checkpoint.py CHECKPOINT_DIR SHARDS SOURCE_CHECKPOINT RUN_DIR [override ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mova_train.config import to_train_config, validate_config  # noqa: E402
from mova_train.training.trainer import Trainer  # noqa: E402
from tests.train_utils import compose_train, tiny_overrides  # noqa: E402


def main() -> None:
    checkpoint, shards, source, run_dir, *extra = sys.argv[1:]
    overrides = tiny_overrides(
        Path(checkpoint), Path(shards), Path(run_dir), f"trainer.resume={source}", *extra
    )
    trainer = Trainer(validate_config(to_train_config(compose_train(overrides))))
    trainer.setup()
    try:
        trainer.save_checkpoint()
    finally:
        trainer.finish()
    print("RESAVED", trainer.checkpointer.last)


if __name__ == "__main__":
    main()
