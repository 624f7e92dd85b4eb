"""Networks: pinned parameter counts, shapes, Sparse-Skip savings, DACM, zero init, bf16."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import ROOT, TWO_LEVELS, perturbed, tiny_config

from diff_fastener_jax.config import load_config
from diff_fastener_jax.models import DACM, build_models, count_params, init_params, kept_skips
from diff_fastener_jax.models.__main__ import model_summary


def _abstract_param_counts(config, size=256):
    recon, seg = build_models(config)
    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    xs = jax.ShapeDtypeStruct((1, size, size, 6), jnp.float32)
    pr = jax.eval_shape(recon.init, jax.random.key(0), x, t)
    ps = jax.eval_shape(seg.init, jax.random.key(0), xs)
    return count_params(pr), count_params(ps)


def test_dense_reference_matches_published_parameter_counts():
    config = load_config(f"{ROOT}/configs/dense_reference.py")
    n_recon, n_seg = _abstract_param_counts(config)
    assert abs(n_recon / 131.65e6 - 1) < 0.01, n_recon
    assert abs(n_seg / 28.37e6 - 1) < 0.01, n_seg
    # Exact pins: any change to the wiring shows up here.
    assert n_recon == 131_654_403
    assert n_seg == 28_373_569


def test_paper_config_pinned_and_smaller_than_dense():
    n_recon, n_seg = _abstract_param_counts(load_config(f"{ROOT}/configs/default.py"))
    assert n_recon == 120_537_701
    assert n_seg == 28_373_569


def test_kept_skips_pattern():
    assert kept_skips(6, 2, 1) == (True,) * 18
    kept = kept_skips(6, 2, 3)
    assert sum(kept) == 6 and kept[2] and kept[17] and not kept[0]
    with pytest.raises(ValueError, match="skip_every"):
        kept_skips(6, 2, 0)


def test_sparse_skip_saves_params_and_flops():
    dense = tiny_config(**{"model.skip_every": 1})
    sparse = tiny_config(**{"model.skip_every": 2})
    s_dense, s_sparse = model_summary(dense), model_summary(sparse)
    assert s_sparse["params_recon"] < s_dense["params_recon"]
    assert s_sparse["gflops_recon"] < s_dense["gflops_recon"]
    assert s_sparse["params_seg"] == s_dense["params_seg"]


@pytest.mark.parametrize("size", [32, 64])
def test_output_shapes_and_resolution_independent_params(size):
    config = tiny_config(**TWO_LEVELS)  # with down- and up-sampling
    recon, seg = build_models(config)
    params = init_params(config, jax.random.key(0))  # built at data.image_size = 32
    # Each forward is one jitted program: op by op, every op would be its own small XLA compile.
    x = jax.random.normal(jax.random.key(1), (1, size, size, 3))
    eps = jax.jit(recon.apply)({"params": params["recon"]}, x, jnp.array([700]))
    assert eps.shape == (1, size, size, 3) and eps.dtype == jnp.float32
    prob = jax.jit(seg.apply)({"params": params["seg"]}, jnp.concatenate([x, x], -1))
    assert prob.shape == (1, size, size, 1)
    assert bool(jnp.all((prob >= 0) & (prob <= 1)))
    # Params initialised at this size have the same count as at 32 px (shapes only: nothing runs).
    at_size = jax.eval_shape(lambda k: init_params(config, k, image_size=size), jax.random.key(0))
    assert count_params(at_size) == count_params(params)


def test_compiled_init_matches_eager_init_bit_for_bit():
    # GPUs initialise through one jitted program (init_params, create_train_state); it must draw the same
    # parameters.
    from diff_fastener_jax.training.train_step import create_train_state

    config = tiny_config(**{"optim.ema_decay": 0.99})
    eager = create_train_state(config, jax.random.key(3), compiled=False)
    compiled = create_train_state(config, jax.random.key(3), compiled=True)
    params = init_params(config, jax.random.key(3), compiled=True)
    assert jax.tree_util.tree_structure(eager) == jax.tree_util.tree_structure(compiled)
    pairs = list(zip(jax.tree_util.tree_leaves(eager), jax.tree_util.tree_leaves(compiled)))
    pairs += list(zip(jax.tree_util.tree_leaves(eager.params), jax.tree_util.tree_leaves(params)))
    for a, b in pairs:
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert count_params(eager.params) > 0 and count_params(eager.ema_params) == count_params(eager.params)


def test_initialisation_compiles_with_the_init_options_outside_a_trace(monkeypatch):
    """init_params at top level is one jitted program that carries xla_options.init_compiler_options
    (an option XLA does not know proves they reach the compiler); inside a trace it is traced inline,
    where a nested jit could not carry them."""
    from diff_fastener_jax.perf import xla_options

    config = tiny_config()
    monkeypatch.setattr(xla_options, "init_compiler_options", lambda backend=None: {"xla_dfj_not_an_option": True})
    with pytest.raises(jax.errors.JaxRuntimeError, match="xla_dfj_not_an_option"):
        init_params(config, jax.random.key(0))
    # Inside an enclosing jit a nested jit with compiler options is a ValueError: lowering (which
    # compiles nothing) passes only because the initialisation is traced inline there.
    jax.jit(lambda k: init_params(config, k)).lower(jax.random.key(0))
    shapes = jax.eval_shape(lambda k: init_params(config, k), jax.random.key(0))
    monkeypatch.undo()
    assert count_params(shapes) == count_params(init_params(config, jax.random.key(0))) > 0
    assert xla_options.init_compiler_options("cpu") == {"xla_backend_optimization_level": 1}
    assert xla_options.init_compiler_options("gpu") is None


def test_fresh_unet_predicts_exactly_zero():
    config = tiny_config()
    recon, _ = build_models(config)
    params = init_params(config, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    eps = jax.jit(recon.apply)({"params": params["recon"]}, x, jnp.array([0, 999]))
    assert float(jnp.max(jnp.abs(eps))) == 0.0


def test_seg_head_prior_sets_the_initial_probability():
    """model.seg_head_prior: the fresh segmentation net's per-pixel probability, same parameters."""
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 6))

    def fresh(prior):
        config = tiny_config(**{"model.seg_head_prior": prior})
        params = init_params(config, jax.random.key(0))["seg"]
        return params, np.asarray(jax.jit(build_models(config)[1].apply)({"params": params}, x))

    p_half, prob_half = fresh(0.5)
    p_low, prob_low = fresh(0.01)
    np.testing.assert_allclose(p_low["head"]["bias"], np.log(0.01 / 0.99), rtol=1e-6)
    assert float(np.max(np.abs(p_half["head"]["bias"]))) == 0.0  # the paper's zero bias
    assert jax.tree_util.tree_structure(p_half) == jax.tree_util.tree_structure(p_low)
    assert 0.3 < float(np.median(prob_half)) < 0.7
    assert 0.002 < float(np.median(prob_low)) < 0.05


