#!/usr/bin/env bash
# Plain torchrun launch, for clusters without SLURM (run the same command on every node).
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 ./launch/torchrun.sh +experiment=voice_lora model.checkpoint=/data/MOVA-360p
#
# DeepSpeed is configured by the Hydra `deepspeed` group (e.g. deepspeed=zero3), so no accelerate config is needed.
set -euo pipefail
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
NPROC_PER_NODE=${NPROC_PER_NODE:-$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))')}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-540}
exec torchrun --nnodes "${NNODES}" --node_rank "${NODE_RANK}" --nproc_per_node "${NPROC_PER_NODE}" \
    --rdzv_backend c10d --rdzv_endpoint "${MASTER_ADDR}:${MASTER_PORT}" \
    train.py "$@"
