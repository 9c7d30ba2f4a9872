"""The Grafana dashboard in deploy/grafana/ shows what a real replica exposes: every metric
it queries is in a live `hoomi serve`'s /metrics, and the monitoring services in
compose.yaml load it (Prometheus scrapes the hubs, Grafana gets the datasource the
dashboard names and the directory it lives in)."""

from __future__ import annotations

import json
import re

import httpx
import yaml

from server.testing.inprocess import InProcessReplica
from server.testing.replica import ROOT

DEPLOY = ROOT / "deploy"
DASHBOARD = json.loads((DEPLOY / "grafana" / "dashboards" / "hoomi.json").read_text())
METRIC = re.compile(r"\b((?:hoomi|process|python)_[a-z0-9_]+)\b")
# The series each Prometheus metric type exposes, from its `# TYPE` name.
SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",), "untyped": ("",),
            "histogram": ("_bucket", "_count", "_sum", "_created"), "info": ("_info",),
            "summary": ("", "_count", "_sum", "_created")}


def panels() -> list[dict]:
    return [p for p in DASHBOARD["panels"] if p["type"] != "row"]


def queried() -> set[str]:
    return {m for p in panels() for t in p["targets"] for m in METRIC.findall(t["expr"])}


def exposed(text: str) -> set[str]:
    """Every series name /metrics can carry, including labelled counters that have no
    child yet (their # TYPE line is there before their first sample)."""
    names = {line.split("{", 1)[0].split(" ", 1)[0] for line in text.splitlines()
             if line and not line.startswith("#")}
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M):
        if kind == "counter":  # the text format names a counter's TYPE with its _total
            name = name.removesuffix("_total")
        names |= {name + suffix for suffix in SUFFIXES[kind]}
    return names


async def test_every_metric_the_dashboard_queries_is_on_a_real_replica(dsn):
    hub = await InProcessReplica(dsn, None, name="dash").start()
    try:
        async with httpx.AsyncClient() as http:
            text = (await http.get(hub.http + "/metrics")).text
    finally:
        await hub.stop()
    have = exposed(text)
    missing = queried() - have
    assert not missing, f"the dashboard queries metrics no replica exposes: {sorted(missing)}"
    # The operator's basics are there, next to the hub's own.
    assert {"process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds",
            "process_max_fds", "python_gc_collections_total", "python_info"} <= have


def test_every_panel_queries_the_hub_and_the_essentials_are_shown():
    for p in panels():
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert METRIC.search(t["expr"]), (p["title"], t["expr"])
            assert t["datasource"]["uid"] == p["datasource"]["uid"]
    shown = queried()
    for what in ("hoomi_connections", "hoomi_ack_seconds_count", "hoomi_ack_seconds_bucket",
                 "hoomi_writer_queue", "hoomi_writer_queue_bytes", "hoomi_errors_total"):
        assert what in shown, what
    ids = [p["id"] for p in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids))


def test_compose_loads_the_dashboard_through_prometheus_and_grafana():
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    # Prometheus scrapes every hub replica of the compose file, on the hub's port.
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = {t for job in prom["scrape_configs"] for sc in job["static_configs"]
               for t in sc["targets"]}
    hubs = {name for name in services if name.startswith("hub")}
    assert targets == {f"{h}:8000" for h in hubs}
    mounts = {v.split(":")[0]: v.split(":")[1] for v in services["prometheus"]["volumes"]}
    assert mounts["./deploy/prometheus/prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    # Grafana: the provisioning directory, and the dashboards where the provider looks.
    mounts = {v.split(":")[0]: v.split(":")[1] for v in services["grafana"]["volumes"]}
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    provider = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "dashboards" / "hoomi.yaml").read_text())
    path = provider["providers"][0]["options"]["path"]
    assert mounts["./deploy/grafana/dashboards"] == path
    datasources = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml").read_text())
    (ds,) = datasources["datasources"]
    assert ds["url"] == "http://prometheus:9090" and ds["type"] == "prometheus"
    assert {p["datasource"]["uid"] for p in panels()} == {ds["uid"]}
    assert "GRAFANA_ADMIN_PASSWORD:?" in services["grafana"]["environment"][
        "GF_SECURITY_ADMIN_PASSWORD"]  # no default admin password