def test_bf16_compute_float32_params():
    config = tiny_config(**{"model.dtype": "bfloat16"})
    recon, seg = build_models(config)
    params = init_params(config, jax.random.key(0))
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    # Perturb the zero-init output conv so the output is non-trivial.
    params["recon"]["out_conv"]["kernel"] = 0.01 * jnp.ones_like(params["recon"]["out_conv"]["kernel"])
    eps_bf16 = jax.jit(recon.apply)({"params": params["recon"]}, x, jnp.array([5, 500]))
    recon32, _ = build_models(tiny_config())
    eps_f32 = jax.jit(recon32.apply)({"params": params["recon"]}, x, jnp.array([5, 500]))
    assert eps_bf16.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(eps_bf16)))
    np.testing.assert_allclose(eps_bf16, eps_f32, atol=0.05 * float(jnp.max(jnp.abs(eps_f32))) + 1e-3)
    prob = jax.jit(seg.apply)({"params": params["seg"]}, jnp.concatenate([x, x], -1))
    assert prob.dtype == jnp.float32 and prob.shape == (2, 32, 32, 1)


def test_dacm_keeps_shape_and_switches():
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 32))
    for cbam, dil in [(True, True), (True, False), (False, True)]:
        m = DACM(use_cbam=cbam, use_dilated=dil, reduction=4, groups=8)
        p = m.init(jax.random.key(1), x)
        assert m.apply(p, x).shape == x.shape
        assert ("channel_attention" in p["params"]) == cbam
        assert ("dilated_conv" in p["params"]) == dil
    ident = DACM(use_cbam=False, use_dilated=False)
    assert bool(jnp.all(ident.apply(ident.init(jax.random.key(1), x), x) == x))


