"""The `diff-fastener` console command: a fast listing without JAX, each command identical to its
`python -m diff_fastener_jax.<command>` form, clean errors."""

import os
import subprocess
import sys

import pytest
from helpers import ROOT, run_cli, subprocess_env

from diff_fastener_jax.__main__ import COMMANDS

EXPECTED = ("train", "evaluate", "predict", "export", "serve", "benchmark", "crossval", "models")
SCRIPT = os.path.join(os.path.dirname(sys.executable), "diff-fastener")


def _console(*args, code_after: str = ""):
    """`diff-fastener args...` run through console_main in a fresh interpreter, then `code_after`."""
    code = (
        "import sys, time\nsys.argv = ['diff-fastener', *sys.argv[1:]]\nt = time.perf_counter()\n"
        "from diff_fastener_jax.__main__ import console_main\n"
        "try:\n    rc = console_main()\nexcept SystemExit as e:\n    rc = e.code\n"
        "elapsed = time.perf_counter() - t\n" + code_after + "\nsys.exit(rc)\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300
    )


def test_listing_names_every_command_quickly_without_jax():
    assert tuple(COMMANDS) == EXPECTED
    for args in ((), ("--help",)):
        proc = _console(
            *args,
            code_after="heavy = [m for m in ('jax', 'flax', 'optax', 'orbax') if m in sys.modules]\n"
            "print('HEAVY', heavy, 'SECONDS', round(elapsed, 3))",
        )
        assert proc.returncode == 0, proc.stderr
        listed = [line.split()[0] for line in proc.stdout.splitlines() if line.startswith("  ")]
        assert listed == list(EXPECTED)
        assert "HEAVY [] SECONDS" in proc.stdout
        assert float(proc.stdout.split("SECONDS")[-1]) < 1.0


def test_version_and_unknown_command():
    from diff_fastener_jax.version import __version__

    proc = _console("--version")
    assert proc.returncode == 0 and proc.stdout.strip().endswith(__version__)
    proc = _console("trian", "--config", "x")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[0] == "error: unknown command 'trian'" and lines[1].startswith("hint: did you mean 'train'?")


@pytest.mark.skipif(not os.path.isfile(SCRIPT), reason="the console script is not installed (pip install -e .)")
def test_installed_script_lists_the_commands():
    proc = subprocess.run(
        [SCRIPT, "--help"], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and all(f"  {c} " in proc.stdout for c in EXPECTED)


def test_command_help_equals_the_module_help():
    console = _console("train", "--help")
    module = run_cli("train", "--help")
    assert console.returncode == module.returncode == 0
    c_lines, m_lines = console.stdout.splitlines(), module.stdout.splitlines()
    assert c_lines[0] == "usage: diff-fastener train [flags] [--config.KEY=VALUE ...]"
    assert m_lines[0] == "usage: python -m diff_fastener_jax.train [flags] [--config.KEY=VALUE ...]"
    assert c_lines[1:] == m_lines[1:] and len(c_lines) > 20
    # the same error and exit status as the module form, with the console's name in the hint
    console, module = (
        _console("export", "--workdir", "/nonexistent/x"),
        run_cli("export", "--workdir", "/nonexistent/x"),
    )
    assert console.returncode == module.returncode == 2
    assert console.stderr.splitlines()[0] == module.stderr.splitlines()[0]
    assert "diff-fastener export --help" in console.stderr
