"""Fixtures: every test runs over both backends, on real loopback sockets."""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
import types

import pytest

import tcptotcp
import tcptotcp.pure
from tcptotcp import _bridge
from tcptotcp._backend import env_flag


def core_required() -> bool:
    """In CI (unless it deliberately tests the pure build) a missing core is a failure."""
    if env_flag("TCPTOTCP_NO_EXTENSIONS"):
        return False
    return env_flag("TCPTOTCP_REQUIRE_CORE") or env_flag("CI")


def _core_backend(splice: bool) -> types.SimpleNamespace:
    if tcptotcp.BACKEND != "cython":
        if core_required():
            pytest.fail("the compiled core did not load (tcptotcp.BACKEND == 'pure')")
        pytest.skip("compiled core not built")
    if splice:
        return types.SimpleNamespace(name="cython", connect=tcptotcp.connect, Bridge=tcptotcp.Bridge, module=tcptotcp)
    from tcptotcp import _core

    class CopyBridge(_bridge.Bridge):
        fd_engine = staticmethod(functools.partial(_core.start, splice=False))
        engine_name = "cython"

    return types.SimpleNamespace(
        name="cython-copy", connect=_bridge.connect_with(CopyBridge), Bridge=CopyBridge, module=tcptotcp
    )


def _make_backend(name: str) -> types.SimpleNamespace:
    if name == "pure":
        mod = tcptotcp.pure
        return types.SimpleNamespace(name="pure", connect=mod.connect, Bridge=mod.Bridge, module=mod)
    return _core_backend(splice=(name == "cython"))


@pytest.fixture(params=["cython", "pure"])
def backend(request) -> types.SimpleNamespace:
    """The public face of each backend: .connect, .Bridge, .module, .name."""
    return _make_backend(request.param)


@pytest.fixture(params=["cython", "cython-copy", "pure"])
def engine(request) -> types.SimpleNamespace:
    """Like `backend`, plus the compiled core with splice off (its recv/send path)."""
    return _make_backend(request.param)


@pytest.fixture(params=["cython", "cython-pure-listener", "pure"])
def forward_backend(request, monkeypatch) -> types.SimpleNamespace:
    """`backend` for forwarder tests: each backend with its own listener, and the compiled core's
    bridges behind the pure listener (TCPTOTCP_ACCEPT_IN_PYTHON=1), so that every forwarder test
    runs over both listener implementations. `.listener` says which one serves ("loops" or
    "python"); `.name` is the bridges' backend."""
    if request.param == "cython-pure-listener":
        ns = _make_backend("cython")
        monkeypatch.setenv("TCPTOTCP_ACCEPT_IN_PYTHON", "1")
        ns.listener = "python"
        return ns
    ns = _make_backend(request.param)
    ns.listener = "loops" if request.param == "cython" else "python"
    return ns


@pytest.fixture
def socket_dir():
    """A short directory for Unix socket paths (macOS caps them at 104 bytes; tmp_path is long)."""
    path = tempfile.mkdtemp(prefix="t2t", dir="/tmp" if os.path.isdir("/tmp") else None)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def pytest_collection_modifyitems(items: list) -> None:
    """Mark every test of a compiled engine `core`: platforms without it deselect them."""
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        chosen = params.get("backend", params.get("engine", params.get("forward_backend")))
        if chosen in ("cython", "cython-copy", "cython-pure-listener"):
            item.add_marker(pytest.mark.core)
