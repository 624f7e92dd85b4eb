"""Fixtures and hooks for the whole suite: simulated devices, the compilation cache, which tests are
`slow`, the demo data and ONE trained smoke run. Helpers that tests import live in helpers.py.

`demo_root` (the smoke config's synthetic demo data) and `smoke_run` (ONE 6-step smoke training run on
it, checkpoints at steps 3 and 6) are built once per pytest run (`helpers.shared_once`) and shared
read-only by the end-to-end tests; a test that writes into a run copies it first (`helpers.copy_run`).
The `slow` marker is set here alone (`SLOW` and the `smoke_run` rule in `pytest_collection_modifyitems`),
so `pytest -m "not slow"` (the inner loop) never trains.
"""

import os

# Four simulated CPU devices for the data-parallel paths; must be set before jax is imported.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# The imports below must see the environment above (E402).
import jax  # noqa: E402
import pytest  # noqa: E402
from helpers import shared_once, tiny_config  # noqa: E402

# Many tests build the same tiny programs (each train run makes a fresh jitted step); a persistent
# compilation cache shared by every test and xdist worker turns the repeats into cache hits.
jax.config.update(
    "jax_compilation_cache_dir",
    os.environ.get("DFJ_TEST_JAX_CACHE", os.path.join(os.environ.get("TMPDIR", "/tmp"), "dfj_test_jax_cache")),
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


# Tests outside the inner loop, besides every test that uses the trained `smoke_run` (marked by the
# fixture rule below). A key is a test module, `module::test` (every case of a parametrized test) or
# `module::test[case]` (one case); the value says why it is slow.
SLOW = {
    # whole modules: training runs in subprocesses or end to end
    "test_crash.py": "kills training subprocesses and resumes them",
    "test_multiprocess.py": "trains in two processes and in one",
    "test_normal_only.py": "trains, calibrates and evaluates a run end to end",
    "test_evaluate.py::test_crossval_two_folds": "trains and evaluates two folds",
    # one compile of a whole program or more
    "test_runtimes.py::test_unified_model_onnx_takes_class_ids": "converts a unified model to ONNX, compiles it",
    "test_runtimes.py::test_openvino_unified_model": "converts a unified model to ONNX and OpenVINO",
    "test_runtimes.py::test_runtime_extra_alone_scores_an_export_without_jax": "a fresh venv, pip install from the package index",
    "test_console.py::test_command_help_equals_the_module_help": "two command subprocesses that import JAX",
    "test_adaptive.py::test_adaptive_infer_program_reports_each_images_step_and_is_batch_independent": "compiles the adaptive program (30 U-Net passes) twice",
    "test_benchmark.py::test_bfloat16_inference_close_to_float32": "compiles inference in two dtypes",
    "test_benchmark.py::test_bfloat16_loss_terms_are_float32": "compiles the losses in two dtypes",
    "test_benchmark.py::test_bfloat16_gradients_close_to_float32": "compiles gradients in two dtypes",
    "test_benchmark.py::test_compile_only_records_memory_and_flops_without_running": "compiles programs for several batches",
    "test_benchmark.py::test_microbatched_train_step_costs_the_same_flops_per_image": "compiles train steps",
    "test_inference.py::test_score_depends_on_model_and_image_alone": "compiles inference at four batch shapes",
    "test_inference.py::test_infer_seed_changes_scores": "a second inference compile",
    "test_inference.py::test_infer_ablation_methods_are_batch_independent[ddim]": "a compile per method",
    "test_inference.py::test_infer_ablation_methods_are_batch_independent[ddpm]": "a compile per method",
    "test_inference.py::test_infer_ablation_methods_are_batch_independent[adaptive]": "a compile per method",
    "test_models.py::test_output_shapes_and_resolution_independent_params[64]": "a second image size",
    "test_models.py::test_bf16_compute_float32_params": "compiles the U-Nets forward and backward",
    "test_models.py::test_remat_blocks_keeps_params_and_gradients": "compiles the U-Nets forward and backward",
    "test_multicategory.py::test_the_infer_program_takes_class_ids_exactly_when_unified": "compiles the unified inference program",
    "test_multicategory.py::test_unified_run_calibrates_evaluates_and_predicts_per_category": "trains a unified model end to end",
    "test_train_step.py::test_one_device_equals_four_devices": "compiles whole train steps",
    "test_train_step.py::test_step_compiles_once_and_reports_metrics": "compiles whole train steps",
    "test_train_step.py::test_loss_falls_on_fixed_batch": "a 50-step training loop",
    "test_train_step.py::test_non_finite_loss_skips_update": "compiles a whole train step",
    "test_train_step.py::test_microbatches_give_the_whole_batch_update": "compiles whole train steps",
    "test_validation.py::test_validation_logs_ema_scores_equal_to_a_direct_computation": "trains with validation",
    "test_selection.py::test_training_keeps_calibrates_and_evaluates_the_selected_step": "trains and evaluates a run",
    "test_train.py::test_interrupted_save_leaves_previous_checkpoint_usable": "trains a run",
    "test_foreground_kind.py::test_training_saves_and_logs_the_choices": "trains a run",
    "test_resume.py::test_resume_with_another_step_count_needs_confirmation": "trains a run and resumes it",
    # subprocesses: the other CLI tests cover the command wrapper in the inner loop
    "test_benchmark.py::test_benchmark_command_writes_record": "runs the whole benchmark command",
    "test_benchmark.py::test_benchmark_profile_lists_every_block": "runs the whole benchmark command",
    "test_benchmark.py::test_set_alias_runs_like_a_config_override": "a benchmark subprocess that compiles",
    "test_cli.py::test_missing_config_file": "a subprocess",
    "test_cli.py::test_verbose_shows_the_traceback": "a subprocess",
    "test_cli.py::test_print_config_applies_overrides_and_exits_before_writing": "a subprocess",
    "test_cli.py::test_train_mistakes_end_cleanly": "a subprocess per case",
    "test_cli.py::test_a_workdir_that_is_a_file_is_one_error_line": "two subprocesses per command",
    "test_cli.py::test_corrupt_training_image_is_named_before_compiling": "a subprocess",
    "test_cli.py::test_missing_mask_and_empty_split_end_cleanly": "subprocesses",
    "test_cli.py::test_evaluate_refuses_a_folder_that_is_not_a_run": "a subprocess",
    "test_cli.py::test_models_summary_takes_config_overrides": "a subprocess",
    "test_cli.py::test_models_summary_of_the_paper_config_needs_no_dataset": "a subprocess",
}


def pytest_collection_modifyitems(config, items):
    """Marks `slow` every test listed in `SLOW` and every test that needs the trained smoke run
    (directly or through another fixture)."""
    for item in items:
        module = item.path.name
        keys = (module, f"{module}::{getattr(item, 'originalname', item.name)}", f"{module}::{item.name}")
        if any(k in SLOW for k in keys) or "smoke_run" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


# Module scope: `shared_once` already builds each folder once per pytest run (across xdist workers);
# a module's first request only takes its lock and finds the folder done.
@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    """The smoke config's demo dataset, generated once per pytest run (treat as read-only)."""
    from diff_fastener_jax.data.demo import ensure_demo_data

    return shared_once(tmp_path_factory, "demo_data", lambda path: ensure_demo_data(tiny_config().data, path))


@pytest.fixture(scope="module")
def smoke_run(demo_root, tmp_path_factory):
    """ONE trained smoke run (6 steps, checkpoints 3 and 6) shared by the end-to-end tests of every
    worker (read-only)."""
    from diff_fastener_jax.training.loop import train_and_evaluate

    return shared_once(
        tmp_path_factory,
        "smoke_run",
        lambda path: train_and_evaluate(tiny_config(**{"data.root": demo_root}), path, quiet=True),
    )