def test_dacm_conv_has_dilation_two():
    """An impulse through the dilated conv touches only offsets in {-2, 0, 2}^2."""
    m = DACM(use_cbam=False, use_dilated=True, groups=1)
    x = jnp.zeros((1, 11, 11, 4)).at[0, 5, 5, :].set(1.0)
    p = m.init(jax.random.key(0), x)
    _, state = m.apply(p, x, capture_intermediates=True, mutable=["intermediates"])
    y = state["intermediates"]["dilated_conv"]["__call__"][0]  # (1, 11, 11, C)
    response = np.abs(np.asarray(y - p["params"]["dilated_conv"]["bias"])).sum(-1)[0]
    rows, cols = np.nonzero(response > 1e-7)
    offsets = set(zip((rows - 5).tolist(), (cols - 5).tolist()))
    assert offsets == {(i, j) for i in (-2, 0, 2) for j in (-2, 0, 2)}


def test_the_activations_match_float64_references():
    """'gelu' is x * Phi(x) with Phi the normal CDF (erf form); 'gelu_tanh' its tanh form, within 5e-4 of
    it everywhere (largest near |x| = 2), so a model may swap one for the other."""
    from math import erf, sqrt, tanh

    from diff_fastener_jax.models.layers import get_activation

    x = np.linspace(-8.0, 8.0, 4001)
    exact = np.array([v * 0.5 * (1.0 + erf(v / sqrt(2.0))) for v in x])
    tanh_form = np.array([0.5 * v * (1.0 + tanh(sqrt(2.0 / np.pi) * (v + 0.044715 * v**3))) for v in x])
    np.testing.assert_allclose(np.asarray(get_activation("gelu")(jnp.asarray(x, jnp.float32))), exact, atol=2e-6)
    got = np.asarray(get_activation("gelu_tanh")(jnp.asarray(x, jnp.float32)))
    np.testing.assert_allclose(got, tanh_form, atol=2e-6)
    assert 1e-4 < np.max(np.abs(tanh_form - exact)) < 5e-4
    # the backward pass: d/dx x Phi(x) = Phi(x) + x phi(x)
    slope = np.array([0.5 * (1.0 + erf(v / sqrt(2.0))) + v * np.exp(-0.5 * v * v) / sqrt(2.0 * np.pi) for v in x])
    grad = jax.vmap(jax.grad(get_activation("gelu")))(jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(np.asarray(grad), slope, atol=2e-6)
    # a bfloat16 activation stays bfloat16 (the GPU compute dtype)
    assert get_activation("gelu")(jnp.ones((2,), jnp.bfloat16)).dtype == jnp.bfloat16


def test_bad_sizes_raise_clear_errors():
    config = tiny_config(**TWO_LEVELS)  # the image side must divide by 2
    recon, _ = build_models(config)
    params = init_params(config, jax.random.key(0))
    with pytest.raises(ValueError, match="divisible"):
        recon.apply({"params": params["recon"]}, jnp.zeros((1, 33, 33, 3)), jnp.zeros((1,), jnp.int32))
    with pytest.raises(ValueError, match="model.activation"):
        build_models(tiny_config(**{"model.activation": "tanh"}))[0].init(
            jax.random.key(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1,), jnp.int32)
        )


