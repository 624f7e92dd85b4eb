"""Huge pages for XLA:CPU's buffers: a command re-executes itself once with glibc's hugetlb tunable.

Why: XLA:CPU allocates a program's temporaries afresh on every call. Allocations that large come from
mmap, so the kernel zero-fills them one 4 KiB page at a time. The dense-reference train step (128 px,
base 64, batch 4) took 1.1 M page faults and 3.5-4 s of system time per step. With glibc's
`glibc.malloc.hugetlb=1` tunable, malloc marks those regions for transparent huge pages
(`madvise(MADV_HUGEPAGE)`). Faults drop to about 10 k per step and the step runs 14% faster
(19.2 -> 16.5 s, benchmarks/RESULTS.md). Kernels that run THP in `madvise` mode, the common
default, need that advice.

glibc reads tunables only when a process starts. So a command launched as
`python -m diff_fastener_jax.<cmd>` execs itself once, before JAX is imported, with the tunable added
to GLIBC_TUNABLES (the package's `__init__` calls `reexec_with_hugepages`). The re-exec keeps the
process id, the arguments and the rest of the environment. Importing the package as a library never
re-executes anything. Set `DFJ_HUGEPAGES=0` to opt out. `python -m diff_fastener_jax` prints what a
command gets.
"""

from __future__ import annotations

import os
import re
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "DFJ_HUGEPAGES"
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"


def thp_mode(path: str = THP_ENABLED) -> str | None:
    """The kernel's transparent-huge-page mode ('always', 'madvise', 'never'), None if unknown."""
    try:
        with open(path) as f:
            m = re.search(r"\[(\w+)\]", f.read())
    except OSError:
        return None
    return m.group(1) if m else None


def libc_version() -> str | None:
    """'glibc 2.36' on glibc systems, else None."""
    try:
        return os.confstr("CS_GNU_LIBC_VERSION")
    except (AttributeError, ValueError, OSError):
        return None


def hugepage_environ(environ: dict, thp: str | None, libc: str | None) -> dict | None:
    """The environment to re-execute with, or None when the tunable would change nothing.

    Nothing changes when the user opted out (`DFJ_HUGEPAGES=0`), when the tunable is already set,
    when the kernel gives every mapping huge pages anyway (THP 'always') or none at all ('never'),
    or when the C library is not glibc >= 2.35 (the first with the tunable).
    """
    if environ.get(OPT_OUT, "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    if thp != "madvise":
        return None
    m = re.fullmatch(r"glibc (\d+)\.(\d+).*", libc or "")
    if not m or (int(m.group(1)), int(m.group(2))) < (2, 35):
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb=" in tunables:
        return None
    env = dict(environ)
    env["GLIBC_TUNABLES"] = f"{tunables}:{TUNABLE}" if tunables else TUNABLE
    return env


def launched_as_command(orig_argv: list[str]) -> bool:
    """Whether the interpreter was started as `python [options] -m diff_fastener_jax.<cmd> ...`."""
    i = 1
    while i < len(orig_argv) - 1:
        arg = orig_argv[i]
        if arg == "-m":
            return orig_argv[i + 1].split(".")[0] == "diff_fastener_jax"
        if arg == "-c" or not arg.startswith("-"):  # -c code or a script: not one of our commands
            return False
        i += 2 if arg in ("-X", "-W") else 1  # the interpreter options that take a value
    return False


def reexec_with_hugepages() -> None:
    """Re-executes this command once with the hugetlb tunable (see the module docstring); else returns."""
    if not sys.platform.startswith("linux") or not launched_as_command(getattr(sys, "orig_argv", [])):
        return
    env = hugepage_environ(dict(os.environ), thp_mode(), libc_version())
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    except OSError:  # the process keeps running, with 4 KiB pages
        return


def host_setup() -> dict:
    """What this process runs with: its glibc tunables, the THP mode and the C library.

    For benchmark records and `python -m diff_fastener_jax`.
    """
    tunables = os.environ.get("GLIBC_TUNABLES")
    return {"glibc_tunables": tunables, "malloc_hugepages": TUNABLE in (tunables or ""), "thp_mode": thp_mode(),
            "libc": libc_version()}
