#!/usr/bin/env bash
# The full nanochat pipeline at speedrun size on one GPU node (one JAX process drives every
# GPU of the node; nanochat's runs/speedrun.sh is the 8xH100 reference):
#   ClimbMix shards -> 32k tokenizer -> base_train d24 -> CORE + bpb -> SFT -> ChatCORE
#   [-> RL on GSM8K -> eval] -> one chat answer
#
#   bash runs/gpu_speedrun.sh                        # DEPTH=24, MESH=fsdp=-1, ~170 shards
#   DEPTH=20 RL=1 bash runs/gpu_speedrun.sh          # smaller model, add the RL stage
#   DPO=1 bash runs/gpu_speedrun.sh                  # add a DPO stage on HH-RLHF after SFT
#   DRY_RUN=1 bash runs/gpu_speedrun.sh              # print the commands, run nothing
#
# Needs internet for the shards, the CORE eval bundle and the SFT/eval task data (all
# downloaded once to $NANOCHAT_JAX_HOME, default ~/.cache/nanochat-jax). For several nodes use
# runs/gpu_multinode.sh's variables (COORDINATOR, NUM_NODES, NODE_RANK) with the same stages;
# on TPU pods runs/tpu_pod.sh STAGE=speedrun runs this script on every worker.
# Knobs: DEPTH, MESH, DEVICE_BATCH, SHARDS, RATIO (param:data ratio), RL, SKIP_SETUP, PYTHON,
# UNSAFE_EXEC=1 (let ChatCORE's HumanEval run model code without the bubblewrap sandbox, docs/sandbox.md).
set -euo pipefail
cd "$(dirname "$0")/.."
export NANOCHAT_JAX_HOME=${NANOCHAT_JAX_HOME:-$HOME/.cache/nanochat-jax}
DEPTH=${DEPTH:-24}
MESH=${MESH:-fsdp=-1}
DEVICE_BATCH=${DEVICE_BATCH:-16}
SHARDS=${SHARDS:-170}
RATIO=${RATIO:-8}
PY=${PYTHON:-.venv/bin/python}
TAG=d$DEPTH
run() { echo "+ $*"; [ "${DRY_RUN:-0}" = 1 ] || "$@"; }
bg() { echo "+ $* &"; [ "${DRY_RUN:-0}" = 1 ] || { "$@" & }; }
if [ "${DRY_RUN:-0}" != 1 ] && [ "${SKIP_SETUP:-0}" != 1 ]; then
  NANOCHAT_EXTRAS=${NANOCHAT_EXTRAS:-gpu} bash runs/setup.sh
  # chat_eval refuses to run HumanEval's model-written code without the sandbox: install it where we can
  if ! command -v bwrap >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    { apt-get install -y -qq bubblewrap || { apt-get update -qq && apt-get install -y -qq bubblewrap; }; } >/dev/null 2>&1 \
      || echo "bubblewrap install failed: chat_eval will refuse HumanEval unless UNSAFE_EXEC=1" >&2
  fi
fi
UNSAFE_FLAG=$([ "${UNSAFE_EXEC:-0}" = 1 ] && echo --unsafe-exec || true)

echo "== data and tokenizer =="
run "$PY" -m nanochat_jax.data.dataset -n 8
bg "$PY" -m nanochat_jax.data.dataset -n "$SHARDS"   # the rest, while the tokenizer trains
run "$PY" -m train.tok_train --vocab-size 32768 --max-chars 2000000000
run "$PY" -m train.tok_eval
[ "${DRY_RUN:-0}" = 1 ] || wait

echo "== pretraining =="
run "$PY" -m train.base_train --depth "$DEPTH" --target-param-data-ratio "$RATIO" \
  --device-batch-size "$DEVICE_BATCH" --mesh "$MESH" --save-every 1000 --model-tag "$TAG"
run "$PY" -m train.base_eval --checkpoint "$NANOCHAT_JAX_HOME/base_checkpoints/$TAG" --download \
  --device-batch-size "$DEVICE_BATCH" --out-dir "$NANOCHAT_JAX_HOME/base_eval"

echo "== SFT =="
run "$PY" -m train.sft --base-dir "$NANOCHAT_JAX_HOME/base_checkpoints/$TAG" --mesh "$MESH" --model-tag "$TAG"
run "$PY" -m train.chat_eval -i sft $UNSAFE_FLAG --out "$NANOCHAT_JAX_HOME/chatsft_checkpoints/$TAG/chat_eval.json"

if [ "${DPO:-0}" = 1 ]; then
  echo "== DPO (preference optimization on HH-RLHF) =="
  run "$PY" -m train.dpo --sft-dir "$NANOCHAT_JAX_HOME/chatsft_checkpoints/$TAG" --mesh "$MESH" --model-tag "$TAG" \
    --mixture 'hh-rlhf@train[:32000]' --val-mixture 'hh-rlhf@test[:1000]' --max-seq-len 1024
  run "$PY" -m train.chat_eval --checkpoint "$NANOCHAT_JAX_HOME/chatdpo_checkpoints/$TAG" $UNSAFE_FLAG \
    --out "$NANOCHAT_JAX_HOME/chatdpo_checkpoints/$TAG/chat_eval.json"
fi

if [ "${RL:-0}" = 1 ]; then
  echo "== RL =="
  run "$PY" -m train.rl --sft-dir "$NANOCHAT_JAX_HOME/chatsft_checkpoints/$TAG" --mesh "$MESH"
  run "$PY" -m train.chat_eval -i rl -a GSM8K --out "$NANOCHAT_JAX_HOME/chatrl_checkpoints/$TAG/chat_eval.json"
fi

run "$PY" -m serve.cli --checkpoint "$NANOCHAT_JAX_HOME/chatsft_checkpoints/$TAG/checkpoints" \
  --tokenizer-dir "$NANOCHAT_JAX_HOME/tokenizer" -p "Why is the sky blue?"
