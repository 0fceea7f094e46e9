"""The memory/FLOPs planner: `python -m mova_train.plan [HYDRA OVERRIDES] [--gpus N] [--gpu-memory GB] [--sp N]
[--frames F --height H --width W] [--batch B] [--json]` runs one training micro-step of the real model at real shapes
on fake tensors and reports, per GPU, what the run needs (README: "Will it fit? The memory planner").

`fake` (the fake device, host-side values, CUDA autocast emulation, the planned sequence shard), `tracker` (live bytes,
FLOPs, kernels), `simulate` (the trainer's model and micro-step), `report` (weights by ZeRO stage, advice, text/JSON).
"""
