"""nanochat state_dict / checkpoint conversion: exact round trips and clear errors."""

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from helpers import needs_torch, torch
from nanochat_jax import model
from nanochat_jax.config import GPTConfig
from nanochat_jax.convert import (export_nanochat_checkpoint, find_checkpoint, load_nanochat_checkpoint,
                                  params_from_state_dict, state_dict_from_params)

if torch is not None:
    from nanochat_jax.torch_ref import GPT as TorchGPT

CFG = GPTConfig(sequence_len=128, vocab_size=300, n_layer=3, n_head=4, n_kv_head=2, n_embd=64, window_pattern="SL")


def bits(a):
    a = np.asarray(a)
    return a.view(np.uint16) if a.dtype == ml_dtypes.bfloat16 else a


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_params_state_dict_params_is_bit_exact(dtype):
    params = model.init_params(CFG, jax.random.key(0), dtype)
    back = params_from_state_dict(state_dict_from_params(params, CFG), CFG)
    flat_a, tree_a = jax.tree.flatten(params)
    flat_b, tree_b = jax.tree.flatten(back)
    assert tree_a == tree_b
    for a, b in zip(flat_a, flat_b):
        assert np.asarray(a).dtype == b.dtype
        np.testing.assert_array_equal(bits(a), bits(b))


@needs_torch
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_torch_state_dict_round_trip_is_bit_exact(dtype_name):
    dtype = getattr(torch, dtype_name)
    ref = TorchGPT(CFG, dtype=dtype)
    sd = ref.state_dict()
    assert (sd["transformer.wte.weight"].dtype == dtype) and sd["lm_head.weight"].dtype == torch.float32
    back = state_dict_from_params(params_from_state_dict(sd, CFG), CFG)
    assert set(back) == set(sd)
    for k, t in sd.items():
        got = back[k]
        assert got.shape == tuple(t.shape), k
        if t.dtype == torch.bfloat16:
            np.testing.assert_array_equal(got.view(np.int16), t.view(torch.int16).numpy())
        else:
            np.testing.assert_array_equal(got, t.numpy())


@needs_torch
def test_linear_weights_are_transposed_and_embeddings_are_not():
    ref = TorchGPT(CFG, dtype=torch.float32)
    p = params_from_state_dict(ref.state_dict(), CFG)
    np.testing.assert_array_equal(p["h_1"]["mlp"]["c_fc"]["kernel"], ref.transformer.h[1].mlp.c_fc.weight.detach().numpy().T)
    np.testing.assert_array_equal(p["wte"], ref.transformer.wte.weight.detach().numpy())
    np.testing.assert_array_equal(p["ve_2"], ref.value_embeds["2"].weight.detach().numpy())
    assert p["smear_gate"]["kernel"].shape == (24, 1)


@needs_torch
def test_orig_mod_prefix_is_stripped():
    sd = {"_orig_mod." + k: v for k, v in TorchGPT(CFG, dtype=torch.float32).state_dict().items()}
    assert "wte" in params_from_state_dict(sd, CFG)


@needs_torch
def test_bad_state_dicts_name_the_key():
    sd = TorchGPT(CFG, dtype=torch.float32).state_dict()
    missing = {k: v for k, v in sd.items() if k != "transformer.h.1.attn.c_k.weight"}
    with pytest.raises(ValueError, match=r"missing keys \['transformer.h.1.attn.c_k.weight'\]"):
        params_from_state_dict(missing, CFG)
    with pytest.raises(ValueError, match=r"unexpected keys \['transformer.h.9.mlp.c_fc.weight'\]"):
        params_from_state_dict({**sd, "transformer.h.9.mlp.c_fc.weight": sd["transformer.h.0.mlp.c_fc.weight"]}, CFG)
    with pytest.raises(ValueError, match=r"'transformer.h.0.mlp.c_fc.weight' has shape \(64, 256\), expected \(256, 64\)"):
        params_from_state_dict({**sd, "transformer.h.0.mlp.c_fc.weight": sd["transformer.h.0.mlp.c_fc.weight"].T}, CFG)
    params = model.init_params(CFG, jax.random.key(0), jnp.float32)
    del params["h_2"]["attn"]["ve_gate"]
    with pytest.raises(ValueError, match=r"missing \['h_2/attn/ve_gate/kernel'\], unexpected \[\]"):
        state_dict_from_params(params, CFG)
    params["h_2"]["attn"]["ve_gate"] = {"kernel": np.zeros((12, 2))}
    params["ve_1"] = np.zeros((320, 32))
    with pytest.raises(ValueError, match=r"missing \[\], unexpected \['ve_1'\]"):
        state_dict_from_params(params, CFG)


