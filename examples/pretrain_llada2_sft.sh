#!/usr/bin/env bash
# Diffusion SFT of LLaDA2 with megadiff, launched with torchrun.
#
#   examples/pretrain_llada2_sft.sh CONFIG.yaml [section.key=value ...]
#
# One node by default: GPUS_PER_NODE processes (all GPUs, or 2 CPU processes without a GPU) on a
# free port, so two runs on one machine do not collide. Several nodes: run it on every node with
# the same NNODES, MASTER_ADDR (node 0's address) and MASTER_PORT, and NODE_RANK 0..NNODES-1, e.g.
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 examples/pretrain_llada2_sft.sh CONFIG.yaml
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 examples/pretrain_llada2_sft.sh CONFIG.yaml
# A worker's one-line error is repeated as the last line, after torchrun's report.
set -uo pipefail

if [ $# -lt 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
  sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
  exit 0
fi
CONFIG=$1; shift
[ -f "$CONFIG" ] || { echo "error: config file '$CONFIG' not found" >&2; exit 2; }

HERE=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-$HERE/.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3

if [ -z "${GPUS_PER_NODE:-}" ]; then
  GPUS_PER_NODE=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() or 2)') || exit 1
fi
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
if [ "$NNODES" -gt 1 ] && { [ -z "${MASTER_ADDR:-}" ] || [ -z "${MASTER_PORT:-}" ]; }; then
  echo "error: NNODES=$NNODES needs MASTER_ADDR (node 0's address) and MASTER_PORT, the same on every node" >&2
  exit 2
fi
if [ "$NNODES" -eq 1 ] && [ -z "${MASTER_PORT:-}" ]; then
  RENDEZVOUS=(--standalone)  # a free port on this machine, picked by torchrun
else
  RENDEZVOUS=(--nnodes "$NNODES" --node-rank "$NODE_RANK"
              --master-addr "${MASTER_ADDR:-127.0.0.1}" --master-port "$MASTER_PORT")
fi
# One thread per process on CPU keeps 2-core machines from oversubscribing.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# Overlap of TP communication with compute relies on one CUDA connection (as in Megatron-LM).
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
# Workers append their one-line errors here (megadiff.errors.note_error_line).
MEGADIFF_ERROR_FILE=$(mktemp "${TMPDIR:-/tmp}/megadiff-errors.XXXXXX") || exit 1
export MEGADIFF_ERROR_FILE
trap 'rm -f "$MEGADIFF_ERROR_FILE"' EXIT

CMD=("$PYTHON" -m torch.distributed.run "${RENDEZVOUS[@]}" --nproc-per-node "$GPUS_PER_NODE"
     "$HERE/tools/train.py" "$CONFIG" "$@")
echo "+ ${CMD[*]}"
# torchrun runs as a child (not exec'd) so its error can be repeated after it; a SIGTERM or SIGINT
# sent to this script is passed on (the trainer saves a checkpoint on SIGTERM).
"${CMD[@]}" &
child=$!
trap 'kill -TERM "$child" 2>/dev/null' TERM INT
wait "$child"
rc=$?
while kill -0 "$child" 2>/dev/null; do  # `wait` returned early for a trapped signal
  wait "$child"
  rc=$?
done
if [ $rc -ne 0 ] && [ -s "$MEGADIFF_ERROR_FILE" ]; then
  head -n 1 "$MEGADIFF_ERROR_FILE" >&2
fi
exit $rc
