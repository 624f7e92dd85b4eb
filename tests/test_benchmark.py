"""The benchmark CLI's record, and what bfloat16 compute does to scores and gradients (no timing asserts)."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import SMOKE_CONFIG, TWO_LEVELS, perturbed, run_cli, subprocess_env, tiny_config

from diff_fastener_jax.errors import UserError
from diff_fastener_jax.inference import make_infer_fn
from diff_fastener_jax.models import count_params, init_params
from diff_fastener_jax.perf import benchmark, block_profile, hardware, hostenv, xla_options
from diff_fastener_jax.training.train_step import make_loss_fn

# bfloat16 vs float32 one-step inference on the smoke config with two levels (TWO_LEVELS: 32 px,
# channel mults (1, 2), attention at 16 x 16) and perturbed params, on XLA:CPU: map max |diff|
# 0.013-0.015, mean 0.002; score max |diff| 0.0006-0.0013;
# recon max |diff| 0.007-0.023; the 64 px demo config gives map max 0.02-0.036, score 0.001-0.0015).
# The tolerances leave about 3x headroom over the smoke config's measurements.
BF16_MAP_MAX_ABS = 0.05
BF16_MAP_MEAN_ABS = 0.01
BF16_SCORE_MAX_ABS = 0.005
BF16_RECON_MAX_ABS = 0.08


def perturbed_params(config, scale=0.05, seed=0):
    """Initial params plus Gaussian noise, so the zero-initialised output layers are not zero."""
    return perturbed(init_params(config, jax.random.key(seed)), seed + 1, scale)


def test_bfloat16_inference_close_to_float32():
    # The two-level model that the tolerances were measured on: under these perturbed weights the
    # one-level smoke model's maps are nearly flat (std 0.050) and differ 10x less (max 0.0013).
    c32 = tiny_config(**TWO_LEVELS)
    c16 = tiny_config(**TWO_LEVELS, **{"model.dtype": "bfloat16"})
    params = perturbed_params(c32)
    images = jax.random.uniform(jax.random.key(2), (8, 32, 32, 3), minval=-1.0, maxval=1.0)
    r32, m32, s32, _ = make_infer_fn(c32)(params, images)
    r16, m16, s16, _ = make_infer_fn(c16)(params, images)
    # Outputs stay float32 (params float32, map and score computed from float32 logits).
    assert r16.dtype == m16.dtype == s16.dtype == jnp.float32
    # The maps must not be saturated, or the comparison would say nothing.
    assert 0.05 < float(m32.std()) and 0.05 < float(m32.min()) and float(m32.max()) < 0.999
    map_diff = np.abs(np.asarray(m32) - np.asarray(m16))
    assert map_diff.max() > 0, "bfloat16 compute changed nothing: is model.dtype wired through?"
    assert map_diff.max() < BF16_MAP_MAX_ABS, map_diff.max()
    assert map_diff.mean() < BF16_MAP_MEAN_ABS, map_diff.mean()
    assert np.abs(np.asarray(s32) - np.asarray(s16)).max() < BF16_SCORE_MAX_ABS
    assert np.abs(np.asarray(r32) - np.asarray(r16)).max() < BF16_RECON_MAX_ABS


def _grads(config, params):
    b, s = 4, config.data.image_size
    rng = np.random.default_rng(0)
    batch = {
        "image": jnp.asarray(rng.uniform(-1, 1, (b, s, s, 3)), jnp.float32),
        "mask": jnp.asarray(rng.uniform(size=(b, s, s, 1)) > 0.9, jnp.float32),
        "is_synthetic": jnp.asarray([0.0, 1.0, 0.0, 1.0]),
    }
    t = jnp.arange(b, dtype=jnp.int32) * 10
    n1 = jax.random.normal(jax.random.key(5), (b, s, s, 3))
    n2 = jax.random.normal(jax.random.key(6), (b, s, s, 3))
    loss_fn = make_loss_fn(config)
    return jax.jit(jax.grad(lambda p: loss_fn(p, batch, t, t + 300, n1, n2, jax.random.key(0))[0]))(params)


def test_bfloat16_loss_terms_are_float32():
    config = tiny_config(**{"model.dtype": "bfloat16"})
    params = perturbed_params(config)
    b, s = 2, config.data.image_size
    batch = {"image": jnp.zeros((b, s, s, 3)), "mask": jnp.zeros((b, s, s, 1)), "is_synthetic": jnp.array([0.0, 1.0])}
    t = jnp.array([5, 6], jnp.int32)
    noise = jnp.ones((b, s, s, 3))
    loss_fn = make_loss_fn(config)
    total, terms = jax.jit(loss_fn)(params, batch, t, t + 300, noise, noise, jax.random.key(0))
    assert total.dtype == jnp.float32
    assert all(v.dtype == jnp.float32 and bool(jnp.isfinite(v)) for v in terms.values())
    # Gradients reach the float32 params as float32 (shapes and dtypes only: no compile needed).
    grads = jax.eval_shape(
        jax.grad(lambda p: loss_fn(p, batch, t, t + 300, noise, noise, jax.random.key(0))[0]), params
    )
    assert all(g.dtype == jnp.float32 for g in jax.tree_util.tree_leaves(grads))


def test_bfloat16_gradients_close_to_float32():
    """bf16 compute keeps gradients close to float32 (bias adds, and so bias gradients, stay float32)."""
    c32 = tiny_config()
    c16 = tiny_config(**{"model.dtype": "bfloat16"})
    params = perturbed_params(c32, scale=0.02)
    g32 = jax.tree_util.tree_leaves_with_path(_grads(c32, params))
    g16 = jax.tree_util.tree_leaves(_grads(c16, params))
    worst = []
    for (path, a), b in zip(g32, g16):  # in numpy: one eager jnp program per leaf shape would compile each
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        norm = float(np.linalg.norm(a))
        rel = float(np.linalg.norm(a - b)) / norm
        ratio = float(np.linalg.norm(b)) / norm
        worst.append((rel, ratio, jax.tree_util.keystr(path)))
    worst.sort(reverse=True)
    # bf16 rounding gives a few percent (median ~2%); with float32 bias adds: max 0.18 (on the
    # one-level smoke model: max 0.15, median 0.7%, norm ratios 0.99-1.09).
    assert worst[0][0] < 0.35, worst[:3]
    assert all(0.75 < ratio < 1.33 for _, ratio, _ in worst), [w for w in worst if not 0.75 < w[1] < 1.33]


def test_benchmark_command_writes_record(tmp_path):
    out = tmp_path / "bench.json"
    out.write_text("{}")  # --out is a file: an earlier record is replaced, not refused as "not a folder"
    proc = run_cli(
        "benchmark",
        "--config",
        SMOKE_CONFIG,
        "--batch_sizes",
        "1,4",
        "--train_batch",
        "4",
        "--repeats",
        "1",
        "--dtype",
        "float32",
        "--out",
        out,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "infer" in proc.stdout and f"wrote {out}" in proc.stdout
    # Progress on stderr, one line per stage, so a killed GPU run still shows where the time went.
    stages = [line.split("] ", 1)[1] for line in proc.stderr.splitlines() if line.startswith("[benchmark ")]
    assert stages[0] == "initialising parameters", proc.stderr[-2000:]
    assert any(s.startswith("inference, batch 4: compiling") for s in stages)
    assert any(s.startswith("train step, batch 4: ") and "img/s (compiled in" in s for s in stages)
    r = json.loads(out.read_text())
    for key in benchmark.REQUIRED_KEYS:
        assert key in r, key
    assert r["dtype"] == "float32" and r["image_size"] == 32 and r["config"].endswith("demo.py:smoke")
    assert r["device"].startswith("cpu")
    assert [row["batch"] for row in r["infer"]] == [1, 4]
    for row in r["infer"]:
        assert row["images_per_s"] > 0 and row["ms_per_image"] > 0
        assert math.isclose(row["images_per_s"] * row["ms_per_image"], 1000.0, rel_tol=1e-6)
    # Batch 4 runs sharded over the 4 simulated devices; FLOPs per image must not depend on that.
    assert [row["devices"] for row in r["infer"]] == [1, 4]
    g1, g4 = (row["gflops_per_image"] for row in r["infer"])
    assert math.isclose(g1, g4, rel_tol=0.05), (g1, g4)
    assert r["train"]["batch"] == 4 and r["train"]["images_per_s"] > 0
    # a train step costs more than one inference (backward pass), well under 10x
    assert r["gflops_per_image_infer"] < r["train"]["gflops_per_image"] < 10 * r["gflops_per_image_infer"]
    assert r["achieved_tflops"] > 0 and r["fraction_of_peak"] > 0
    assert set(r["compile_s"]) == {"infer_b1", "infer_b4", "train"}
    assert all(v > 0 for v in r["compile_s"].values())
    assert r["params_recon"] > r["params_seg"] > 0
    assert r["xla_options"] == xla_options.compiler_options("cpu")
    assert (r["group_norm"], r["upsample_conv"]) == ("hand_written", "phases")  # the CPU's choices
    # 32 px, one level: attention in the middle block at 32 x 32, in query chunks of 512 rows
    assert r["attention_query_chunk"] == {"1024": 512}
    # What the process ran with: the malloc tunable the command set for itself, or none (see hostenv).
    env = subprocess_env()
    reexec = hostenv.hugepage_environ(env, hostenv.thp_mode(), hostenv.libc_version())
    tunables = (reexec or env).get("GLIBC_TUNABLES")
    assert r["host_setup"]["glibc_tunables"] == tunables
    assert r["host_setup"]["malloc_hugepages"] == (hostenv.TUNABLE in (tunables or ""))
    assert ("malloc huge pages on" in proc.stdout) == (hostenv.TUNABLE in (tunables or ""))


def test_benchmark_profile_lists_every_block():
    config = tiny_config()
    params = init_params(config, jax.random.key(0))
    p = block_profile.profile_components(config, params, batch=1, repeats=1)
    recon_names = [b["block"] for b in p["recon_blocks"]]
    assert recon_names[:3] == ["temb_dense0", "temb_dense1", "stem"] and recon_names[-1] == "out_conv"
    assert "mid_dacm" in recon_names and "mid_attn" in recon_names
    # The seg net's Sequential blocks own no params: their inner ConvNormAct calls are listed instead.
    seg_types = {b["type"] for b in p["seg_blocks"]}
    assert "Sequential" not in seg_types and "ConvNormAct" in seg_types
    # Every block's FLOPs add up to about the whole network's.
    total = sum(b["gflops"] for b in p["recon_blocks"])
    assert math.isclose(total, p["recon_unet_2b"]["gflops"], rel_tol=0.1), (total, p["recon_unet_2b"]["gflops"])
    assert all(b["ms"] > 0 for b in p["recon_blocks"] + p["seg_blocks"])


def test_gpu_peak_table_matches_specific_names_first():
    class Fake:
        platform = "gpu"

        def __init__(self, kind):
            self.device_kind = kind

    assert hardware.device_limits(Fake("NVIDIA H100 80GB HBM3"), "bfloat16")["peak_tflops"] == 989.0
    assert hardware.device_limits(Fake("NVIDIA H100 PCIe"), "bfloat16")["peak_tflops"] == 756.0
    assert hardware.device_limits(Fake("NVIDIA A100-SXM4-80GB"), "float32")["peak_tflops"] == 156.0
    assert hardware.device_limits(Fake("NVIDIA A10"), "bfloat16")["peak_tflops"] == 125.0
    assert math.isnan(hardware.device_limits(Fake("Mystery GPU"), "bfloat16")["peak_tflops"])


def test_benchmark_mistake_is_one_error_line():
    proc = run_cli("benchmark", "--config", SMOKE_CONFIG, "--batch_sizes", "1,x")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.startswith("error: --batch_sizes must be comma-separated integers"), proc.stderr


def test_benchmark_refuses_bad_requests():
    with pytest.raises(UserError, match="must be positive"):
        benchmark.parse_batch_sizes("-2")
    with pytest.raises(UserError, match="nothing to measure"):
        benchmark.measure(tiny_config(), [], 0)
    with pytest.raises(UserError, match="--repeats"):
        benchmark.measure(tiny_config(), [1], 0, repeats=0)
    with pytest.raises(UserError, match="--set expects KEY=VALUE"):
        benchmark.modern_argv(["benchmark", "--set", "model.base_channels"])


def test_batch_sizes_parse():
    assert benchmark.parse_batch_sizes("1,8, 32") == [1, 8, 32]
    assert benchmark.parse_batch_sizes("0") == benchmark.parse_batch_sizes("") == []


def test_compile_only_records_memory_and_flops_without_running():
    """compile_only: the same programs compiled from abstract inputs, with costs and planned memory.
    The smoke config as in test_benchmark_command_writes_record (the same file runs it first), so the
    programs are persistent-cache hits: about 5 s instead of 24 s of compiling on a cold CI machine.
    (What model.remat does to the planned memory: tests/test_models.py.)"""
    r = benchmark.measure(tiny_config(), [1, 4], 4, compile_only=True)
    assert r["compile_only"] is True and r["remat"] == "none" and r["dtype"] == "float32"
    rows = r["infer"] + [r["train"]]
    assert [row["batch"] for row in rows] == [1, 4, 4]
    for row in rows:
        assert "images_per_s" not in row  # nothing was run
        assert row["xla_peak_memory_bytes"] > 0 and row["gflops_per_image"] > 0
    assert r["infer"][0]["gflops_per_image"] < r["train"]["gflops_per_image"]
    assert set(r["compile_s"]) == {"infer_b1", "infer_b4", "train"}


def test_a_patch_trained_model_is_benchmarked_on_its_training_crops():
    """The train step of a `data.patch_size` model runs on P x P crops, inference on whole images."""
    from diff_fastener_jax.perf import programs

    config = tiny_config()
    with config.ignore_type():  # an (H, W) evaluation resolution where the schema's default is one int
        config.data.image_size = (32, 64)
    config.data.patch_size = 16
    _, (state, data, key), _, _ = programs._abstract_train_program(config, 2)
    assert data["image"].shape == (2, 16, 16, 3) and data["mask"].shape == (2, 16, 16, 1)
    _, images = programs._infer_inputs(config, 2, None, abstract=True)
    assert images.shape == (2, 32, 64, 3)


def test_init_only_times_both_initialisations():
    """init_only runs what every process runs first (parameters, train state) and times it: on GPUs
    benchmarks/gpu.sh uses it to put both init programs in the persistent compilation cache."""
    config = tiny_config()
    r = benchmark.measure(config, [1], 4, init_only=True)
    assert r["init_only"] is True and r["infer"] == [] and r["train"] is None
    assert set(r["init_s"]) == {"params", "train_state"} and all(v > 0 for v in r["init_s"].values())
    assert r["params_recon"] > r["params_seg"] > 0
    with pytest.raises(UserError, match="exclude each other"):
        benchmark.measure(config, [1], 4, init_only=True, compile_only=True)


def test_old_spellings_and_set_become_todays_flags():
    with pytest.warns(DeprecationWarning, match="--set"):
        argv = benchmark.modern_argv(
            [
                "benchmark",
                "--batch-sizes",
                "4",
                "--train-batch=2",
                "--compile-only",
                "--set",
                "model.base_channels=8",
                "--set=config.data.image_size=32",
            ]
        )
    assert argv == [
        "benchmark",
        "--batch_sizes",
        "4",
        "--train_batch=2",
        "--compile_only",
        "--config.model.base_channels=8",
        "--config.data.image_size=32",
    ]


def test_set_alias_runs_like_a_config_override(tmp_path):
    out = tmp_path / "a.json"
    proc = run_cli(
        "benchmark",
        "--config",
        SMOKE_CONFIG,
        "--batch-sizes",
        "2",
        "--train-batch",
        "0",
        "--compile-only",
        "--set",
        "model.base_channels=8",
        "--out",
        out,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "deprecated" in proc.stderr
    ra = json.loads(out.read_text())
    rb = benchmark.measure(tiny_config(**{"model.base_channels": 8}), [2], 0, compile_only=True)
    smoke_params = jax.eval_shape(lambda k: init_params(tiny_config(), k), jax.random.key(0))
    assert ra["params_recon"] == rb["params_recon"] < count_params(smoke_params["recon"])  # 8 < 16 channels
    assert ra["infer"][0]["gflops_per_image"] == pytest.approx(rb["infer"][0]["gflops_per_image"])


def test_peer_script_command_needs_no_dataset(tmp_path):
    """../shared/bench/speed_vs_peer.sh benchmarks an MVTec-preset config with no data.root: the
    benchmark feeds synthetic arrays, so the data location is not checked (no exit 2 for a missing root)."""
    out = tmp_path / "ref.json"
    proc = run_cli(
        "benchmark",
        "--config",
        "configs/dense_reference.py",
        "--set",
        "data.image_size=32",
        "--set",
        "model.base_channels=8",
        "--set",
        "model.channel_mults=(1,2)",
        "--set",
        "model.attention_resolutions=(16,)",
        "--set",
        "model.num_groups=4",
        "--set",
        "model.seg_channels=(8,16)",
        "--batch-sizes",
        "2",
        "--train-batch",
        "0",
        "--dtype",
        "float32",
        "--compile-only",
        "--out",
        out,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(out.read_text())["infer"][0]["batch"] == 2


def test_microbatched_train_step_costs_the_same_flops_per_image():
    """XLA counts a loop body once; the benchmark scales the microbatch loop by its trip count, so the
    FLOPs per image of an accumulated step match the whole-batch step's. The jaxpr count multiplies
    the scan by its length itself and must agree. The whole-batch step is only traced: its jaxpr count
    is the reference, and XLA's count of the same network is within 16% of it (tests/test_flop_count.py;
    here about 8%), while a loop counted once would be 50% short at 2 microbatches."""
    from diff_fastener_jax.perf.programs import train_gflops_per_image

    whole = train_gflops_per_image(tiny_config(), 16)
    micro = benchmark.measure(tiny_config(**{"train.microbatch": 2}), [], 16, compile_only=True)["train"]
    assert micro["gflops_per_image"] == pytest.approx(whole, rel=1e-6)
    assert micro["xla_gflops_per_image"] == pytest.approx(whole, rel=0.16)
