"""diffusion.py against float64 numpy references written here, independently of the module."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from diff_fastener_jax import diffusion as D

B, H, W, C = 3, 8, 8, 3


# ----------------------------------------------------------------------------- float64 references


def ref_linear(T, b0=1e-4, b1=0.02):
    betas = np.array([b0 + (b1 - b0) * i / (T - 1) for i in range(T)], dtype=np.float64)
    return betas, np.cumprod(1.0 - betas)


def ref_cosine(T, s=0.008):
    abar = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    betas = np.array([min(1 - abar((i + 1) / T) / abar(i / T), 0.999) for i in range(T)])
    return betas, np.cumprod(1.0 - betas)


def bcast(v):
    return v[:, None, None, None]


def ref_q(ab, x0, t, eps):
    return bcast(np.sqrt(ab[t])) * x0 + bcast(np.sqrt(1 - ab[t])) * eps


def ref_x0(ab, xt, t, eps):
    return (xt - bcast(np.sqrt(1 - ab[t])) * eps) / bcast(np.sqrt(ab[t]))


class LinearEps:
    """A fixed random linear 'network': eps = x @ M + 1e-3 * t * v, in jnp (float32) and numpy (float64)."""

    def __init__(self, seed=0):
        r = np.random.default_rng(seed)
        self.m = r.normal(size=(C, C)) * 0.5
        self.v = r.normal(size=(C,))

    def jax(self, x, t):
        return jnp.einsum("bhwc,cd->bhwd", x, jnp.asarray(self.m, jnp.float32)) + 1e-3 * t.astype(jnp.float32)[
            :, None, None, None
        ] * jnp.asarray(self.v, jnp.float32)

    def np(self, x, t):
        return np.einsum("bhwc,cd->bhwd", x, self.m) + 1e-3 * t.astype(np.float64)[:, None, None, None] * self.v


def oracle(sched, x0):
    """eps_fn that returns the exact noise implied by the known clean image x0 (tiled for fused batches)."""

    def eps_fn(x_t, t):
        reps = x_t.shape[0] // x0.shape[0]
        clean = jnp.concatenate([x0] * reps, axis=0)
        return (x_t - sched.sqrt_ab[t][:, None, None, None] * clean) / sched.sqrt_1m_ab[t][:, None, None, None]

    return eps_fn


def data(seed=0, b=B):
    r = np.random.default_rng(seed)
    x = r.uniform(-0.9, 0.9, size=(b, H, W, C))
    n1, n2 = r.normal(size=(2, b, H, W, C))
    return x, n1, n2


# ----------------------------------------------------------------------------- schedules


def test_linear_schedule_matches_reference():
    s = D.make_schedule(1000, "linear", 1e-4, 0.02)
    betas, ab = ref_linear(1000)
    assert s.T == 1000 and s.betas.dtype == jnp.float32 and s.betas.shape == (1000,)
    np.testing.assert_allclose(float(s.betas[0]), 1e-4, rtol=1e-6)
    np.testing.assert_allclose(float(s.betas[-1]), 0.02, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(s.alphas_cumprod), ab, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(s.sqrt_ab), np.sqrt(ab), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(s.sqrt_1m_ab), np.sqrt(1 - ab), rtol=1e-5)
    assert np.all(np.diff(np.asarray(s.alphas_cumprod)) < 0)
    # T is static metadata, not a leaf (so the schedule can be closed over or passed to jit)
    assert all(leaf.shape == (1000,) for leaf in jax.tree_util.tree_leaves(s))


def test_cosine_schedule_matches_formula():
    s = D.make_schedule(200, "cosine")
    betas, ab = ref_cosine(200)
    np.testing.assert_allclose(np.asarray(s.betas), betas, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(s.alphas_cumprod), ab, rtol=1e-5, atol=1e-9)
    assert float(np.max(np.asarray(s.betas))) <= 0.999 + 1e-7
    assert np.all(np.diff(np.asarray(s.alphas_cumprod)) <= 0)


def test_posterior_tables():
    s = D.make_schedule(100)
    betas, ab = ref_linear(100)
    ab_prev = np.concatenate([[1.0], ab[:-1]])
    np.testing.assert_allclose(np.asarray(s.posterior_var), betas * (1 - ab_prev) / (1 - ab), rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(float(s.posterior_c0[0]), 1.0, rtol=1e-6)
    assert float(s.posterior_var[0]) == 0.0 and float(s.posterior_ct[0]) == 0.0


def test_schedule_errors_and_config():
    with pytest.raises(ValueError, match="unknown kind"):
        D.make_schedule(100, "quadratic")
    with pytest.raises(ValueError, match="diffusion.T"):
        D.make_schedule(0)
    with pytest.raises(ValueError, match="diffusion.T"):
        D.make_schedule(10.5)
    with pytest.raises(ValueError, match="beta_start"):
        D.make_schedule(100, "linear", 0.02, 1e-4)
    cfg = ml_collections.ConfigDict({"T": 50, "schedule": "cosine", "beta_start": 1e-4, "beta_end": 0.02})
    s = D.schedule_from_config(cfg)
    np.testing.assert_allclose(np.asarray(s.betas), ref_cosine(50)[0], rtol=1e-5)
    with pytest.raises(ValueError, match="config.diffusion"):
        D.schedule_from_config(ml_collections.ConfigDict({"T": 50}))


# ----------------------------------------------------------------------------- noising


def test_q_sample_and_x0_from_eps():
    s = D.make_schedule(1000)
    _, ab = ref_linear(1000)
    x, n1, _ = data()
    t = np.array([0, 500, 999])
    xt = D.q_sample(s, jnp.asarray(x, jnp.float32), jnp.asarray(t), jnp.asarray(n1, jnp.float32))
    np.testing.assert_allclose(np.asarray(xt), ref_q(ab, x, t, n1), atol=1e-5)
    x0 = D.x0_from_eps(s, xt, jnp.asarray(t), jnp.asarray(n1, jnp.float32))
    np.testing.assert_allclose(np.asarray(x0), ref_x0(ab, np.asarray(xt, np.float64), t, n1), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(x0), x, atol=1e-3)  # round trip (t = 999 divides by ~0.006)
    # bf16 input is promoted, so the output is float32
    assert (
        D.q_sample(s, jnp.asarray(x, jnp.bfloat16), jnp.asarray(t), jnp.asarray(n1, jnp.bfloat16)).dtype == jnp.float32
    )


# ----------------------------------------------------------------------------- norm-guided one step


def test_norm_guided_each_step_matches_numpy():
    s = D.make_schedule(1000)
    _, ab = ref_linear(1000)
    net = LinearEps()
    x, n1, n2 = data(1)
    ts, tb, w = np.array([0, 150, 299]), np.array([300, 420, 650]), 0.7
    out = D.norm_guided_reconstruction(
        net.jax,
        s,
        jnp.asarray(x, jnp.float32),
        jnp.asarray(ts),
        jnp.asarray(tb),
        jnp.asarray(n1, jnp.float32),
        jnp.asarray(n2, jnp.float32),
        w=w,
    )
    # float64 reference of DiffusionAD's norm-guided one-step denoising, steps 1-6
    xs, xb = ref_q(ab, x, ts, n1), ref_q(ab, x, tb, n2)  # 1
    es, eb = net.np(xs, ts), net.np(xb, tb)  # 2
    x0b = np.clip(ref_x0(ab, xb, tb, eb), -1, 1)  # 3
    xg = ref_q(ab, x0b, ts, es)  # 4
    ehat = es - w * bcast(np.sqrt(1 - ab[ts])) * (xg - xs)  # 5
    recon = np.clip(ref_x0(ab, xs, ts, ehat), -1, 1)  # 6
    for key, ref in [
        ("x_small", xs),
        ("x_big", xb),
        ("eps_small", es),
        ("eps_big", eb),
        ("x0_big", x0b),
        ("x_guide", xg),
        ("eps_hat", ehat),
        ("recon", recon),
    ]:
        assert out[key].shape == (B, H, W, C) and out[key].dtype == jnp.float32, key
        np.testing.assert_allclose(np.asarray(out[key]), ref, atol=2e-4, err_msg=key)
    assert float(np.max(np.abs(recon))) <= 1.0


def test_norm_guided_oracle_returns_clean_image():
    s = D.make_schedule(1000)
    x, n1, n2 = data(2)
    x = jnp.asarray(x, jnp.float32)
    ts, tb = jnp.full((B,), 200, jnp.int32), jnp.full((B,), 400, jnp.int32)
    for fuse in (True, False):
        out = D.norm_guided_reconstruction(
            oracle(s, x), s, x, ts, tb, jnp.asarray(n1, jnp.float32), jnp.asarray(n2, jnp.float32), fuse_passes=fuse
        )
        np.testing.assert_allclose(np.asarray(out["recon"]), np.asarray(x), atol=1e-4)
        np.testing.assert_allclose(np.asarray(out["x_guide"]), np.asarray(out["x_small"]), atol=1e-4)


def test_fused_and_separate_passes_agree_and_jit():
    s = D.make_schedule(1000)
    net = LinearEps(3)
    nonlinear = lambda x, t: jnp.tanh(net.jax(x, t)) * 1.5  # noqa: E731
    x, n1, n2 = (jnp.asarray(a, jnp.float32) for a in data(3))
    k_s, k_b = jax.random.split(jax.random.PRNGKey(0))
    ts, tb = jax.random.randint(k_s, (B,), 0, 300), jax.random.randint(k_b, (B,), 300, 1000)
    calls = []

    def counting(x_, t_):
        calls.append(x_.shape[0])
        return nonlinear(x_, t_)

    fused = D.norm_guided_reconstruction(counting, s, x, ts, tb, n1, n2, fuse_passes=True)
    assert calls == [2 * B]
    calls.clear()
    separate = D.norm_guided_reconstruction(counting, s, x, ts, tb, n1, n2, fuse_passes=False)
    assert calls == [B, B]
    jitted = jax.jit(lambda x_, a, b_: D.norm_guided_reconstruction(nonlinear, s, x_, ts, tb, a, b_))(x, n1, n2)
    for key in fused:
        np.testing.assert_allclose(np.asarray(fused[key]), np.asarray(separate[key]), atol=1e-6, err_msg=key)
        np.testing.assert_allclose(np.asarray(jitted[key]), np.asarray(fused[key]), atol=1e-5, err_msg=key)


# ----------------------------------------------------------------------------- timesteps and randomness


def test_training_timesteps_cover_their_ranges():
    from diff_fastener_jax.training.train_step import example_noise

    keys = jax.random.split(jax.random.PRNGKey(1), 512)
    ts, tb, n1, n2 = example_noise(keys, (2, 2, 1), (0, 300), (300, 1000))
    assert ts.shape == tb.shape == (512,) and n1.shape == n2.shape == (512, 2, 2, 1)
    assert int(ts.min()) >= 0 and int(ts.max()) < 300 and int(tb.min()) >= 300 and int(tb.max()) < 1000
    assert len(np.unique(np.asarray(ts))) > 50  # actually random, not constant


def test_training_timestep_window_narrows_draws_to_the_inference_steps():
    from diff_fastener_jax.config_schema import base_config
    from diff_fastener_jax.training.train_step import example_noise, training_timestep_ranges

    d = base_config().diffusion  # tau 300, T 1000, eval steps 200 / 400
    assert training_timestep_ranges(d) == ((0, 300), (300, 1000))  # 0: the paper's ranges
    d.train_t_window = 50
    assert training_timestep_ranges(d) == ((150, 251), (350, 451))
    d.train_t_window = 150  # clipped to the paper's ranges: t_s below tau, t_b from tau on
    assert training_timestep_ranges(d) == ((50, 300), (300, 551))
    keys = jax.random.split(jax.random.PRNGKey(3), 2048)
    ts, tb, _, _ = example_noise(keys, (1, 1, 1), (150, 251), (350, 451))
    ts, tb = np.asarray(ts), np.asarray(tb)
    assert ts.min() == 150 and ts.max() == 250 and tb.min() == 350 and tb.max() == 450  # both ends reached
    assert len(np.unique(ts)) == 101 and len(np.unique(tb)) == 101


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"diffusion.train_t_window": -1}, "must be an integer >= 0"),
        (
            {"diffusion.train_t_window": 50, "diffusion.eval_t_small": 320, "diffusion.eval_t_big": 400},
            "needs eval_t_small < tau <= eval_t_big",
        ),
        ({"diffusion.train_t_window": 50, "infer.method": "ddim"}, "denoises through steps it never trains"),
    ],
)
def test_training_timestep_window_config_errors(overrides, match):
    from helpers import tiny_config

    from diff_fastener_jax import config as C

    with pytest.raises(C.ConfigError, match=match) as err:
        C.validate_config(tiny_config(**overrides), check_data=False)
    assert "diffusion.train_t_window" in str(err.value)


def test_per_example_noise_independent_of_batch_slot():
    key = jax.random.PRNGKey(42)
    step = 7
    keys4 = D.example_keys(key, step, jnp.arange(10, 14))  # global examples 10..13 as their own batch
    keys8 = D.example_keys(key, step, jnp.arange(6, 14))  # the same examples in slots 4..7 of a batch of 8
    assert keys4.shape == (4, 2)
    manual = jax.random.fold_in(jax.random.fold_in(key, step), 12)
    np.testing.assert_array_equal(np.asarray(keys4[2]), np.asarray(manual))
    n4 = D.per_example_normal(keys4, (H, W, C))
    n8 = D.per_example_normal(keys8, (H, W, C))
    assert n4.shape == (4, H, W, C)
    np.testing.assert_array_equal(np.asarray(n4), np.asarray(n8[4:]))
    assert not np.allclose(np.asarray(n4[0]), np.asarray(n4[1]))
    # a different step gives different noise
    other = D.per_example_normal(D.example_keys(key, step + 1, jnp.arange(10, 14)), (H, W, C))
    assert not np.allclose(np.asarray(other), np.asarray(n4))
    # typed keys work the same way
    typed = D.example_keys(jax.random.key(42), step, jnp.arange(10, 14))
    assert typed.shape == (4,)
    assert D.per_example_normal(typed, (2,)).shape == (4, 2)


# ----------------------------------------------------------------------------- iterative reconstruction


def test_ddim_timesteps():
    assert D.ddim_timesteps(100, 5).tolist() == [100, 75, 50, 25, 0]
    assert D.ddim_timesteps(7, 1).tolist() == [7]
    with pytest.raises(ValueError, match="num_steps"):
        D.ddim_timesteps(10, 0)


def test_ddim_and_ddpm_with_oracle_return_clean_image():
    s = D.make_schedule(1000)
    x, _, _ = data(4)
    x = jnp.asarray(x, jnp.float32)
    key = jax.random.PRNGKey(3)
    ddim = jax.jit(lambda x_, k: D.ddim_reconstruct(oracle(s, x_), s, x_, 300, 10, k))(x, key)
    np.testing.assert_allclose(np.asarray(ddim), np.asarray(x), atol=1e-4)
    ddpm = jax.jit(lambda x_, k: D.ddpm_reconstruct(oracle(s, x_), s, x_, 60, k))(x, key)
    np.testing.assert_allclose(np.asarray(ddpm), np.asarray(x), atol=1e-3)
    with pytest.raises(ValueError, match="t_start"):
        D.ddim_reconstruct(oracle(s, x), s, x, 1000, 4, key)


def test_iterative_reconstruction_ranges_and_per_example_keys():
    s = D.make_schedule(1000)
    net = LinearEps(5)
    x, _, _ = data(5, b=4)
    x = jnp.asarray(x, jnp.float32)
    key = jax.random.PRNGKey(0)
    ddpm = D.ddpm_reconstruct(net.jax, s, x, 20, key)
    ddim = D.ddim_reconstruct(net.jax, s, x, 200, 4, key)
    for r in (ddpm, ddim):
        assert r.shape == x.shape and bool(jnp.all(jnp.isfinite(r)))
        assert float(jnp.max(jnp.abs(r))) <= 1.0
    # per-example keys: example i's reconstruction does not depend on its batch neighbours
    keys = D.example_keys(key, 0, jnp.arange(4))
    full = D.ddpm_reconstruct(net.jax, s, x, 20, keys)
    part = D.ddpm_reconstruct(net.jax, s, x[2:], 20, keys[2:])
    np.testing.assert_allclose(np.asarray(full[2:]), np.asarray(part), atol=1e-6)
    full = D.ddim_reconstruct(net.jax, s, x, 200, 4, keys)
    part = D.ddim_reconstruct(net.jax, s, x[2:], 200, 4, keys[2:])
    np.testing.assert_allclose(np.asarray(full[2:]), np.asarray(part), atol=1e-6)


def test_recon_error_map():
    r = np.random.default_rng(6)
    x, y = r.uniform(-1, 1, size=(2, B, H, W, C))
    m = D.recon_error_map(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32))
    assert m.shape == (B, H, W)
    np.testing.assert_allclose(np.asarray(m), np.abs(x - y).mean(-1), atol=1e-6)
