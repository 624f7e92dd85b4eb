"""GLAD's adaptive denoising step (`diffusion.adaptive_reconstruct`, `infer.method='adaptive'`).

The batched program is checked against a per-image float64 numpy loop that follows seed 003 §3.3-3.4
step by step, with a denoiser known in closed form: the exact posterior mean E[x0 | x_t] when normal
images are a template plus small Gaussian variation. Like a trained model, it keeps a departure from
normal at small t and removes it at large t, which is what makes the stop step grow with the anomaly
(a 6-step smoke model has not learned what normal looks like, so it cannot show that).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import perturbed, tiny_config

from diff_fastener_jax import diffusion
from diff_fastener_jax.inference import make_infer_fn
from diff_fastener_jax.models import init_params

H = W = 16
T_MAX, STEPS, DELTA, MARGIN, GAIN, TOP_K = 900, 10, 0.008, 1, 5.0, 8


def _template():
    yy, xx = np.mgrid[0:H, 0:W] / (H - 1)
    return np.stack([0.4 * np.sin(3 * xx) * np.cos(2 * yy), 0.3 * xx - 0.2, 0.2 * yy], -1)  # (H, W, 3)


SIGMA = 0.3  # the prior's spread around the template


def _posterior_x0(x_t, ab, template, sqrt=np.sqrt):
    """E[x0 | x_t] under x0 ~ N(template, SIGMA² I): the exact denoiser for that prior."""
    return template + sqrt(ab) * SIGMA**2 / (ab * SIGMA**2 + 1 - ab) * (x_t - sqrt(ab) * template)


def _eps_fn_np(sched, template):
    ab_table = np.asarray(sched.alphas_cumprod, np.float64)

    def eps(x_t, t):  # x_t (B, H, W, C) float64, t (B,) int
        ab = ab_table[t][:, None, None, None]
        return (x_t - np.sqrt(ab) * _posterior_x0(x_t, ab, template)) / np.sqrt(1 - ab)

    return eps


def _eps_fn_jax(sched, template):
    template = jnp.asarray(template, jnp.float32)

    def eps(x_t, t):
        ab = sched.alphas_cumprod[t][:, None, None, None]
        return (x_t - jnp.sqrt(ab) * _posterior_x0(x_t, ab, template, jnp.sqrt)) / jnp.sqrt(1 - ab)

    return eps


def _top_k_np(d, k=TOP_K):
    return np.sort(d.reshape(-1))[-k:].mean()


def _reference_one_image(eps, sched, x, noise):
    """Seed 003 §3.3-3.4 for ONE image, float64, with an explicit early exit."""
    ab_t = np.asarray(sched.alphas_cumprod, np.float64)
    times = diffusion.ddim_timesteps(T_MAX, STEPS)
    ab_next = [ab_t[t] for t in times[1:]] + [1.0]

    def x0_of(x_t, t):
        e = eps(x_t[None], np.array([t]))[0]
        x0 = np.clip((x_t - np.sqrt(1 - ab_t[t]) * e) / np.sqrt(ab_t[t]), -1, 1)
        return x0, (x_t - np.sqrt(ab_t[t]) * x0) / np.sqrt(1 - ab_t[t])

    def noised(t):
        return np.sqrt(ab_t[t]) * x + np.sqrt(1 - ab_t[t]) * noise

    x_hat, stop, scores = noised(T_MAX), len(times) - 1, []
    for i, t in enumerate(times):  # detection: denoise from t_max, compare noise-free estimates
        x0_hat, e_hat = x0_of(x_hat, t)
        x0_in, _ = x0_of(noised(t), t)
        d = np.abs(x0_hat - x0_in).mean(-1) / 2
        scores.append(_top_k_np(d))
        if scores[-1] > DELTA:
            stop = i
            break
        x_hat = np.sqrt(ab_next[i]) * x0_hat + np.sqrt(1 - ab_next[i]) * e_hat
    d_stop, x0_in_stop = d, x0_in
    start = max(stop - MARGIN, 0)
    m = 1 / (1 + np.exp(-GAIN * (d_stop / DELTA - 1)))[..., None]
    y = noised(times[start])
    for i in range(start, len(times)):  # reconstruction from t + n, fused at t (eq. 6-7)
        x0, e = x0_of(y, times[i])
        if i == stop:
            x0, e = m * x0 + (1 - m) * x0_in_stop, noise
        y = np.sqrt(ab_next[i]) * x0 + np.sqrt(1 - ab_next[i]) * e
    return np.clip(y, -1, 1), int(times[start]), int(times[stop]), scores


AMPLITUDES = (0.0, 0.15, 0.3, 0.6, 1.2)


def _images_with_growing_anomalies(template):
    """The template with a 6x6 square brightened by each amplitude (none for the first)."""
    images = []
    for a in AMPLITUDES:
        x = template.copy()
        x[4:10, 5:11] = np.clip(x[4:10, 5:11] + a, -1, 1)
        images.append(x)
    return np.stack(images)


def test_adaptive_matches_a_per_image_float64_reference_and_grows_with_the_anomaly():
    sched = diffusion.make_schedule()
    template = _template()
    images = _images_with_growing_anomalies(template)  # (5, H, W, 3)
    noise = np.random.default_rng(0).standard_normal((1, H, W, 3)).repeat(len(images), 0)  # the model's one noise
    out = jax.jit(
        lambda x, n: diffusion.adaptive_reconstruct(
            _eps_fn_jax(sched, template),
            sched,
            x,
            n,
            t_max=T_MAX,
            num_steps=STEPS,
            delta=DELTA,
            margin=MARGIN,
            fusion_gain=GAIN,
            score_fn=lambda d: jnp.mean(jax.lax.top_k(d.reshape(d.shape[0], -1), TOP_K)[0], -1),
        )
    )(jnp.asarray(images, jnp.float32), jnp.asarray(noise, jnp.float32))
    eps_np = _eps_fn_np(sched, template)
    starts, stops = [], []
    for i in range(len(images)):
        recon, start, stop, scores = _reference_one_image(eps_np, sched, images[i], noise[i])
        starts.append(start), stops.append(stop)
        np.testing.assert_allclose(np.asarray(out["recon"][i]), recon, atol=2e-4)
        np.testing.assert_allclose(np.asarray(out["step_scores"][i, : len(scores)]), scores, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(out["start_step"]), starts)
    np.testing.assert_array_equal(np.asarray(out["stop_step"]), stops)
    # GLAD's observation: the stronger the anomaly, the larger the step it needs (and gets).
    assert stops == sorted(stops) and len(set(stops)) >= 3 and stops[0] < stops[-1], stops
    assert all(s - t == 100 * MARGIN for s, t in zip(starts, stops)), (starts, stops)  # grid spacing 100
    # The strongest anomaly is reconstructed toward the template, far from the input's bright square.
    big, recon = images[-1], np.asarray(out["recon"][-1])
    assert np.abs(recon - template)[4:10, 5:11].mean() < 0.5 * np.abs(big - template)[4:10, 5:11].mean()


def test_adaptive_refuses_bad_settings():
    sched = diffusion.make_schedule()
    x = jnp.zeros((1, H, W, 3))
    kwargs = dict(num_steps=STEPS, delta=DELTA, fusion_gain=GAIN, score_fn=lambda d: d.mean((1, 2)))
    with pytest.raises(ValueError, match="t_start"):
        diffusion.adaptive_reconstruct(lambda x, t: x, sched, x, x, t_max=1000, margin=1, **kwargs)
    with pytest.raises(ValueError, match="margin"):
        diffusion.adaptive_reconstruct(lambda x, t: x, sched, x, x, t_max=900, margin=-1, **kwargs)


def test_adaptive_infer_program_reports_each_images_step_and_is_batch_independent():
    config = tiny_config(
        **{"infer.method": "adaptive", "infer.ddim_steps": 4, "infer.adaptive_t_max": 600, "infer.adaptive_delta": 0.02}
    )
    # Perturbed: the zero-initialised output layers would give eps = 0.
    params = perturbed(init_params(config, jax.random.key(0)), 1)
    rng = np.random.default_rng(0)
    images = np.clip(rng.normal(0, 0.3, (3, 32, 32, 3)), -1, 1).astype(np.float32)
    images[2, 4:28, 4:28] = 1.0  # a large anomaly
    infer = make_infer_fn(config)
    out = infer(params, jnp.asarray(images))
    steps = np.asarray(out.denoise_step)
    assert steps.dtype == np.int32 and set(steps.tolist()) <= set(diffusion.ddim_timesteps(600, 4).tolist())
    for i in range(3):
        one = infer(params, jnp.asarray(images[i : i + 1]))
        assert int(one.denoise_step[0]) == steps[i]
        np.testing.assert_allclose(np.asarray(one.score)[0], np.asarray(out.score)[i], rtol=1e-5, atol=1e-6)


def test_evaluate_with_adaptive_steps_writes_each_images_step(smoke_run, tmp_path):
    """`evaluate --config.infer.method=adaptive`: scores.csv gets each image's step, metrics and the report
    the mean step per defect type."""
    import csv
    import json

    from diff_fastener_jax.evaluation import evaluate
    from diff_fastener_jax.training.run_loading import load_run_config, load_run_params

    config = load_run_config(
        smoke_run, {"infer.method": "adaptive", "infer.ddim_steps": "3", "infer.adaptive_t_max": "600"}
    )
    params, _ = load_run_params(smoke_run, config)
    out = tmp_path / "eval"
    evaluate.evaluate_run(config, params, str(out), show_progress=False)
    rows = list(csv.DictReader(open(out / "scores.csv")))
    grid = set(diffusion.ddim_timesteps(600, 3).tolist())
    assert rows and all(int(r["denoise_step"]) in grid for r in rows)
    means = json.load(open(out / "metrics.json"))["denoise_step_mean"]
    for defect in {r["defect"] for r in rows}:
        steps = [int(r["denoise_step"]) for r in rows if r["defect"] == defect]
        assert means[defect] == pytest.approx(np.mean(steps))
    assert "Adaptive denoising (GLAD)" in open(out / "report.html").read()
