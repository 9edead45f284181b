"""The engine's kqueue build (macOS, the BSDs) compiles, warning-free, on this Linux machine:
with a stand-in <sys/event.h> and __linux__ undefined, every kqueue branch of the loops (the
poller, the listener's watch, accept without accept4, sockets without SOCK_NONBLOCK) is type-
checked. It cannot run here; the wheels workflow runs the suite on macOS."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = os.path.join(os.path.dirname(HERE), "src", "tcptotcp")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="elsewhere the real build is the check")
@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
@pytest.mark.skipif(not os.path.exists(os.path.join(SOURCES, "_loop.h")), reason="sources not in this tree")
def test_the_kqueue_build_compiles_without_warnings():
    program = '#include "_loop.h"\nint main(void) { return t2t_loop_count(); }\n'
    proc = subprocess.run(
        [
            "cc",
            "-std=gnu11",
            "-fsyntax-only",
            "-U__linux__",
            "-Wall",
            "-Wextra",
            "-Wno-unused-function",
            "-I",
            os.path.join(HERE, "data", "kqueue"),
            "-I",
            SOURCES,
            "-x",
            "c",
            "-",
        ],
        input=program,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr
