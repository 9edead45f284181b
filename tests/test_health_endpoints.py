"""The --metrics port's health endpoints, for probes: /healthz (the process serves) and /ready
(every forward listens and has an upstream not marked down), with and without prometheus_client,
against a real forwarder process on both backends."""

from __future__ import annotations

import os
import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import Tuple

import pytest

from test_forwarder import EchoServer, forwarders  # noqa: F401  (fixture)
from test_forwarder_ops import wait_for


def get(url: str) -> Tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.mark.signals
def test_ready_follows_the_upstreams(forwarders):  # noqa: F811
    server = EchoServer()
    port = server.address[1]
    fp = forwarders(
        "127.0.0.1:0",
        f"127.0.0.1:{port}",
        "--metrics",
        "127.0.0.1:0",
        "--check-interval",
        "0.1",
        "--check-fall",
        "2",
        "--check-rise",
        "1",
    )
    base = "http://" + fp.wait_log(r"tcptotcp: (?:metrics|health) on http://(127\.0\.0\.1:\d+)").group(1)
    assert get(base + "/healthz") == (200, "ok\n")
    assert get(base + "/ready") == (200, "ready\n")
    server.close()  # connects are refused now: two checks mark it down
    assert wait_for(lambda: get(base + "/ready")[0] == 503, 15)
    status, body = get(base + "/ready")
    assert body == f"{fp.address}: every upstream is down (127.0.0.1:{port})\n"
    assert get(base + "/healthz") == (200, "ok\n")  # alive all the same
    fp.wait_log(rf"upstream 127\.0\.0\.1:{port} down: connection refused \(2 checks\)")
    again = socket.socket()  # the same port, listening again
    again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        again.bind(("127.0.0.1", port))
        again.listen(8)
        assert wait_for(lambda: get(base + "/ready") == (200, "ready\n"), 15)
        fp.wait_log(rf"upstream 127\.0\.0\.1:{port} up: connected \(1 check\)")
    finally:
        again.close()
    assert get(base + "/nothing")[0] == 404


@pytest.mark.signals
def test_health_without_prometheus_client(forwarders, tmp_path: Path, monkeypatch):  # noqa: F811
    """--metrics starts without prometheus_client, says so, and serves the health endpoints."""
    hidden = tmp_path / "hide"
    (hidden / "prometheus_client").mkdir(parents=True)
    (hidden / "prometheus_client" / "__init__.py").write_text("raise ImportError('hidden for a test')\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(hidden), os.environ.get("PYTHONPATH")])))
    server = EchoServer()
    try:
        fp = forwarders("127.0.0.1:0", f"127.0.0.1:{server.address[1]}", "--metrics", "127.0.0.1:0")
        base = "http://" + fp.wait_log(r"tcptotcp: health on http://(127\.0\.0\.1:\d+)$").group(1)
        fp.wait_log(r"prometheus_client.*serving only /healthz and /ready")
        assert get(base + "/healthz") == (200, "ok\n")
        assert get(base + "/ready") == (200, "ready\n")
        status, body = get(base + "/metrics")
        assert status == 404 and "prometheus_client" in body
    finally:
        server.close()
