"""Prometheus metrics: drive the events, scrape /metrics over real HTTP, check exact values."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from typing import Dict, Tuple

import pytest

from tcptotcp._metrics import parse_hostport

LISTEN = "127.0.0.1:8080"
UPSTREAM = "127.0.0.1:80"

Samples = Dict[Tuple[str, Tuple[Tuple[str, str], ...]], float]


@pytest.fixture
def metrics():
    pytest.importorskip("prometheus_client")
    from tcptotcp._metrics import Metrics

    m = Metrics()
    yield m
    m.close()


def scrape(url: str, accept: str = "") -> Tuple[str, Samples]:
    from prometheus_client.parser import text_string_to_metric_families

    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(request, timeout=5) as response:
        content_type = response.headers["Content-Type"]
        text = response.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return content_type, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def test_scrape_has_exact_values(metrics) -> None:
    fm = metrics.forward(LISTEN, UPSTREAM)
    for _ in range(4):
        fm.accepted()
    fm.upstream_failed()
    fm.refused("access")
    fm.refused("rate limit")
    fm.refused("rate limit")
    fm.opened()
    fm.opened()
    fm.ended("closed", 100, 250, 0.02)
    metrics.accepted("[::1]:9000")  # the by-label API: a second forward
    metrics.upstream_failed("[::1]:9000", "unix:/run/x.sock")

    host, port = metrics.serve("127.0.0.1", 0)
    assert host == "127.0.0.1" and port > 0
    assert metrics.address == (host, port)
    content_type, samples = scrape(f"http://127.0.0.1:{port}/metrics")
    assert content_type.startswith("text/plain")

    one = {"listen": LISTEN}
    assert value(samples, "tcptotcp_connections_accepted_total", **one) == 4
    assert value(samples, "tcptotcp_connections_refused_total", reason="access", **one) == 1
    assert value(samples, "tcptotcp_connections_refused_total", reason="rate limit", **one) == 2
    assert value(samples, "tcptotcp_connections_active", **one) == 1
    assert value(samples, "tcptotcp_upstream_connect_failures_total", upstream=UPSTREAM, **one) == 1
    assert value(samples, "tcptotcp_bytes_up_total", **one) == 100
    assert value(samples, "tcptotcp_bytes_down_total", **one) == 250
    assert value(samples, "tcptotcp_bridges_ended_total", reason="closed", **one) == 1
    for reason in ("idle", "error", "stopped"):  # made up front: the series exist at 0
        assert value(samples, "tcptotcp_bridges_ended_total", reason=reason, **one) == 0
    assert value(samples, "tcptotcp_bridge_duration_seconds_count", **one) == 1
    assert value(samples, "tcptotcp_bridge_duration_seconds_sum", **one) == pytest.approx(0.02)
    assert value(samples, "tcptotcp_bridge_duration_seconds_bucket", le="0.01", **one) == 0
    assert value(samples, "tcptotcp_bridge_duration_seconds_bucket", le="0.05", **one) == 1
    assert value(samples, "tcptotcp_bridge_duration_seconds_bucket", le="3600.0", **one) == 1
    assert value(samples, "tcptotcp_bridge_duration_seconds_bucket", le="+Inf", **one) == 1

    two = {"listen": "[::1]:9000"}
    assert value(samples, "tcptotcp_connections_accepted_total", **two) == 1
    assert value(samples, "tcptotcp_upstream_connect_failures_total", upstream="unix:/run/x.sock", **two) == 1
    assert value(samples, "tcptotcp_connections_active", **two) == 0


def test_bucket_bounds(metrics) -> None:
    from tcptotcp._metrics import DURATION_BUCKETS

    assert DURATION_BUCKETS[0] == 0.001 and DURATION_BUCKETS[-1] == 3600
    assert list(DURATION_BUCKETS) == sorted(DURATION_BUCKETS)


def test_forward_children_are_shared(metrics) -> None:
    assert metrics.forward(LISTEN) is metrics.forward(LISTEN)
    assert metrics.forward(LISTEN) is not metrics.forward("127.0.0.1:8081")
    with pytest.raises(ValueError, match="needs the upstream"):
        metrics.forward(LISTEN).upstream_failed()


def test_unknown_reason_gets_its_series(metrics) -> None:
    fm = metrics.forward(LISTEN)
    fm.opened()
    fm.ended("something-new", 1, 2, 3.0)
    fm.opened()
    fm.ended("something-new", 1, 2, 3.0)
    _, samples = scrape_local(metrics)
    assert value(samples, "tcptotcp_bridges_ended_total", listen=LISTEN, reason="something-new") == 2
    assert value(samples, "tcptotcp_connections_active", listen=LISTEN) == 0


def scrape_local(metrics, path: str = "/metrics", accept: str = "") -> Tuple[str, Samples]:
    port = metrics.address[1] if metrics.address else metrics.serve("127.0.0.1", 0)[1]
    return scrape(f"http://127.0.0.1:{port}{path}", accept)


def test_active_is_exact_across_threads(metrics) -> None:
    fm = metrics.forward(LISTEN)

    def churn() -> None:
        for _ in range(500):
            fm.accepted()
            fm.opened()
            fm.ended("closed", 1, 1, 0.001)

    threads = [threading.Thread(target=churn) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    _, samples = scrape_local(metrics)
    assert value(samples, "tcptotcp_connections_active", listen=LISTEN) == 0
    assert value(samples, "tcptotcp_connections_accepted_total", listen=LISTEN) == 2000
    assert value(samples, "tcptotcp_bytes_up_total", listen=LISTEN) == 2000


def test_query_string_and_openmetrics(metrics) -> None:
    metrics.forward(LISTEN).accepted()
    content_type, samples = scrape_local(metrics, "/metrics?x=1")
    assert value(samples, "tcptotcp_connections_accepted_total", listen=LISTEN) == 1
    port = metrics.address[1]
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.headers["Content-Type"].startswith("application/openmetrics-text")
        assert response.read().rstrip().endswith(b"# EOF")


@pytest.mark.parametrize("path", ["/", "/metric", "/metrics/x", "/favicon.ico"])
def test_other_paths_are_404(metrics, path: str) -> None:
    _, port = metrics.serve("127.0.0.1", 0)
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5)
    assert info.value.code == 404
    info.value.close()


def test_close_frees_the_port(metrics) -> None:
    _, port = metrics.serve("127.0.0.1", 0)
    scrape(f"http://127.0.0.1:{port}/metrics")
    with pytest.raises(RuntimeError, match="already"):
        metrics.serve("127.0.0.1", 0)
    metrics.close()
    metrics.close()  # a second close is a no-op
    assert metrics.address is None
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    # The port is free again: serving on it once more works.
    assert metrics.serve("127.0.0.1", port) == ("127.0.0.1", port)
    scrape(f"http://127.0.0.1:{port}/metrics")


def test_serve_on_a_busy_port_fails_cleanly(metrics) -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        with pytest.raises(OSError):
            metrics.serve("127.0.0.1", busy.getsockname()[1])
        assert metrics.address is None
        _, port = metrics.serve("127.0.0.1", 0)  # nothing was left half set up
        scrape(f"http://127.0.0.1:{port}/metrics")
    finally:
        busy.close()


def test_instances_do_not_share_a_registry(metrics) -> None:
    from prometheus_client import REGISTRY

    from tcptotcp._metrics import Metrics

    other = Metrics()
    metrics.forward(LISTEN).accepted()
    assert other.registry is not metrics.registry
    assert b'tcptotcp_connections_accepted_total{listen="127.0.0.1:8080"} 1.0' in metrics.exposition()[0]
    assert b"tcptotcp_connections_accepted_total{" not in other.exposition()[0]
    assert REGISTRY.get_sample_value("tcptotcp_connections_accepted_total", {"listen": LISTEN}) is None


def test_serve_ipv6(metrics) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        host, port = metrics.serve("::1", 0)
    except OSError:
        pytest.skip("no IPv6 loopback")
    assert host == "::1"
    scrape(f"http://[::1]:{port}/metrics")


def test_serve_unresolvable_host(metrics) -> None:
    with pytest.raises(OSError, match="cannot resolve"):
        metrics.serve("no-such-host.invalid", 0)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("127.0.0.1:9464", ("127.0.0.1", 9464)),
        ("localhost:0", ("localhost", 0)),
        ("[::1]:9464", ("::1", 9464)),
        (":9464", ("", 9464)),
    ],
)
def test_parse_hostport(text: str, expected: Tuple[str, int]) -> None:
    assert parse_hostport(text) == expected


@pytest.mark.parametrize(
    "text, message",
    [
        ("9464", "expected host:port"),
        ("::1:9464", "in brackets"),
        ("[]:9464", "empty IPv6"),
        ("host:http", "not a number"),
        ("host:-1", "not a number"),
        ("host:", "not a number"),
        ("host:65536", "out of range"),
    ],
)
def test_parse_hostport_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        parse_hostport(text)
    assert repr(text) in str(info.value)


def test_missing_prometheus_client_is_a_clear_error() -> None:
    code = (
        "import sys; sys.modules['prometheus_client'] = None\n"
        "import tcptotcp._metrics as m\n"
        "assert m.parse_hostport('127.0.0.1:1') == ('127.0.0.1', 1)\n"
        "try:\n"
        "    m.Metrics()\n"
        "except m.MetricsUnavailable as exc:\n"
        "    assert isinstance(exc, RuntimeError)\n"
        "    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "--metrics needs the prometheus_client package: pip install 'tcptotcp[metrics]'"
