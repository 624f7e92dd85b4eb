"""Huge pages for XLA:CPU's buffers, opt-in: glibc's hugetlb tunable, set by the launcher or by a
command that re-executes itself once (`DFJ_HUGEPAGES=1`).

Why: XLA:CPU allocates a program's temporaries afresh on every call. Allocations that large come from
mmap, so the kernel zero-fills them one 4 KiB page at a time. The dense-reference train step (128 px,
base 64, batch 4) took 1.1 M page faults and 3.5-4 s of system time per step. With glibc's
`glibc.malloc.hugetlb=1` tunable, malloc marks those regions for transparent huge pages
(`madvise(MADV_HUGEPAGE)`). Faults drop to about 10 k per step and the step runs 14% faster
(19.2 -> 16.5 s, docs/performance.md). Kernels that run THP in `madvise` mode, the common
default, need that advice.

glibc reads tunables only when a process starts, so there are two ways to opt in:

  * export the tunable before starting Python:
    `GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python -m diff_fastener_jax.train ...`
    (`launch/local.sh` and `launch/slurm.sbatch` do this);
  * set `DFJ_HUGEPAGES=1`: a command launched as `python -m diff_fastener_jax.<cmd>` or as
    `diff-fastener <cmd>` then execs itself
    once with the tunable added to GLIBC_TUNABLES (`cli.run` and the package's `__main__` call
    `reexec_with_hugepages` first). The re-exec keeps the process id, the arguments and the rest of
    the environment.

Importing the package never re-executes anything. `python -m diff_fastener_jax` prints what a
command gets.
"""

from __future__ import annotations

import os
import re
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_IN = "DFJ_HUGEPAGES"
CONSOLE_SCRIPT = "diff-fastener"  # [project.scripts] in pyproject.toml
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
    """The environment to re-execute with, or None when there is nothing to do.

    Nothing is done unless the user opted in (`DFJ_HUGEPAGES=1`); nor when the tunable is already set,
    when the kernel gives every mapping huge pages anyway (THP 'always') or none at all ('never'),
    or when the C library is not glibc >= 2.35 (the first with the tunable).
    """
    if environ.get(OPT_IN, "").strip().lower() not in ("1", "true", "yes", "on"):
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
    """Whether the interpreter was started as `python [options] -m diff_fastener_jax.<cmd> ...` or as
    the console script (`python /venv/bin/diff-fastener <cmd> ...`, how its shebang line starts it)."""
    i = 1
    while i < len(orig_argv):
        arg = orig_argv[i]
        if arg == "-m":
            return i + 1 < len(orig_argv) and orig_argv[i + 1].split(".")[0] == "diff_fastener_jax"
        if not arg.startswith("-"):  # a script: ours only if it is the console script
            return os.path.basename(arg) == CONSOLE_SCRIPT
        if arg == "-c":  # -c code: not one of our commands
            return False
        i += 2 if arg in ("-X", "-W") else 1  # the interpreter options that take a value
    return False


def reexec_with_hugepages() -> None:
    """With `DFJ_HUGEPAGES=1`, re-executes this command once with the hugetlb tunable (see the module
    docstring); else returns. Called by the command mains only, never on import."""
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
    return {
        "glibc_tunables": tunables,
        "malloc_hugepages": TUNABLE in (tunables or ""),
        "thp_mode": thp_mode(),
        "libc": libc_version(),
    }
