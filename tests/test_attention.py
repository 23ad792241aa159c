import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from nanochat_jax.attention import attention, default_backend, resolve_backend


def naive_attention(q, k, v, left):
    """Written out by hand: softmax over keys j with i - left <= j <= i, GQA by repeat."""
    B, T, H, D = q.shape
    g = H // k.shape[2]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    s = np.einsum("bihd,bjhd->bhij", q, k) / np.sqrt(D)
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    s = np.where((j <= i) & (j >= i - left), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhij,bjhd->bihd", p, v)


def qkv(B, T, H, Hkv, D, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(ks[0], (B, T, H, D)), jax.random.normal(ks[1], (B, T, Hkv, D)),
            jax.random.normal(ks[2], (B, T, Hkv, D)))


@pytest.mark.parametrize("T,H,Hkv,left", [(64, 4, 4, 64), (64, 4, 2, 16), (128, 8, 2, 31), (40, 2, 1, 0), (33, 3, 3, 32)])
def test_xla_equals_hand_written_window_attention(T, H, Hkv, left):
    q, k, v = qkv(2, T, H, Hkv, 16)
    out = attention(q, k, v, window_left=left, backend="xla")
    np.testing.assert_allclose(out, naive_attention(*map(np.asarray, (q, k, v)), left), rtol=1e-5, atol=1e-5)


def test_window_means_left_plus_one_keys():
    """left=2: position 5 sees keys 3,4,5 only, so changing key 2 leaves it unchanged."""
    q, k, v = qkv(1, 8, 2, 2, 8)
    base = attention(q, k, v, window_left=2, backend="xla")
    moved = attention(q, k.at[:, 2].add(5.0), v.at[:, 2].add(5.0), window_left=2, backend="xla")
    np.testing.assert_array_equal(base[:, 5:], moved[:, 5:])
    assert not np.allclose(base[:, 4], moved[:, 4])


@pytest.mark.parametrize("T,H,Hkv,left", [(128, 2, 2, 127), (256, 4, 2, 128), (256, 2, 1, 63)])
def test_splash_interpret_equals_xla_forward_and_grad(T, H, Hkv, left):
    q, k, v = qkv(2, T, H, Hkv, 64, seed=1)
    ref = attention(q, k, v, window_left=left, backend="xla")
    out = attention(q, k, v, window_left=left, backend="splash-interpret")
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5)

    def loss(backend):
        return lambda q, k, v: jnp.sum(jnp.sin(attention(q, k, v, window_left=left, backend=backend)))
    g_ref = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
    g_out = jax.grad(loss("splash-interpret"), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_out, g_ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_splash_under_mesh_runs_in_shard_map_and_matches():
    devs = np.array(jax.devices()[:8]).reshape(2, 2, 2)
    mesh = jax.sharding.Mesh(devs, ("data", "fsdp", "model"), axis_types=(AxisType.Auto,) * 3)
    q, k, v = qkv(4, 128, 4, 2, 32, seed=2)
    ref = attention(q, k, v, window_left=40, backend="xla")
    with jax.set_mesh(mesh):
        sh = jax.sharding.NamedSharding(mesh, P(("data", "fsdp"), None, "model", None))
        q_s, k_s, v_s = (jax.device_put(x, sh) for x in (q, k, v))
        fn = jax.jit(lambda q, k, v: attention(q, k, v, window_left=40, backend="splash-interpret"))
        out = fn(q_s, k_s, v_s)
        hlo = fn.lower(q_s, k_s, v_s).as_text()
    # one kernel per device on its (batch, heads) shard: a manual computation over all axes
    assert "manual_computation" in hlo and '{"data", "fsdp"}, {}, {"model"}, {}' in hlo
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5)


def test_backend_selection_and_errors_on_cpu():
    assert default_backend(jnp.float32) == "xla"
    assert resolve_backend("auto", jnp.float32) == "xla"
    assert resolve_backend(None, jnp.bfloat16) == "xla"
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        resolve_backend("cudnn", jnp.bfloat16)
    with pytest.raises(ValueError, match="needs a TPU"):
        resolve_backend("splash", jnp.float32)
    with pytest.raises(ValueError, match="unknown attention backend"):
        resolve_backend("flash3", jnp.float32)
    q, k, v = qkv(1, 100, 2, 2, 16)
    with pytest.raises(ValueError, match="multiple of 128"):
        attention(q, k, v, window_left=10, backend="splash-interpret")


@pytest.mark.gpu
@pytest.mark.parametrize("T,H,Hkv,left", [(256, 4, 4, 255), (512, 8, 8, 128), (256, 8, 2, 64)])
def test_cudnn_equals_xla_on_gpu(T, H, Hkv, left):
    if jax.default_backend() != "gpu":
        pytest.skip("cuDNN attention needs a CUDA GPU")
    q, k, v = (x.astype(jnp.bfloat16) for x in qkv(2, T, H, Hkv, 128, seed=3))
    ref = attention(q, k, v, window_left=left, backend="xla").astype(jnp.float32)
    out = attention(q, k, v, window_left=left, backend="cudnn").astype(jnp.float32)
    np.testing.assert_allclose(out, ref, rtol=2e-2, atol=2e-2)

    def loss(backend):
        return lambda q, k, v: jnp.sum(attention(q, k, v, window_left=left, backend=backend).astype(jnp.float32) ** 2)
    for a, b in zip(jax.grad(loss("cudnn"), argnums=(0, 1, 2))(q, k, v), jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(a.astype(jnp.float32), b.astype(jnp.float32), rtol=5e-2, atol=5e-2)