def test_remat_blocks_keeps_params_and_gradients():
    """model.remat='blocks' recomputes inside blocks: same parameter tree, same loss, same gradients,
    much less planned memory."""
    from diff_fastener_jax.training.train_step import make_loss_fn

    # 8 px and 32 channels, so that the blocks' activations, not the attention logits, fill the memory:
    # at the smoke model's 32 px the middle attention's 1024 x 1024 logits, which its own backward pass
    # needs, are most of it and remat saves 4% (73.9 -> 70.6 MiB; 16 px: 22%).
    plain = tiny_config(**{"data.image_size": 8, "model.base_channels": 32})
    remat = tiny_config(**{"data.image_size": 8, "model.base_channels": 32, "model.remat": "blocks"})
    params = init_params(plain, jax.random.key(0))
    p_remat = jax.eval_shape(lambda k: init_params(remat, k), jax.random.key(0))  # traced only: no compile
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(p_remat)
    assert [p.shape for p in jax.tree_util.tree_leaves(params)] == [p.shape for p in jax.tree_util.tree_leaves(p_remat)]
    # Non-zero output layers, so every block's gradient is non-trivial.
    params = perturbed(params, 1)
    b, s = 2, plain.data.image_size
    rng = np.random.default_rng(0)
    batch = {
        "image": jnp.asarray(rng.uniform(-1, 1, (b, s, s, 3)), jnp.float32),
        "mask": jnp.asarray(rng.uniform(size=(b, s, s, 1)) > 0.9, jnp.float32),
        "is_synthetic": jnp.asarray([0.0, 1.0]),
    }
    t = jnp.array([10, 100], jnp.int32)
    n1, n2 = jax.random.normal(jax.random.key(5), (2, b, s, s, 3))

    def grads(config):
        loss_fn = make_loss_fn(config)
        compiled = (
            jax.jit(jax.value_and_grad(lambda p: loss_fn(p, batch, t, t + 300, n1, n2, jax.random.key(0))[0]))
            .lower(params)
            .compile()
        )
        return compiled(params), compiled.memory_analysis().temp_size_in_bytes

    ((l_plain, g_plain), temp_plain), ((l_remat, g_remat), temp_remat) = grads(plain), grads(remat)
    np.testing.assert_allclose(l_remat, l_plain, rtol=1e-5)
    for a, r in zip(jax.tree_util.tree_leaves(g_plain), jax.tree_util.tree_leaves(g_remat)):
        np.testing.assert_allclose(r, a, rtol=1e-4, atol=1e-6)
    # And XLA plans less memory for it: every block's recomputation waits for that block's output
    # gradient. (2.10 MiB without, 0.81 MiB with at these 8 px and 32 channels. On the two-level smoke
    # model, plain nn.remat plans 47.7 MiB against 45.7 MiB without remat, and this 20.4 MiB.)
    assert temp_remat < 0.6 * temp_plain, (temp_remat, temp_plain)


def test_attention_kernel_choice():
    from diff_fastener_jax.models.backend import attention_kernel

    assert attention_kernel("auto", jnp.bfloat16, (64, 128), backend="gpu") == "cudnn"
    assert attention_kernel("auto", jnp.float32, (64,), backend="gpu") is None  # cuDNN: 16-bit only
    assert attention_kernel("auto", jnp.bfloat16, (64, 256), backend="gpu") is None  # head dim > 128
    assert attention_kernel("auto", jnp.bfloat16, (64,), backend="cpu") is None
    assert attention_kernel("xla", jnp.bfloat16, (64,), backend="gpu") is None
    assert attention_kernel("cudnn", jnp.bfloat16, (64,), backend="cpu") == "cudnn"
    with pytest.raises(ValueError, match="model.attention"):
        attention_kernel("flash", jnp.bfloat16, (64,))
    with pytest.raises(ValueError, match="model.remat"):
        build_models(tiny_config(**{"model.remat": "all"}))[0].init(
            jax.random.key(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1,), jnp.int32)
        )


def test_auto_dtype_is_float32_on_cpu_and_bfloat16_on_gpu():
    from diff_fastener_jax.models import resolve_dtype_name

    assert resolve_dtype_name("auto", backend="cpu") == "float32"
    assert resolve_dtype_name("auto", backend="gpu") == "bfloat16"
    assert resolve_dtype_name("float32", backend="gpu") == "float32"
    with pytest.raises(ValueError, match="model.dtype"):
        resolve_dtype_name("int8")


