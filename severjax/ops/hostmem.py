"""Host memory: ask glibc's malloc for transparent huge pages, which XLA:CPU's scratch buffers need at speed.

Why: at every call XLA:CPU mallocs the program's whole scratch buffer (gigabytes for a training step) and
frees it at the end. glibc serves an allocation that big with a fresh ``mmap``, so the kernel faults it in
again, 4 KiB at a time, on every call. With glibc's ``glibc.malloc.hugetlb=1`` tunable malloc marks its
memory ``MADV_HUGEPAGE`` and the kernel faults it in 2 MiB at a time (docs/performance.md, "Host memory and
huge pages").

glibc reads tunables only when a process starts, so :func:`reexec_with_huge_pages` restarts the running
command once with the tunable added to ``GLIBC_TUNABLES``. The command-line entry points call it first;
importing severjax as a library changes nothing. Set ``SEVERJAX_HUGE_PAGES=0`` to opt out. It does nothing
where it cannot help: not Linux, not glibc, transparent huge pages ``never``, the tunable already set
(either way) by the user.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb"
OPT_OUT_ENV = "SEVERJAX_HUGE_PAGES"
THP_SYSFS = "/sys/kernel/mm/transparent_hugepage/enabled"


def thp_mode(path: str = THP_SYSFS) -> str | None:
    """The kernel's transparent-huge-page mode (``always``, ``madvise`` or ``never``); None if unknown."""
    try:
        with open(path) as f:
            words = f.read().split()
    except OSError:
        return None
    for word in words:
        if word.startswith("[") and word.endswith("]"):
            return word[1:-1]
    return None


def can_use_huge_pages() -> bool:
    """Whether the tunable can work here: Linux, glibc, and transparent huge pages not ``never``."""
    return (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
            and thp_mode() in ("always", "madvise"))


def _tunable_value(tunables: str) -> str | None:
    """The value ``GLIBC_TUNABLES``-style text gives ``glibc.malloc.hugetlb``; None if it names it not."""
    return next((e.split("=", 1)[1] for e in tunables.split(":") if e.split("=", 1)[0] == TUNABLE), None)


def tunables_with_huge_pages(current: str) -> str | None:
    """``GLIBC_TUNABLES`` with ``glibc.malloc.hugetlb=1`` added; None when it already names that tunable.

    A value the user chose (``=0`` included) is kept: None tells the caller to leave the process alone.
    """
    if _tunable_value(current) is not None:
        return None
    return ":".join([e for e in current.split(":") if e] + [f"{TUNABLE}=1"])


def huge_pages_on() -> bool:
    """Whether this process's malloc asks for huge pages: the tunable set (not 0) where it can work."""
    return _tunable_value(os.environ.get("GLIBC_TUNABLES", "")) not in (None, "0") and can_use_huge_pages()


def huge_pages_status() -> str:
    """One line for logs and benchmark records: whether this process runs with the tunable, and the THP mode."""
    value = _tunable_value(os.environ.get("GLIBC_TUNABLES", ""))
    return (f"host huge pages {'on' if huge_pages_on() else 'off'} ({TUNABLE}={value or 'unset'}, "
            f"THP {thp_mode() or 'unknown'})")


def reexec_with_huge_pages() -> None:
    """Restart this command once with ``glibc.malloc.hugetlb=1`` in ``GLIBC_TUNABLES``; return if not needed.

    Call it first thing in a command-line ``__main__``: the process is replaced (same pid, arguments, working
    directory and environment plus the tunable), so nothing done before it survives. Returns without
    restarting where the tunable cannot help or is already decided, and when the command line cannot be
    replayed (``python -`` reading a script from stdin).
    """
    if os.environ.get(OPT_OUT_ENV, "1") == "0" or not can_use_huge_pages():
        return
    tunables = tunables_with_huge_pages(os.environ.get("GLIBC_TUNABLES", ""))
    argv = list(getattr(sys, "orig_argv", []))
    if tunables is None or len(argv) < 2 or argv[1] == "-":
        return
    env = dict(os.environ, GLIBC_TUNABLES=tunables)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *argv[1:]], env)
    except OSError as err:  # keep running as we are: slower, not wrong
        print(f"severjax: could not restart with {TUNABLE}=1 ({err}); running without huge pages",
              file=sys.stderr)
