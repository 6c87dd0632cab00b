"""/metrics by Prometheus's conventions, checked by promtool on live replicas; /healthz."""

from __future__ import annotations

import platform
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from cluster import Cluster, Load, wait_until
from prometheus_client.parser import text_string_to_metric_families
from support import metric_samples as samples

import ftproxy
from ftproxy.shell.metrics import STATUS_FAMILIES

needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool is not installed (apt-get install prometheus)",
)


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return str(reply.read().decode())


def healthz(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def promtool(text: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )


@needs_promtool
def test_live_replicas_metrics_pass_promtool_through_a_failover(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path).start()
    load = Load(cluster.service_port, clients=2).start()
    try:
        wait_until(lambda: load.acknowledged() > 200, 20, "writes acknowledged")
        for admin in (cluster.primary_admin, cluster.backup_admin):
            text = scrape(admin)
            checked = promtool(text)
            assert checked.returncode == 0 and not checked.stdout + checked.stderr, (
                checked.stdout + checked.stderr + text
            )
            families = {f.name: f for f in text_string_to_metric_families(text)}
            for family in STATUS_FAMILIES:  # every declared family, with HELP and TYPE
                base = family.name.removesuffix("_total")
                assert base in families, f"{family.name} missing"
                assert f"# HELP {family.name} " in text and f"# TYPE {family.name} " in text
            assert families["ftproxy_channel_rtt_seconds"].type == "histogram"
            assert families["ftproxy_failover_seconds"].type == "histogram"
        primary = samples(scrape(cluster.primary_admin))
        assert primary["ftproxy_protected"] == 1
        assert primary['ftproxy_role{role="primary"}'] == 1
        assert primary["ftproxy_divergences_total"] == 0
        assert primary["ftproxy_failovers_total"] == 0
        assert primary["ftproxy_channel_rtt_seconds_count"] > 0
        assert primary["ftproxy_lag_observed_seconds_count"] > 0
        python, version = platform.python_version(), ftproxy.__version__
        build = f'ftproxy_build_info{{python="{python}",version="{version}"}}'
        assert primary[build] == 1
        backup = samples(scrape(cluster.backup_admin))
        assert backup["ftproxy_protected"] == 0  # a backup protects nothing of its own
        assert healthz(cluster.primary_admin)[0] == 200
        assert healthz(cluster.backup_admin) == (200, "backup: replaying, ready to take over\n")

        cluster.kill_primary()
        wait_until(
            lambda: samples(scrape(cluster.backup_admin))["ftproxy_failovers_total"] == 1,
            20,
            "the backup counts its failover",
        )
        live = scrape(cluster.backup_admin)
        assert promtool(live).returncode == 0, promtool(live).stdout
        after = samples(live)
        assert after['ftproxy_role{role="live"}'] == 1
        assert after["ftproxy_failover_seconds_count"] == 1
        assert 0 < after["ftproxy_failover_seconds_sum"] < 5
        assert after["ftproxy_protected"] == 0  # alone: a second failure would lose writes
        assert healthz(cluster.backup_admin) == (200, "live: serving alone\n")
    finally:
        load.stop()
        cluster.stop()