@needs_torch
def test_export_then_load_gives_identical_logits_and_upstream_layout(tmp_path):
    params = model.init_params(CFG, jax.random.key(1), jnp.float32)
    # switch on the zero-initialized paths so the logits depend on every tensor
    params = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(2), a.shape, a.dtype), params)
    out = export_nanochat_checkpoint(params, CFG, tmp_path / "d3", step=1234, meta={"val_bpb": 1.5})
    assert sorted(f.name for f in out.iterdir()) == ["meta_001234.json", "model_001234.pt"]
    meta = json.loads((out / "meta_001234.json").read_text())
    assert meta["step"] == 1234 and meta["model_config"] == CFG.to_dict() and meta["val_bpb"] == 1.5

    loaded, cfg, meta2 = load_nanochat_checkpoint(tmp_path, dtype=jnp.float32)  # finds the d3 tag itself
    assert cfg == CFG and meta2 == meta
    tok = np.random.default_rng(0).integers(0, 300, (2, 40))
    np.testing.assert_array_equal(model.forward(params, tok, CFG, dtype=jnp.float32),
                                  model.forward(loaded, tok, CFG, dtype=jnp.float32))

    # what upstream does: strict load into nanochat's module, then run it
    ref = TorchGPT(CFG, dtype=torch.float32)
    ref.load_state_dict(torch.load(out / "model_001234.pt", weights_only=True), strict=True)
    want = ref(torch.from_numpy(tok)).detach().numpy()
    got = np.asarray(model.forward(params, tok, CFG, dtype=jnp.float32))
    assert np.linalg.norm(got - want) / np.linalg.norm(want) <= 1e-5


@needs_torch
def test_load_casts_embeddings_to_compute_dtype(tmp_path):
    ref = TorchGPT(CFG, dtype=torch.bfloat16)  # as upstream saves on GPU: bf16 tables, fp32 matrices
    d = tmp_path / "ckpt"
    d.mkdir()
    torch.save(ref.state_dict(), d / "model_000010.pt")
    (d / "meta_000010.json").write_text(json.dumps({"step": 10, "model_config": CFG.to_dict()}))
    p, _, _ = load_nanochat_checkpoint(d, dtype=jnp.float32)
    assert p["wte"].dtype == np.float32 and p["lm_head"]["kernel"].dtype == np.float32
    p, _, _ = load_nanochat_checkpoint(d, dtype=jnp.bfloat16)
    assert p["wte"].dtype == jnp.bfloat16 and p["ve_0"].dtype == jnp.bfloat16
    assert p["h_0"]["attn"]["c_q"]["kernel"].dtype == np.float32
    np.testing.assert_array_equal(p["wte"].view(np.int16), ref.transformer.wte.weight.view(torch.int16).numpy())


@needs_torch
def test_old_checkpoint_without_lambdas_or_window_pattern(tmp_path):
    cfg = GPTConfig(sequence_len=128, vocab_size=300, n_layer=2, n_head=2, n_kv_head=2, n_embd=64, window_pattern="L")
    sd = TorchGPT(cfg, dtype=torch.float32).state_dict()
    del sd["resid_lambdas"], sd["x0_lambdas"]
    torch.save(sd, tmp_path / "model_000005.pt")
    mc = cfg.to_dict()
    del mc["window_pattern"]
    (tmp_path / "meta_000005.json").write_text(json.dumps({"step": 5, "model_config": mc}))
    p, got_cfg, _ = load_nanochat_checkpoint(tmp_path)
    assert got_cfg == cfg
    np.testing.assert_array_equal(p["resid_lambdas"], [1, 1])
    np.testing.assert_array_equal(p["x0_lambdas"], [0, 0])


@needs_torch
def test_step_selection_and_bad_checkpoints(tmp_path):
    params = model.init_params(CFG, jax.random.key(0), jnp.float32)
    for step in (5, 20, 100):
        export_nanochat_checkpoint(params, CFG, tmp_path, step=step)
    assert find_checkpoint(tmp_path) == (tmp_path, 100)
    assert find_checkpoint(tmp_path, 20) == (tmp_path, 20)
    with pytest.raises(FileNotFoundError, match=r"no model_000007.pt .*\[5, 20, 100\]"):
        find_checkpoint(tmp_path, 7)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no model_"):
        find_checkpoint(tmp_path / "empty")

    # a truncated model file (an interrupted copy) is an error, never silently garbage
    data = (tmp_path / "model_000100.pt").read_bytes()
    (tmp_path / "model_000100.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or not a nanochat checkpoint"):
        load_nanochat_checkpoint(tmp_path)
    (tmp_path / "meta_000020.json").unlink()
    with pytest.raises(FileNotFoundError, match="meta_000020.json is missing"):
        load_nanochat_checkpoint(tmp_path, step=20)
    # a checkpoint of a different model names the offending key
    other = GPTConfig(sequence_len=128, vocab_size=300, n_layer=3, n_head=4, n_kv_head=2, n_embd=128)
    (tmp_path / "meta_000005.json").write_text(json.dumps({"step": 5, "model_config": other.to_dict()}))
    with pytest.raises(ValueError, match=r"key 'transformer.wte.weight' has shape \(320, 64\), expected \(320, 128\)"):
        load_nanochat_checkpoint(tmp_path, step=5)


@needs_torch
def test_export_leaves_no_temp_files_when_interrupted(tmp_path, monkeypatch):
    params = model.init_params(CFG, jax.random.key(0), jnp.float32)

    def boom(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        export_nanochat_checkpoint(params, CFG, tmp_path, step=3)
    assert list(tmp_path.iterdir()) == []


def test_export_without_torch_names_the_extra(tmp_path, monkeypatch):
    """Where torch is missing (3.12+ without our pin), writing upstream's .pt says how to get it."""
    import sys

    from nanochat_jax import convert
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail, installed or not
    params = model.init_params(CFG, jax.random.key(0), jnp.float32)
    with pytest.raises(ImportError, match=r"needs torch: pip install 'nanochat-jax\[torch\]'"):
        convert.export_nanochat_checkpoint(params, CFG, tmp_path, step=1)
    assert not list(tmp_path.iterdir())
