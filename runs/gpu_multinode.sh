#!/usr/bin/env bash
# Multi-node GPU training without torchrun: one JAX process per node drives all of its GPUs.
#
# On every node (node 0's address is the coordinator; any free port):
#   COORDINATOR=10.0.0.1:12345 NUM_NODES=2 NODE_RANK=0 DEPTH=20 bash runs/gpu_multinode.sh   # node 0
#   COORDINATOR=10.0.0.1:12345 NUM_NODES=2 NODE_RANK=1 DEPTH=20 bash runs/gpu_multinode.sh   # node 1
# Under SLURM no variables are needed (JAX reads SLURM's):
#   srun --nodes=2 --ntasks-per-node=1 --gpus-per-node=8 bash runs/gpu_multinode.sh
#
# Mesh (MESH=...): FSDP inside a node over NVLink, data parallel across nodes. At nanochat
# sizes (d12–d32, <= 3B params) pure data+FSDP is the fastest layout on 8-GPU nodes:
#   d12–d26: MESH=data=$NUM_NODES,fsdp=-1            (params/optimizer state split 8 ways per node)
#   d32:     MESH=data=$NUM_NODES,fsdp=-1 also fits 80 GB H100s; add model=2 only to trade
#            memory for speed on smaller GPUs (heads 16 and MLP split in two).
#
# What it runs today: train.dist_check, a few real sharded training steps at the chosen depth
# on synthetic tokens, proving every node joined and the mesh/memory work. The pretraining
# entry point joins this recipe with the pretraining stage.
# Knobs: MESH, DEPTH, CHECK_ARGS (replace the check's flags), SKIP_SETUP=1, PYTHON.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${SKIP_SETUP:-0}" = 1 ] || NANOCHAT_EXTRAS=${NANOCHAT_EXTRAS:-gpu} bash runs/setup.sh
PYTHON=${PYTHON:-.venv/bin/python}
DEPTH=${DEPTH:-20}
NUM_NODES=${NUM_NODES:-${SLURM_NNODES:-1}}
MESH=${MESH:-data=${NUM_NODES},fsdp=-1}
if [ -n "${COORDINATOR:-}" ]; then
  export NANOCHAT_COORDINATOR=$COORDINATOR NANOCHAT_NUM_PROCESSES=$NUM_NODES NANOCHAT_PROCESS_ID=${NODE_RANK:?set NODE_RANK (0..NUM_NODES-1)}
fi
CHECK_ARGS=${CHECK_ARGS:---depth $DEPTH --head-dim 128 --seq-len 2048 --vocab-size 32768 --dtype bfloat16 --batch-size $((8 * NUM_NODES)) --micro-steps 1 --steps 3}
# shellcheck disable=SC2086
exec "$PYTHON" -m train.dist_check --mesh "$MESH" $CHECK_ARGS
