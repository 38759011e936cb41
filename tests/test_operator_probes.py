"""The operator pod's readiness: /readyz on the metrics port says whether this replica reaches the
API server (it could lead or take over); /metrics is served beside it."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest

from moe_operator.controller import election, metrics
from moe_operator.controller.kube import KubeError


class LeaseApi:
    """The Lease endpoints as `LeaderElector` calls them: up (no Lease yet, create works) or down."""

    def __init__(self):
        self.up = True

    def request(self, method: str, path: str, body=None, **_):
        if not self.up:
            raise KubeError(0, "connection refused")
        if method == "GET":
            raise KubeError(404, "not found")
        return body


class Clock:
    def __init__(self):
        self.t = 1000.0

    def monotonic(self) -> float:
        return self.t


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.fixture
def served():
    api, clock = LeaseApi(), Clock()
    elector = election.LeaderElector(api, identity="op-a", duration_s=15, renew_s=5)
    httpd = metrics.serve("127.0.0.1", 0, elector.unready_reason)
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield api, clock, elector, url
    httpd.shutdown()
    httpd.server_close()


def test_readyz_follows_the_api_servers_answers_to_leader_election(served, monkeypatch):
    api, clock, elector, url = served
    monkeypatch.setattr(election.time, "monotonic", clock.monotonic)
    status, body = get(f"{url}/readyz")
    assert status == 503 and "not answered a leader-election round yet" in body
    api.up = False
    elector.try_acquire_or_renew()
    assert get(f"{url}/readyz")[0] == 503
    api.up = True
    assert elector.try_acquire_or_renew()
    assert get(f"{url}/readyz") == (200, "ok\n")
    api.up = False  # the API server goes away: ready for a Lease's duration, then not
    clock.t += 10
    elector.try_acquire_or_renew()
    assert get(f"{url}/readyz")[0] == 200
    clock.t += 10
    elector.try_acquire_or_renew()
    status, body = get(f"{url}/readyz")
    assert status == 503 and "for 20 s" in body


def test_metrics_are_served_beside_readyz_and_nothing_else(served):
    _, _, _, url = served
    metrics.RECONCILES.inc()
    status, body = get(f"{url}/metrics")
    assert status == 200 and "moe_operator_reconciles_total" in body
    assert get(f"{url}/")[0] == 404 and get(f"{url}/healthz")[0] == 404
