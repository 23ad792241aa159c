"""runs/gpu_speedrun.sh: the stages in order, with flags the entry points accept."""

import os
import shlex
import subprocess
from pathlib import Path

from train import base_train, sft

ROOT = Path(__file__).resolve().parents[1]


def dry_run(**env):
    r = subprocess.run(["bash", "runs/gpu_speedrun.sh"], cwd=ROOT, capture_output=True, text=True, check=True,
                       env={**os.environ, "DRY_RUN": "1", "NANOCHAT_JAX_HOME": "/nc", **env})
    return [shlex.split(line[2:].rstrip(" &")) for line in r.stdout.splitlines() if line.startswith("+ ")]


def test_stages_and_flags():
    cmds = dry_run(DEPTH="20", RL="1")
    modules = [c[2] for c in cmds]
    assert modules == ["nanochat_jax.data.dataset", "nanochat_jax.data.dataset", "train.tok_train", "train.tok_eval",
                       "train.base_train", "train.base_eval", "train.sft", "train.chat_eval", "train.rl",
                       "train.chat_eval", "serve.cli"]
    args = {c[2]: c[3:] for c in cmds}
    bt = base_train.parse_args(args["train.base_train"])
    assert (bt.depth, bt.target_param_data_ratio, bt.mesh, bt.model_tag) == (20, 8.0, "fsdp=-1", "d20")
    s = sft.parse_args(args["train.sft"])
    assert s.base_dir == "/nc/base_checkpoints/d20"
    assert "/nc/chatsft_checkpoints/d20/checkpoints" in args["serve.cli"]
    assert "train.rl" not in [c[2] for c in dry_run()]  # RL only when asked


def test_tpu_pod_speedrun_stage_hands_over():
    text = (ROOT / "runs/tpu_pod.sh").read_text()
    assert "STAGE" in text and "runs/gpu_speedrun.sh" in text
    subprocess.run(["bash", "-n", "runs/gpu_speedrun.sh"], cwd=ROOT, check=True)
