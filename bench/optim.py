"""Optimizer step time: our Optax MuonAdamW vs the PyTorch reference, side by side.

    python -m bench.optim                          # CPU: d4 and d12 shapes
    python -m bench.optim --depth 20               # GPU

One JSON line per (framework, depth) with the median step time over --iters steps after
--warmup, the Muon share of the JAX step (the Muon partition timed alone), and a ratio line.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bench.forward import timed
from nanochat_jax import optim
from nanochat_jax.common import tune_malloc
from nanochat_jax.config import config_for_depth
from nanochat_jax.convert import params_from_state_dict


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, nargs="+", default=[4, 12])
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=3)
    args = ap.parse_args(argv)
    tune_malloc()  # as the training entry points do (common.tune_malloc)

    import torch

    from nanochat_jax.torch_ref import GPT as TorchGPT
    from nanochat_jax.torch_ref import setup_optimizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    for depth in args.depth:
        config = config_for_depth(depth)
        ref = TorchGPT(config, dtype=torch.float32, device=device)
        rng = np.random.default_rng(0)
        grads_sd = {k: rng.standard_normal(p.shape, dtype=np.float32) for k, p in ref.named_parameters()}
        params = jax.tree.map(jnp.asarray, params_from_state_dict(ref.state_dict(), config))
        grads = jax.tree.map(jnp.asarray, params_from_state_dict(grads_sd, config))
        base = dict(depth=depth, n_params=int(sum(p.numel() for p in ref.parameters())),
                    jax_device=str(jax.devices()[0].device_kind), torch_device=device)

        muon_tx = optim.muon(0.02, momentum_schedule=lambda it: 0.95, weight_decay_schedule=lambda it: 0.1)
        is_muon = optim.param_labels(params)
        mparams = jax.tree.map(lambda p, lab: p if lab == "muon" else None, params, is_muon)
        mgrads = jax.tree.map(lambda g, lab: g if lab == "muon" else None, grads, is_muon)
        mstep = jax.jit(muon_tx.update)
        mstate = muon_tx.init(mparams)
        muon_s = timed(lambda: jax.block_until_ready(mstep(mgrads, mstate, mparams)), args.warmup, args.iters)
        del mparams, mstate
        tx = optim.make_optimizer(config, 1000, weight_decay=0.1, dtype=jnp.float32)
        step = jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(*tx.update(g, s, p)),
                       donate_argnums=(0, 1))
        state = [params, tx.init(params)]

        def jax_step():
            state[0], state[1] = jax.block_until_ready(step(state[0], state[1], grads))
        jax_s = timed(jax_step, args.warmup, args.iters)
        print(json.dumps(dict(base, framework="jax", step_s=jax_s, muon_s=muon_s, muon_share=muon_s / jax_s)), flush=True)
        del state, params

        for k, p in ref.named_parameters():
            p.grad = torch.from_numpy(grads_sd[k]).to(device)
        opt = setup_optimizer(ref, weight_decay=0.1)

        def torch_step():
            opt.step()
            if device == "cuda":
                torch.cuda.synchronize()
        torch_s = timed(torch_step, args.warmup, args.iters)
        print(json.dumps(dict(base, framework="torch_ref", step_s=torch_s)), flush=True)
        print(json.dumps({"depth": depth, "ratio": "torch_ref / jax", "speedup_of_jax": torch_s / jax_s}), flush=True)


if __name__ == "__main__":
    main()
