"""The deploy files agree with each other and with the service they deploy."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from camserve.service.metrics import METRICS

ROOT = Path(__file__).resolve().parents[2]


def _config_ports() -> set[int]:
    text = (ROOT / "deploy/torchserve/config.properties").read_text()
    ports = {int(p) for p in re.findall(r"^\w+_address=https?://[\d.]+:(\d+)$", text, re.M)}
    ports |= {int(p) for p in re.findall(r"^grpc_\w+_port=(\d+)$", text, re.M)}
    return ports


def _compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def test_compose_references_existing_files() -> None:
    services = _compose()["services"]
    assert set(services) == {"camserve", "prometheus", "grafana"}
    build = services["camserve"]["build"]
    assert (ROOT / build["context"] / build["dockerfile"]).is_file()
    for name, svc in services.items():
        for volume in svc.get("volumes", []):
            host = volume.split(":")[0]
            assert (ROOT / host).exists(), f"{name}: missing {host}"
        for dep in svc.get("depends_on", []):
            assert dep in services


def test_compose_publishes_every_torchserve_port() -> None:
    published = {int(p.split(":")[1]) for p in _compose()["services"]["camserve"]["ports"]}
    assert published == _config_ports()
    dockerfile = (ROOT / "deploy/docker/Dockerfile").read_text()
    expose = re.search(r"^EXPOSE (.+)$", dockerfile, re.M)
    assert expose is not None
    exposed = {int(p) for p in expose[1].split()}
    assert exposed == _config_ports()


def test_prometheus_scrapes_the_metrics_port() -> None:
    prom = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    targets = [
        t for job in prom["scrape_configs"] for c in job["static_configs"] for t in c["targets"]
    ]
    metrics_port = re.search(
        r"^metrics_address=https?://[\d.]+:(\d+)$",
        (ROOT / "deploy/torchserve/config.properties").read_text(),
        re.M,
    )
    assert metrics_port is not None
    assert targets == [f"camserve:{metrics_port[1]}"]


def _declared_metric_names() -> set[str]:
    names = {spec.name for spec in METRICS}
    ts_yaml = yaml.safe_load((ROOT / "deploy/torchserve/metrics.yaml").read_text())
    for kind in ts_yaml["ts_metrics"].values():
        names |= {m["name"] for m in kind}
    return names


def test_dashboard_queries_only_declared_metrics() -> None:
    dash = json.loads((ROOT / "deploy/grafana/dashboards/camserve.json").read_text())
    declared = _declared_metric_names()
    used: set[str] = set()
    for panel in dash["panels"]:
        for target in panel["targets"]:
            for name in re.findall(r"\b((?:camserve|ts)_[a-z_]+)", target["expr"]):
                used.add(re.sub(r"_(bucket|sum|count)$", "", name))
    assert used, "the dashboard queries nothing"
    assert used <= declared, f"undeclared metrics: {sorted(used - declared)}"
    assert {spec.name for spec in METRICS} <= used, "a declared camserve metric has no panel"


@pytest.mark.parametrize("path", sorted((ROOT / "deploy/k8s").glob("*.yaml")))
def test_k8s_ports_match_the_service(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    kinds = {d["kind"]: d for d in docs}
    assert {"Deployment", "Service"} <= set(kinds)
    container = kinds["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert set(ports.values()) == _config_ports()
    for port in kinds["Service"]["spec"]["ports"]:
        assert ports[port["targetPort"]] == port["port"]
    annotations = kinds["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == ports["metrics"]


def test_the_image_installs_camserve_from_its_wheel() -> None:
    text = (ROOT / "deploy/docker/Dockerfile").read_text()
    _, build, runtime = text.split("\nFROM ")
    assert re.search(r"^RUN pip wheel --no-deps .* \.$", build, re.M)
    copied = {src for line in re.findall(r"^COPY (.+) \S+$", build, re.M) for src in line.split()}
    # The wheel's package data: camserve/torchserve/files/ links into these folders.
    for link in (ROOT / "camserve/torchserve/files").iterdir():
        assert str(link.resolve().relative_to(ROOT)) in copied, link
    assert re.search(r"pip install .*/dist/camserve-\*\.whl", runtime)
    assert re.findall(r"^COPY (.+)$", runtime, re.M) == ["--from=wheel /dist /dist"]

