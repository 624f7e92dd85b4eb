"""The command-line conventions (cli.py): one `error:` line + `hint:`, exit 2, no traceback, nothing
written before validation, --help, --print_config, --verbose. Each test runs a real subprocess."""

import json
import os
import shutil

import pytest
from helpers import SMOKE_CONFIG, run_cli, subprocess_env


def _assert_user_error(proc, error: str, hint: str | None = None):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
    assert lines[0].startswith("error: ") and error in lines[0], lines
    if hint is None:
        assert len(lines) <= 2
    else:
        assert len(lines) == 2 and lines[1].startswith("hint: ") and hint in lines[1], lines


def test_unknown_override_key_is_one_error_line_with_a_hint_and_writes_nothing(tmp_path):
    workdir = tmp_path / "run"
    proc = run_cli("train", "--config", SMOKE_CONFIG, "--workdir", workdir, "--config.data.rooot=/x")
    _assert_user_error(proc, "unknown config key data.rooot", "did you mean data.root")
    assert not workdir.exists()


def test_missing_config_file(tmp_path):
    proc = run_cli("train", "--config", "configs/nope.py", "--workdir", tmp_path / "run")
    _assert_user_error(proc, "configs/nope.py", "demo.py")


def test_verbose_shows_the_traceback(tmp_path):
    args = ("--config", "configs/nope.py", "--workdir", tmp_path / "run")
    verbose = run_cli("train", *args, env=subprocess_env(DFJ_VERBOSE="1"))
    assert verbose.returncode == 2 and "Traceback" in verbose.stderr
    assert verbose.stderr.strip().splitlines()[-2].startswith("error: ")
    flag = run_cli("train", *args, "--verbose")
    assert flag.returncode == 2 and "Traceback" in flag.stderr


def test_help_shows_module_usage_example_and_every_flag():
    proc = run_cli("crossval", "--help")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith("usage: python -m diff_fastener_jax.crossval")
    for text in (
        "Example:",
        "--config FILE[:PRESET]",
        "--workdir",
        "--folds",
        "--config.KEY=VALUE",
        "--print_config",
        "--verbose",
    ):
        assert text in out, text
    assert "--coordinator_address" not in out  # train's flags are not crossval's


def test_print_config_applies_overrides_and_exits_before_writing(tmp_path):
    workdir = tmp_path / "run"
    proc = run_cli(
        "train",
        "--config",
        SMOKE_CONFIG,
        "--workdir",
        workdir,
        "--config.train.num_steps=7",
        "--config.model.channel_mults=(1, 2)",
        "--print_config",
    )
    assert proc.returncode == 0, proc.stderr
    config = json.loads(proc.stdout)
    assert config["train"]["num_steps"] == 7 and config["model"]["channel_mults"] == [1, 2]
    assert config["model"]["base_channels"] == 16  # the smoke preset underneath
    assert not workdir.exists()


@pytest.mark.parametrize(
    "args,error,hint",
    [
        (
            ("--config.train.num_steps=abc",),
            "--config.train.num_steps=abc",
            "expects int values, e.g. --config.train.num_steps=100",
        ),
        (
            ("--config.train.num_steps=-5",),
            "train.num_steps: must be positive, or -1 to derive it from train.num_epochs",
            "--config.train.num_steps=100",
        ),
        (("--config.train.num_steps=0",), "train.num_steps: must be positive, or -1", "--config.train.num_steps=100"),
        (
            ("--config.train.batch_size=-4",),
            "train.batch_size: must be positive, got -4",
            "--config.train.batch_size=4",
        ),
        (
            ("--config.model.activation=tanh",),
            "model.activation: 'tanh' is not one of gelu, gelu_tanh, silu, relu",
            "--config.model.activation=gelu",
        ),
        (("--config.data.format=mvtec", "--config.data.root=/nonexistent"), "data.root: folder '/nonexistent'", None),
        (("--bogus",), "Unknown command line flag 'bogus'", "--help"),
        (("extra",), "unexpected arguments: extra", "--help"),
    ],
)
def test_train_mistakes_end_cleanly(tmp_path, args, error, hint):
    workdir = tmp_path / "run"
    proc = run_cli("train", "--config", SMOKE_CONFIG, "--workdir", workdir, *args)
    _assert_user_error(proc, error, hint)
    assert not workdir.exists()


@pytest.mark.parametrize(
    "command,args",
    [
        ("train", ("--config", SMOKE_CONFIG)),
        ("evaluate", ()),
        ("export", ("--out", "exported")),
        ("crossval", ("--config", SMOKE_CONFIG)),
    ],
)
def test_a_workdir_that_is_a_file_is_one_error_line(tmp_path, command, args):
    path = tmp_path / "notes.txt"
    path.write_text("not a run")
    proc = run_cli(command, "--workdir", path, *args)
    _assert_user_error(proc, f"--workdir {path} is not a folder", "pass a folder for --workdir")
    below = run_cli(command, "--workdir", path / "run", *args)
    _assert_user_error(below, f"--workdir {path / 'run'} is not a folder ({path} is a file)")
    assert path.read_text() == "not a run"


