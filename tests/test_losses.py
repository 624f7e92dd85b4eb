"""losses.py against hand-computed values and float64 numpy references."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diff_fastener_jax import diffusion as D
from diff_fastener_jax.training import losses as L

H, W, C = 4, 4, 3


def const(values, shape=(H, W, C), dtype=jnp.float32):
    """(B, *shape) with example i filled with values[i]."""
    v = np.asarray(values, np.float64).reshape((-1,) + (1,) * len(shape))
    return jnp.asarray(np.broadcast_to(v, (len(values),) + shape), dtype)


# ----------------------------------------------------------------------------- noise loss


def test_noise_loss_hand_values():
    es, eb = const([1.0, 2.0, 3.0, 4.0]), const([0.5, 0.0, -1.0, 2.0])
    zeros = jnp.zeros_like(es)
    # per example: MSE(es, 0) + MSE(eb, 0) = a^2 + b^2
    per = np.array([1.25, 4.0, 10.0, 20.0])
    mixed = L.noise_loss(es, zeros, eb, zeros, jnp.array([0.0, 1.0, 0.0, 1.0]))
    np.testing.assert_allclose(float(mixed), (per[0] + per[2]) / 2, rtol=1e-6)
    all_normal = L.noise_loss(es, zeros, eb, zeros, jnp.zeros(4))
    np.testing.assert_allclose(float(all_normal), per.mean(), rtol=1e-6)
    all_synth = L.noise_loss(es, zeros, eb, zeros, jnp.ones(4))
    assert float(all_synth) == 0.0
    g = jax.grad(lambda e: L.noise_loss(e, zeros, eb, zeros, jnp.ones(4)))(es)
    assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) == 0.0


def test_noise_loss_nonzero_targets_and_bf16():
    r = np.random.default_rng(0)
    es, n1, eb, n2 = r.normal(size=(4, 2, H, W, C))
    synth = np.array([1.0, 0.0])
    ref = ((es[1] - n1[1]) ** 2).mean() + ((eb[1] - n2[1]) ** 2).mean()
    out = L.noise_loss(*(jnp.asarray(a, jnp.float32) for a in (es, n1, eb, n2)), jnp.asarray(synth))
    np.testing.assert_allclose(float(out), ref, rtol=1e-5)
    bf = L.noise_loss(*(jnp.asarray(a, jnp.bfloat16) for a in (es, n1, eb, n2)), jnp.asarray(synth))
    assert bf.dtype == jnp.float32
    np.testing.assert_allclose(float(bf), ref, rtol=3e-2)


# ----------------------------------------------------------------------------- focal


def ref_focal(p, y, alpha, gamma, eps=1e-6):
    p, y = np.asarray(p, np.float64), np.asarray(y, np.float64)
    pt = p * y + (1 - p) * (1 - y)
    at = alpha * y + (1 - alpha) * (1 - y)
    return np.mean(-at * (1 - pt) ** gamma * np.log(np.clip(pt, eps, 1)))


def test_focal_hand_values():
    p = jnp.array([0.8, 0.3, 0.0, 1.0]).reshape(4, 1, 1, 1)
    y = jnp.array([1.0, 0.0, 1.0, 1.0]).reshape(4, 1, 1, 1)
    # alpha = 0.25: alpha_t = 0.25 for y = 1, 0.75 for y = 0
    hand = [
        0.25 * 0.2**4 * -math.log(0.8),
        0.75 * 0.3**4 * -math.log(0.7),
        0.25 * 1.0 * -math.log(1e-6),  # p = 0, y = 1: clipped, finite
        0.0,
    ]  # p = 1, y = 1: perfect
    out = L.focal_loss(p, y, alpha=0.25, gamma=4.0)
    np.testing.assert_allclose(float(out), np.mean(hand), rtol=1e-5)
    # defaults alpha 0.5, gamma 4
    np.testing.assert_allclose(float(L.focal_loss(p, y)), ref_focal(p, y, 0.5, 4.0), rtol=1e-5)


def test_focal_finite_at_saturation():
    p = jnp.array([0.0, 1.0, 0.0, 1.0]).reshape(4, 1, 1, 1)
    y = jnp.array([0.0, 0.0, 1.0, 1.0]).reshape(4, 1, 1, 1)
    val, g = jax.value_and_grad(lambda q: L.focal_loss(q, y))(p)
    assert bool(jnp.isfinite(val)) and bool(jnp.all(jnp.isfinite(g)))
    np.testing.assert_allclose(float(val), 2 * 0.5 * -math.log(1e-6) / 4, rtol=1e-5)
    z = jnp.array([-100.0, 100.0, -100.0, 100.0]).reshape(4, 1, 1, 1)
    val, g = jax.value_and_grad(lambda q: L.focal_loss_from_logits(q, y))(z)
    assert bool(jnp.isfinite(val)) and bool(jnp.all(jnp.isfinite(g)))
    np.testing.assert_allclose(float(val), 2 * 0.5 * 100.0 / 4, rtol=1e-5)  # -log sigmoid(-100) = 100


def test_focal_from_logits_agrees_with_probabilities():
    r = np.random.default_rng(1)
    z = r.uniform(-6, 6, size=(2, 8, 8, 1))
    hard = (r.uniform(size=z.shape) < 0.3).astype(np.float64)
    soft = r.uniform(size=z.shape)
    p = 1 / (1 + np.exp(-z))
    for y in (hard, soft):
        for alpha, gamma in ((0.5, 4.0), (0.25, 2.0)):
            a = L.focal_loss_from_logits(jnp.asarray(z, jnp.float32), jnp.asarray(y, jnp.float32), alpha, gamma)
            b = L.focal_loss(jnp.asarray(p, jnp.float32), jnp.asarray(y, jnp.float32), alpha, gamma)
            np.testing.assert_allclose(float(a), ref_focal(p, y, alpha, gamma), rtol=1e-4)
            np.testing.assert_allclose(float(a), float(b), rtol=1e-4)
    g = jax.grad(lambda q: L.focal_loss_from_logits(q, jnp.asarray(hard, jnp.float32)))(jnp.asarray(z, jnp.float32))
    assert bool(jnp.all(jnp.isfinite(g)))


# ----------------------------------------------------------------------------- smooth L1


def test_smooth_l1_both_branches():
    pred = jnp.array([0.5, 2.0, -0.2, 1.0])
    zero = jnp.zeros(4)
    # beta 1: |d| = 0.5 -> 0.125 (quadratic); 2 -> 1.5 (linear); 0.2 -> 0.02; 1 -> 0.5 (boundary, linear)
    np.testing.assert_allclose(float(L.smooth_l1_loss(pred, zero)), np.mean([0.125, 1.5, 0.02, 0.5]), rtol=1e-6)
    # beta 0.5: 0.5 -> 0.25; 2 -> 1.75; 0.2 -> 0.5*0.04/0.5 = 0.04; 1 -> 0.75
    np.testing.assert_allclose(
        float(L.smooth_l1_loss(pred, zero, beta=0.5)), np.mean([0.25, 1.75, 0.04, 0.75]), rtol=1e-6
    )
    np.testing.assert_allclose(float(L.smooth_l1_loss(pred, zero, beta=0.0)), np.mean([0.5, 2.0, 0.2, 1.0]), rtol=1e-6)
    with pytest.raises(ValueError, match="smoothl1_beta"):
        L.smooth_l1_loss(pred, zero, beta=-1.0)


def test_anomaly_oriented_target_recovers_clean_image():
    s = D.make_schedule(1000)
    ab = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    r = np.random.default_rng(2)
    clean = r.uniform(-0.8, 0.8, size=(3, H, W, C))
    mask = (r.uniform(size=(3, H, W, 1)) < 0.4).astype(np.float64)
    anom = clean + mask * r.uniform(-0.5, 0.5, size=(3, H, W, C))  # anomaly only inside the mask
    eps = r.normal(size=clean.shape)
    t = np.array([5, 250, 700])
    f = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    target = L.anomaly_oriented_noise_target(s, f(eps), f(anom), f(clean), jnp.asarray(t))
    ref = eps + (np.sqrt(ab[t]) / np.sqrt(1 - ab[t]))[:, None, None, None] * (anom - clean)
    np.testing.assert_allclose(np.asarray(target), ref, rtol=1e-4, atol=1e-4)
    # the point of eq. 10: one x0 step from the noised anomalous image with this target gives the clean one
    xt = D.q_sample(s, f(anom), jnp.asarray(t), f(eps))
    np.testing.assert_allclose(np.asarray(D.x0_from_eps(s, xt, jnp.asarray(t), target)), clean, atol=1e-4)
    # outside the anomaly the target is the plain noise; with the mask it is the same here
    np.testing.assert_allclose(
        np.asarray(target)[np.broadcast_to(mask, eps.shape) == 0], eps[np.broadcast_to(mask, eps.shape) == 0], atol=1e-5
    )
    masked = L.anomaly_oriented_noise_target(s, f(eps), f(anom), f(clean), jnp.asarray(t), f(mask))
    np.testing.assert_allclose(np.asarray(masked), np.asarray(target), atol=1e-5)


def test_anomaly_oriented_noise_loss():
    s = D.make_schedule(1000)
    ab = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    r = np.random.default_rng(3)
    clean = r.uniform(-0.8, 0.8, size=(4, H, W, C))
    image = clean.copy()
    image[1] += 0.3
    image[3] -= 0.2
    synth = np.array([0.0, 1.0, 0.0, 1.0])
    garbage_clean = clean.copy()
    garbage_clean[0] += 5.0  # a normal row's 'clean' must not matter
    n1, n2, es, eb = r.normal(size=(4, 4, H, W, C))
    ts, tb = np.array([10, 100, 200, 290]), np.array([300, 500, 700, 900])
    f = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    batch = {"image": f(image), "clean": f(garbage_clean), "is_synthetic": f(synth)}
    out = {"eps_small": f(es), "eps_big": f(eb)}
    loss = L.anomaly_oriented_noise_loss(s, out, f(n1), f(n2), batch, jnp.asarray(ts), jnp.asarray(tb))
    k = lambda t: (np.sqrt(ab[t]) / np.sqrt(1 - ab[t]))[:, None, None, None] * synth[:, None, None, None]  # noqa: E731
    tgt_s, tgt_b = n1 + k(ts) * (image - clean), n2 + k(tb) * (image - clean)
    ref = np.mean(((es - tgt_s) ** 2).mean((1, 2, 3)) + ((eb - tgt_b) ** 2).mean((1, 2, 3)))
    np.testing.assert_allclose(float(loss), ref, rtol=1e-4)
    # a network predicting exactly the targets has zero loss
    perfect = {"eps_small": f(tgt_s), "eps_big": f(tgt_b)}
    assert (
        float(L.anomaly_oriented_noise_loss(s, perfect, f(n1), f(n2), batch, jnp.asarray(ts), jnp.asarray(tb))) < 1e-8
    )
    # with no synthetic rows it reduces to the ordinary noise loss
    normal_batch = dict(batch, is_synthetic=jnp.zeros(4))
    np.testing.assert_allclose(
        float(L.anomaly_oriented_noise_loss(s, out, f(n1), f(n2), normal_batch, jnp.asarray(ts), jnp.asarray(tb))),
        float(L.noise_loss(f(es), f(n1), f(eb), f(n2), jnp.zeros(4))),
        rtol=1e-6,
    )
    with pytest.raises(KeyError, match="clean"):
        L.anomaly_oriented_noise_loss(
            s, out, f(n1), f(n2), {"image": f(image), "is_synthetic": f(synth)}, jnp.asarray(ts), jnp.asarray(tb)
        )


def test_losses_jit():
    r = np.random.default_rng(4)
    z = jnp.asarray(r.normal(size=(2, 8, 8, 1)), jnp.float32)
    y = jnp.asarray(r.uniform(size=(2, 8, 8, 1)) < 0.5, jnp.float32)
    e = jnp.asarray(r.normal(size=(4, 2, H, W, C)), jnp.float32)
    synth = jnp.array([0.0, 1.0])

    @jax.jit
    def all_terms(z, y, e):
        terms = {
            "noise": L.noise_loss(e[0], e[1], e[2], e[3], synth),
            "focal": L.focal_loss_from_logits(z, y),
            "smoothl1": L.smooth_l1_loss(jax.nn.sigmoid(z), y),
        }
        return terms["noise"] + 5.0 * terms["focal"] + terms["smoothl1"], terms

    total, parts = all_terms(z, y, e)
    np.testing.assert_allclose(float(total), float(parts["noise"] + 5 * parts["focal"] + parts["smoothl1"]), rtol=1e-6)
    np.testing.assert_allclose(float(jax.jit(L.focal_loss)(jax.nn.sigmoid(z), y)), float(parts["focal"]), rtol=1e-4)
