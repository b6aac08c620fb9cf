"""severjax.ops.hostmem: the GLIBC_TUNABLES edit, the one-time restart, and that malloc then faults in huge pages."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import pytest

from severjax.ops import hostmem

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CAN_RESTART = (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
               and hostmem.thp_mode() in ("always", "madvise"))


def test_thp_mode_reads_the_bracketed_word(tmp_path):
    path = tmp_path / "enabled"
    path.write_text("always [madvise] never\n")
    assert hostmem.thp_mode(str(path)) == "madvise"
    path.write_text("[always] madvise never\n")
    assert hostmem.thp_mode(str(path)) == "always"
    assert hostmem.thp_mode(str(tmp_path / "missing")) is None


def test_tunables_are_added_once_and_a_user_choice_is_kept():
    assert hostmem.tunables_with_huge_pages("") == "glibc.malloc.hugetlb=1"
    assert (hostmem.tunables_with_huge_pages("glibc.malloc.arena_max=2")
            == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1")
    assert hostmem.tunables_with_huge_pages("glibc.malloc.hugetlb=1") is None
    assert hostmem.tunables_with_huge_pages("glibc.malloc.arena_max=2:glibc.malloc.hugetlb=0") is None


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", hostmem.OPT_OUT_ENV)}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env={**base, **env},
                          capture_output=True, text=True, timeout=120, check=True)


RESTART = """
    import os
    from severjax.ops import hostmem
    print("start", os.getpid(), flush=True)
    hostmem.reexec_with_huge_pages()
    print("main", os.getpid(), os.environ.get("GLIBC_TUNABLES"), hostmem.huge_pages_status())
"""


@pytest.mark.skipif(not CAN_RESTART, reason="needs Linux, glibc and transparent huge pages not 'never'")
def test_restart_happens_once_with_the_tunable_and_the_same_pid():
    lines = _run(RESTART).stdout.splitlines()
    starts = [line for line in lines if line.startswith("start")]
    mains = [line.split(" ", 3) for line in lines if line.startswith("main")]
    assert len(starts) == 2 and starts[0] == starts[1], lines   # ran twice, same process (exec)
    assert len(mains) == 1 and mains[0][1] == starts[0].split()[1], lines
    assert mains[0][2] == "glibc.malloc.hugetlb=1" and mains[0][3].startswith("host huge pages on"), lines


def test_opt_out_and_a_user_value_leave_the_process_alone():
    for env in ({hostmem.OPT_OUT_ENV: "0"}, {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}):
        lines = _run(RESTART, **env).stdout.splitlines()
        assert sum(line.startswith("start") for line in lines) == 1, (env, lines)
        assert "host huge pages off" in lines[-1], (env, lines)


FAULTS = """
    import ctypes, resource
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    size = 256 << 20
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    ptr = libc.malloc(ctypes.c_size_t(size))
    ctypes.memset(ptr, 1, size)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not CAN_RESTART or hostmem.thp_mode() != "madvise",
                    reason="the contrast needs THP in 'madvise' mode (with 'always' both runs get huge pages)")
def test_the_tunable_makes_a_big_malloc_fault_in_huge_pages():
    """A 256 MiB malloc as XLA's scratch buffer is served: 65,536 faults of 4 KiB without the tunable."""
    plain = int(_run(FAULTS).stdout)
    huge = int(_run(FAULTS, GLIBC_TUNABLES="glibc.malloc.hugetlb=1").stdout)
    assert plain > 60_000, plain
    assert huge < plain // 4, (huge, plain)