def test_implementations_are_resolved_once_per_backend_with_the_environment_overrides():
    from diff_fastener_jax.models.backend import CPU_CHUNK_BYTES, resolve_implementations

    config = tiny_config(**{"model.dtype": "auto"})
    cpu = resolve_implementations(config, "cpu", environ={})
    assert (
        cpu.dtype,
        cpu.groupnorm,
        cpu.upsample_conv,
        cpu.attention,
        cpu.attention_chunk_bytes,
        cpu.attention_chunk_rows,
    ) == ("float32", "hand_written", "phases", None, CPU_CHUNK_BYTES, 0)
    gpu = resolve_implementations(config, "gpu", environ={})
    # the smoke model's heads are 8 wide: cuDNN's kernel applies in bf16
    assert (gpu.dtype, gpu.groupnorm, gpu.upsample_conv, gpu.attention, gpu.attention_chunk_bytes) == (
        "bfloat16",
        "flax",
        "resize",
        "cudnn",
        0,
    )
    forced = resolve_implementations(
        config,
        "gpu",
        environ={"DFJ_GROUPNORM": "hand_written", "DFJ_UPSAMPLE_CONV": "phases", "DFJ_ATTENTION_CHUNK": "16"},
    )
    assert (forced.groupnorm, forced.upsample_conv, forced.attention_chunk_rows) == ("hand_written", "phases", 16)
    assert resolve_implementations(config, "cpu", environ={"DFJ_UPSAMPLE_CONV": "resize"}).upsample_conv == "resize"
    off = resolve_implementations(config, "cpu", environ={"DFJ_ATTENTION_CHUNK": "0"})
    assert (off.attention_chunk_bytes, off.attention_chunk_rows) == (0, 0)
    with pytest.raises(ValueError, match="DFJ_ATTENTION_CHUNK='half'"):
        resolve_implementations(config, "cpu", environ={"DFJ_ATTENTION_CHUNK": "half"})
    with pytest.raises(ValueError, match="DFJ_GROUPNORM='fast'"):
        resolve_implementations(config, "cpu", environ={"DFJ_GROUPNORM": "fast"})
    with pytest.raises(ValueError, match="DFJ_UPSAMPLE_CONV='subpixel'"):
        resolve_implementations(config, "cpu", environ={"DFJ_UPSAMPLE_CONV": "subpixel"})


def test_layers_read_neither_the_environment_nor_the_backend():
    import inspect

    from diff_fastener_jax.models import dacm, layers, norm, segmentation, unet, upsample_conv

    for module in (layers, norm, unet, segmentation, dacm, upsample_conv):
        source = inspect.getsource(module)
        for word in ("os.environ", "getenv", "default_backend", "DFJ_"):
            assert word not in source, (module.__name__, word)


def test_composed_attention_matches_float64_softmax_attention():
    """The XLA attention path (`layers.composed_attention`) against numpy float64, and its gradients
    against jax's own `dot_product_attention`."""
    from diff_fastener_jax.models.layers import composed_attention

    q, k, v = (jax.random.normal(key, (2, 24, 3, 8)) * 2.0 for key in jax.random.split(jax.random.key(0), 3))
    qn, kn, vn = (np.asarray(a, np.float64) for a in (q, k, v))
    logits = np.einsum("bqhd,bkhd->bhqk", qn, kn) / np.sqrt(8.0)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    expected = np.einsum("bhqk,bkhd->bqhd", w, vn)
    np.testing.assert_allclose(np.asarray(composed_attention(q, k, v)), expected, rtol=1e-5, atol=1e-5)

    cot = jax.random.normal(jax.random.key(1), q.shape)
    grads = [
        jax.grad(lambda *a, f=f: jnp.sum(f(*a) * cot), argnums=(0, 1, 2))(q, k, v)
        for f in (composed_attention, jax.nn.dot_product_attention)
    ]
    for ours, theirs in zip(*grads):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-4, atol=1e-5)


def _bilinear2_float64(x: np.ndarray) -> np.ndarray:
    """2x bilinear upsampling by its definition: output o samples input coordinate (o + 0.5) / 2 - 0.5,
    clamped to the image, between its two neighbours."""
    for axis in (1, 2):
        n = x.shape[axis]
        src = np.clip((np.arange(2 * n) + 0.5) / 2 - 0.5, 0, n - 1)
        lo = np.floor(src).astype(int)
        hi = np.minimum(lo + 1, n - 1)
        w = (src - lo).reshape([-1 if a == axis else 1 for a in range(x.ndim)])
        x = (1 - w) * np.take(x, lo, axis=axis) + w * np.take(x, hi, axis=axis)
    return x


@pytest.mark.parametrize("shape", [(2, 1, 1, 3), (1, 2, 5, 4), (2, 7, 4, 1), (1, 8, 8, 16)])
def test_bilinear_upsampling_stencil_matches_float64_and_jax_image_resize(shape):
    """The segmentation net's 2x upsampling (`layers.upsample_bilinear2`, a two-tap stencil) gives
    the values of bilinear interpolation in float64 and of `jax.image.resize`, which it replaced;
    its gradient is resize's; bfloat16 in gives bfloat16 out."""
    from diff_fastener_jax.models.layers import upsample_bilinear2

    b, h, w, c = shape
    x = jax.random.normal(jax.random.key(4), shape)
    out = upsample_bilinear2(x)
    assert out.shape == (b, 2 * h, 2 * w, c) and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), _bilinear2_float64(np.asarray(x, np.float64)), rtol=0, atol=2e-6)
    resize = lambda a: jax.image.resize(a, (b, 2 * h, 2 * w, c), method="bilinear", antialias=False)  # noqa: E731
    np.testing.assert_allclose(np.asarray(out), np.asarray(resize(x)), rtol=0, atol=2e-6)
    cot = jax.random.normal(jax.random.key(5), out.shape)
    grads = [jax.grad(lambda a, f=f: jnp.sum(f(a) * cot))(x) for f in (upsample_bilinear2, resize)]
    np.testing.assert_allclose(np.asarray(grads[0]), np.asarray(grads[1]), rtol=0, atol=1e-5)
    half = upsample_bilinear2(x.astype(jnp.bfloat16))
    assert half.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(half, np.float32), np.asarray(out), rtol=0.02, atol=0.02)


def test_chunked_attention_matches_composed_attention_and_float64():
    """`chunked_attention` (the CPU inference path: a lax.map over query chunks) computes the same
    values as the batched form and as numpy float64, and differentiates to the same gradients."""
    from diff_fastener_jax.models.layers import chunked_attention, composed_attention

    q, k, v = (jax.random.normal(key, (2, 32, 3, 8)) * 2.0 for key in jax.random.split(jax.random.key(2), 3))
    qn, kn, vn = (np.asarray(a, np.float64) for a in (q, k, v))
    logits = np.einsum("bqhd,bkhd->bhqk", qn, kn) / np.sqrt(8.0)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    expected = np.einsum("bhqk,bkhd->bqhd", w / w.sum(-1, keepdims=True), vn)
    for rows in (8, 32):  # four chunks per head, and one
        out = chunked_attention(q, k, v, rows)
        assert out.shape == q.shape and out.dtype == q.dtype
        np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5)
    cot = jax.random.normal(jax.random.key(3), q.shape)
    grads = [
        jax.grad(lambda *a, f=f: jnp.sum(f(*a) * cot), argnums=(0, 1, 2))(q, k, v)
        for f in (lambda *a: chunked_attention(*a, 8), composed_attention)
    ]
    for ours, theirs in zip(*grads):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-4, atol=1e-5)