def test_corrupt_training_image_is_named_before_compiling(demo_root, tmp_path):
    root = shutil.copytree(demo_root, tmp_path / "data")
    victim = sorted((root / "fastener" / "train" / "good").iterdir())[3]
    victim.write_bytes(victim.read_bytes()[:100])  # truncated
    workdir = tmp_path / "run"
    proc = run_cli("train", "--config", SMOKE_CONFIG, "--workdir", workdir, f"--config.data.root={root}")
    _assert_user_error(proc, f"cannot decode image {victim}", "replace or remove")
    assert not workdir.exists()


def test_missing_mask_and_empty_split_end_cleanly(demo_root, tmp_path):
    root = shutil.copytree(demo_root, tmp_path / "data")
    mask = sorted((root / "fastener" / "ground_truth" / "broken_clip").iterdir())[0]
    mask.unlink()
    proc = run_cli("train", "--config", SMOKE_CONFIG, "--workdir", tmp_path / "run", f"--config.data.root={root}")
    _assert_user_error(proc, "has no mask")
    empty = shutil.copytree(demo_root, tmp_path / "empty")
    for f in (empty / "fastener" / "train" / "good").iterdir():
        f.unlink()
    proc = run_cli("train", "--config", SMOKE_CONFIG, "--workdir", tmp_path / "run2", f"--config.data.root={empty}")
    _assert_user_error(proc, "contains no images")
    assert not (tmp_path / "run").exists() and not (tmp_path / "run2").exists()


def test_evaluate_refuses_a_folder_that_is_not_a_run(tmp_path):
    proc = run_cli("evaluate", "--workdir", tmp_path)
    _assert_user_error(proc, f"{tmp_path} is not a training run", "--workdir of a training run")
    assert os.listdir(tmp_path) == []


def test_evaluate_unknown_checkpoint_step_lists_the_available_ones(smoke_run, tmp_path):
    proc = run_cli("evaluate", "--workdir", smoke_run, "--checkpoint", "4", "--out", tmp_path / "eval")
    _assert_user_error(proc, "--checkpoint 4: no such step", "available steps: 3, 6")
    assert not (tmp_path / "eval").exists()


def test_evaluate_refuses_an_auto_that_only_training_decides(smoke_run, tmp_path):
    proc = run_cli("evaluate", "--workdir", smoke_run, "--out", tmp_path / "eval", "--config.infer.normal_map=auto")
    _assert_user_error(proc, "--config.infer.normal_map=auto: decided when training starts", "normal_map=off or")
    assert not (tmp_path / "eval").exists()


def test_models_summary_takes_config_overrides(tmp_path):
    out = tmp_path / "summary.json"
    proc = run_cli("models", "--config", SMOKE_CONFIG, "--config.model.dtype=bfloat16", "--json", out)
    assert proc.returncode == 0, proc.stderr
    summary = json.load(open(out))
    assert summary["dtype"] == "bfloat16" and summary["image_size"] == 32
    assert run_cli("models", "--config", SMOKE_CONFIG, "--set", "model.dtype=bfloat16").returncode == 2


def test_models_summary_of_the_paper_config_needs_no_dataset(tmp_path):
    """The summary only counts: configs/default.py (MVTec layout, no data.root) works, and the pinned
    parameter counts and the jaxpr FLOP count of the paper config come out."""
    out = tmp_path / "summary.json"
    proc = run_cli("models", "--config", "configs/default.py", "--json", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.load(open(out))
    assert summary["params_recon"] == 120_537_701 and summary["params_seg"] == 28_373_569
    # The segmentation net's up-sampling is a fixed two-tap stencil (layers.upsample_bilinear2), which
    # the FLOP count leaves out as element-wise work (docs/performance.md).
    assert summary["gflops_infer_per_image"] == pytest.approx(1054.7, abs=0.1)


def test_commands_define_no_flags_on_import():
    """Commands import each other (crossval -> train, evaluate); absl flags are process-global."""
    from absl import flags

    import diff_fastener_jax.benchmark  # noqa: F401
    import diff_fastener_jax.crossval  # noqa: F401
    import diff_fastener_jax.evaluate  # noqa: F401
    import diff_fastener_jax.models.__main__  # noqa: F401
    import diff_fastener_jax.train  # noqa: F401

    for name in ("config", "workdir", "folds", "checkpoint", "out", "json", "batch_sizes"):
        assert name not in flags.FLAGS, name
