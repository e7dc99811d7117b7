#!/usr/bin/env bash
# Diffusion SFT of LLaDA2 with megadiff, launched with torchrun.
#
#   examples/pretrain_llada2_sft.sh CONFIG.yaml [section.key=value ...]
#
# Single node by default (GPUS_PER_NODE processes: all GPUs, or 2 CPU processes without a GPU).
# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT on every node, e.g.
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=10.0.0.1 examples/pretrain_llada2_sft.sh examples/configs/llada2_flash_bd_sft.yaml
set -euo pipefail

if [ $# -lt 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
  sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
  exit 0
fi
CONFIG=$1; shift
[ -f "$CONFIG" ] || { echo "error: config file '$CONFIG' not found" >&2; exit 2; }

HERE=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-$HERE/.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3

if [ -z "${GPUS_PER_NODE:-}" ]; then
  GPUS_PER_NODE=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() or 2)')
fi
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
# One thread per process on CPU keeps 2-core machines from oversubscribing.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# Overlap of TP communication with compute relies on one CUDA connection (as in Megatron-LM).
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}

CMD=("$PYTHON" -m torch.distributed.run
     --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS_PER_NODE"
     --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT"
     "$HERE/tools/train.py" "$CONFIG" "$@")
echo "+ ${CMD[*]}"
exec "${CMD[@]}"