def test_query_chunk_rule():
    from diff_fastener_jax.models.backend import CPU_CHUNK_BYTES, Implementations

    cpu = Implementations(attention_chunk_bytes=CPU_CHUNK_BYTES)
    assert cpu.query_chunk(1024) == 512  # (512, 1024) float32 logits = 2 MiB
    assert cpu.query_chunk(4096) == 128
    assert cpu.query_chunk(1000) == 500  # a divisor of N
    assert cpu.query_chunk(256) is None  # (256, 256) logits fit the cache whole
    assert Implementations().query_chunk(1024) is None  # no budget: off the CPU, or DFJ_ATTENTION_CHUNK=0
    forced = Implementations(attention_chunk_rows=16)
    assert forced.query_chunk(64) == 16
    with pytest.raises(ValueError, match="DFJ_ATTENTION_CHUNK=16 does not divide the 24"):
        forced.query_chunk(24)


def test_every_implementation_choice_gives_the_same_networks_on_cpu():
    """GroupNorm (flax's or hand-written), attention (XLA ops batched or in query chunks, or
    jax.nn.dot_product_attention's 'xla' kernel): the same parameter tree and, in float32, the same
    outputs of both networks to 1e-5. Chunked attention is taken for train=False only. (The
    up-sampling conv's two implementations: tests/test_upsample_conv.py.)"""
    from diff_fastener_jax.models.backend import Implementations

    config = tiny_config(**{"model.dtype": "float32"})  # the middle block's attention at 32x32: 1024 positions
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    t = jnp.array([3, 500], jnp.int32)
    # proj_out and the zero-initialised convs would hide the attention: give every parameter some noise
    params = perturbed(init_params(config, jax.random.key(1)), 2)
    variants = {
        "flax": Implementations(groupnorm="flax"),
        "hand_written": Implementations(groupnorm="hand_written"),
        "chunked": Implementations(groupnorm="flax", attention_chunk_rows=128),
        "xla_kernel": Implementations(groupnorm="flax", attention="xla"),
    }
    outputs, jaxprs, trees = {}, {}, {}
    for name, impl in variants.items():
        recon, seg = build_models(config, impl)

        def forward(p, recon=recon, seg=seg):
            eps = recon.apply({"params": p["recon"]}, x, t)
            return eps, seg.apply({"params": p["seg"]}, jnp.concatenate([x, x - eps], axis=-1))

        trees[name] = jax.tree_util.tree_structure(
            jax.eval_shape(lambda k, recon=recon: recon.init(k, x, t)["params"], jax.random.key(0))
        )
        jaxprs[name] = str(jax.make_jaxpr(forward)(params))
        outputs[name] = [np.asarray(a) for a in jax.jit(forward)(params)]
    train_jaxpr = str(
        jax.make_jaxpr(
            lambda p: build_models(config, variants["chunked"])[0].apply({"params": p["recon"]}, x, t, train=True)
        )(params)
    )
    assert "scan" in jaxprs["chunked"] and "scan" not in jaxprs["flax"] and "scan" not in train_jaxpr
    assert len(set(trees.values())) == 1
    for name in variants:
        for ours, reference in zip(outputs[name], outputs["flax"]):
            np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-5, err_msg=name)


def test_non_square_image_size_builds_the_same_parameters_as_its_short_side():
    """data.image_size=(H, W): attention resolutions refer to the short side, and the parameter tree
    (traced, not computed) equals the square model's: convolutions and attention hold no spatial size."""
    from diff_fastener_jax.models.layout import attention_downsample_factors

    assert attention_downsample_factors((32, 64), (16, 8)) == (2, 4)
    assert attention_downsample_factors(32, (16, 8)) == (2, 4)
    with pytest.raises(ValueError, match="does not divide"):
        attention_downsample_factors((24, 64), (16,))
    config = tiny_config(**TWO_LEVELS)
    key = jax.random.PRNGKey(0)
    square = jax.eval_shape(lambda k: init_params(config, k, 32, compiled=False), key)
    wide = jax.eval_shape(lambda k: init_params(config, k, (32, 64), compiled=False), key)
    assert jax.tree.map(lambda a: a.shape, wide) == jax.tree.map(lambda a: a.shape, square)
