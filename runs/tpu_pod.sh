#!/usr/bin/env bash
# TPU pod slices (v4/v5e/v5p/v6e, one or many hosts, one or many slices).
#
# From your workstation (the repo must be cloned at ~/nanochat-jax on every worker):
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a DEPTH=24 bash runs/tpu_pod.sh
# which runs `bash runs/tpu_pod.sh worker` on all workers at once (gcloud --worker=all).
# JAX finds the other hosts of the slice itself (jax.distributed.initialize() on TPU VMs).
#
# Mesh (MESH=...): FSDP over the chips of a slice (ICI), data parallel across slices (DCN):
#   one slice, d12–d32:   MESH=fsdp=-1
#   N slices (multislice): MESH=data=N,fsdp=-1     (data must be a multiple of the slice count)
#   v5e/v6e (16/32 GB HBM) at d32: MESH=fsdp=-1,model=2 if the FSDP shard does not fit
#
# STAGE=check (default): train.dist_check, a few real sharded training steps at the chosen
# depth, so every host, the mesh and the per-chip memory are proven before a long run.
# STAGE=speedrun: the whole pipeline of runs/gpu_speedrun.sh (shards, tokenizer, base_train,
# CORE, SFT, ChatCORE) on every worker; training stages run as one multi-host job, the data,
# tokenizer and eval stages run on each host (deterministic, so every host gets the same files).
# Knobs: STAGE, MESH, DEPTH, CHECK_ARGS, SKIP_SETUP=1, PYTHON, REPO_DIR (default ~/nanochat-jax).
set -euo pipefail
if [ "${1:-}" != "worker" ]; then
  : "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
  exec gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command \
    "cd ${REPO_DIR:-~/nanochat-jax} && STAGE='${STAGE:-check}' MESH='${MESH:-fsdp=-1}' DEPTH='${DEPTH:-24}' CHECK_ARGS='${CHECK_ARGS:-}' bash runs/tpu_pod.sh worker"
fi
cd "$(dirname "$0")/.."
[ "${SKIP_SETUP:-0}" = 1 ] || NANOCHAT_EXTRAS=${NANOCHAT_EXTRAS:-tpu} bash runs/setup.sh
PYTHON=${PYTHON:-.venv/bin/python}
DEPTH=${DEPTH:-24}
MESH=${MESH:-fsdp=-1}
export NANOCHAT_AUTO_DISTRIBUTED=1  # every worker joins the slice's process group
if [ "${STAGE:-check}" = speedrun ]; then
  SKIP_SETUP=1 PYTHON=$PYTHON MESH=$MESH DEPTH=$DEPTH exec bash runs/gpu_speedrun.sh
fi
CHECK_ARGS=${CHECK_ARGS:-}
CHECK_ARGS=${CHECK_ARGS:---depth $DEPTH --head-dim 128 --seq-len 2048 --vocab-size 32768 --dtype bfloat16 --batch-size 64 --micro-steps 1 --steps 3}
# shellcheck disable=SC2086
exec "$PYTHON" -m train.dist_check --mesh "$MESH" $CHECK_ARGS
