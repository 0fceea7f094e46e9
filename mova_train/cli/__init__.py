"""Command-line tools, each run as `python -m mova_train.cli.<tool>` (`--help` explains it).

demo (the whole job end to end on CPU), doctor (readiness check), inspect (parameter names, shapes and counts),
make_tiny (a tiny random checkpoint), export (LoRA adapters for other tools), sample (render clips with sound).
Training is `train.py` at the repository root (Hydra's command line); benchmarks are `python -m mova_train.bench`;
data preparation is `python -m data_tools`. These modules parse arguments and print; what they call lives in the
library packages (the doctor's checks and the demo's loss plot belong to those commands alone and stay with them).
There are no short aliases (`python -m mova_train.<tool>`): each tool has exactly one command.
"""

from mova_train.upstream import silence_known_banners

silence_known_banners()  # every tool starts quiet (standard library only; see KNOWN_BANNERS)
