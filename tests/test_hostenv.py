"""Huge pages for XLA:CPU's buffers (hostenv): opt-in only; when an opted-in command re-executes itself,
and that it does; importing the package never does."""

import json
import os
import subprocess
import sys

import pytest
from helpers import ROOT, subprocess_env

from diff_fastener_jax.perf import hostenv

ON = {"DFJ_HUGEPAGES": "1"}


@pytest.mark.parametrize(
    "environ,thp,libc,expected",
    [
        ({}, "madvise", "glibc 2.36", None),  # not opted in: nothing happens
        (ON, "madvise", "glibc 2.36", "glibc.malloc.hugetlb=1"),
        ({"DFJ_HUGEPAGES": "on"}, "madvise", "glibc 2.36", "glibc.malloc.hugetlb=1"),
        (
            {**ON, "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"},
            "madvise",
            "glibc 2.39",
            "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1",
        ),
        ({**ON, "GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "madvise", "glibc 2.36", None),  # the user's choice stays
        ({"DFJ_HUGEPAGES": "0"}, "madvise", "glibc 2.36", None),
        ({"DFJ_HUGEPAGES": "off"}, "madvise", "glibc 2.36", None),
        (ON, "always", "glibc 2.36", None),  # every mapping gets huge pages already
        (ON, "never", "glibc 2.36", None),
        (ON, None, "glibc 2.36", None),  # no THP (not Linux, or no sysfs)
        (ON, "madvise", "glibc 2.34", None),  # before the tunable existed
        (ON, "madvise", None, None),  # musl, macOS
    ],
)
def test_hugepage_environ_decides_when_a_reexec_changes_something(environ, thp, libc, expected):
    env = hostenv.hugepage_environ({"PATH": "/bin", **environ}, thp, libc)
    if expected is None:
        assert env is None
    else:
        assert env["GLIBC_TUNABLES"] == expected
        assert env["PATH"] == "/bin"  # the rest of the environment is kept


@pytest.mark.parametrize(
    "argv,expected",
    [
        (["python", "-m", "diff_fastener_jax.train", "--config", "c.py"], True),
        (["python", "-u", "-X", "dev", "-m", "diff_fastener_jax.benchmark"], True),
        (["python", "-m", "diff_fastener_jax"], True),
        (["python", "-m", "pytest", "tests"], False),
        (["python", "-c", "import diff_fastener_jax"], False),
        (["python", "script.py", "-m", "diff_fastener_jax.train"], False),
        (["/venv/bin/python", "/venv/bin/diff-fastener", "train", "--config", "c.py"], True),
        (["/venv/bin/python", "/venv/bin/diff-fastener-other", "train"], False),
        (["python", "-m"], False),
        (["python"], False),
    ],
)
def test_only_our_commands_reexecute(argv, expected):
    assert hostenv.launched_as_command(argv) is expected


def _host_of(env, console: bool = False) -> dict:
    """The host facts a command sees: `python -m diff_fastener_jax --json`, or the console script's."""
    script = os.path.join(os.path.dirname(sys.executable), hostenv.CONSOLE_SCRIPT)
    if console and not os.path.isfile(script):
        pytest.skip(f"the console script is not installed beside {sys.executable}")
    out = subprocess.run(
        [script, "--json"] if console else [sys.executable, "-m", "diff_fastener_jax", "--json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(out.stdout)["host"]


def test_importing_the_package_never_reexecutes():
    """Not even started as `python -m diff_fastener_jax.<cmd>` with the opt-in set: `import` alone runs
    no re-exec (the source holds none), and a library import keeps the environment."""
    import diff_fastener_jax

    with open(diff_fastener_jax.__file__) as f:
        source = f.read()
    assert "reexec" not in source and "hostenv" not in source
    env = {**subprocess_env(), **ON}
    env.pop("GLIBC_TUNABLES", None)
    code = "import os, diff_fastener_jax; print(os.environ.get('GLIBC_TUNABLES'))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "None"


def test_a_command_runs_with_the_tunable_only_when_opted_in():
    env = subprocess_env()
    env.pop("GLIBC_TUNABLES", None)
    env.pop(hostenv.OPT_IN, None)
    assert _host_of(env)["glibc_tunables"] is None  # the default: no re-exec
    wanted = hostenv.hugepage_environ({**env, **ON}, hostenv.thp_mode(), hostenv.libc_version())
    if wanted is None:
        pytest.skip(f"this host gains nothing from the tunable (THP {hostenv.thp_mode()!r}, {hostenv.libc_version()})")
    assert _host_of({**env, **ON})["glibc_tunables"] == hostenv.TUNABLE
    assert _host_of({**env, **ON}, console=True)["glibc_tunables"] == hostenv.TUNABLE
    assert _host_of(env, console=True)["glibc_tunables"] is None
