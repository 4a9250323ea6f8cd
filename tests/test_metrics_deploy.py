"""deploy/prometheus and deploy/grafana: valid for promtool and Grafana, and every airgate_
metric they name is one airgate really exposes (a renamed metric must not silently empty a panel
or disarm an alert). promtool (Debian package `prometheus`) is used when it is on PATH."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import types
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from proxy.exchange import Exchange
from proxy.launcher.status import LauncherStatus
from proxy.metrics import ProxyCollector, ProxyMetrics
from proxy.metrics_launcher import GpuCollector, LauncherCollector
from proxy.metrics_relay import VllmRelay
from proxy.observability import _AccessLogCollector, _HostCollector

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "airgate.json"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed "
                                    "(apt-get install prometheus)")
# Grafana's variables, replaced by something PromQL accepts so promtool can parse the queries.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__range": "1h", "$instance": ".*"}


def promtool(*args: str, cwd: Path = PROMETHEUS) -> str:
    assert PROMTOOL is not None
    done = subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@needs_promtool
def test_promtool_accepts_config_and_rules() -> None:
    promtool("check", "config", "prometheus.yml")
    promtool("check", "rules", "airgate-rules.yml")


@needs_promtool
def test_alert_rules_fire_when_they_should() -> None:
    promtool("test", "rules", "airgate-rules.test.yml")


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, stand_in in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, stand_in)
            queries.append(expr)
    return queries


def test_dashboard_is_valid_json_with_the_panels_asked_for() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "airgate"
    titles = " ".join(panel["title"].lower() for panel in dashboard["panels"])
    for wanted in ("requests", "error", "first token", "tokens per second by token",
                   "launcher state", "kv cache"):
        assert wanted in titles
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))


@needs_promtool
def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    # promtool has no "parse this query" command; a rules file of recording rules is parsed
    # with the same PromQL parser.
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query{index}", "expr": expr}
        for index, expr in enumerate(dashboard_queries())]}]}
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(json.dumps(rules))  # JSON is YAML
    promtool("check", "rules", str(path), cwd=tmp_path)


def exposed_names() -> set[str]:
    """Every sample name airgate exposes, with every optional series present."""
    metrics = ProxyMetrics(["/v1/chat/completions"])
    ex = Exchange(0.0, 0.0, "127.0.0.1")
    ex.route, ex.status, ex.token_name, ex.end, ex.ttfb, ex.ttft = (
        "/v1/chat/completions", 200, "kibana", 1.0, 0.1, 0.2)
    ex.token_gaps, ex.model, ex.prompt_tokens, ex.completion_tokens = [0.01], "m", 1, 1
    metrics.exchange_started(ex)
    metrics.exchange_finished(ex)
    status = LauncherStatus(state="ready", progress=1.0, last_exit_code=0, time_to_ready=1.0,
                            health_latency=0.01)
    gpu = GpuCollector()
    fake = types.SimpleNamespace(
        nvmlInit=lambda: None, nvmlDeviceGetCount=lambda: 1, nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=1, total=2),
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=1))
    gpu._nvml = fake

    class AnyLog:
        dropped = 0

    registry = CollectorRegistry(auto_describe=False)
    for collector in (ProxyCollector(metrics), LauncherCollector(lambda: status), gpu,
                      _HostCollector(VllmRelay("http://127.0.0.1:9", 1.0)),
                      _AccessLogCollector(AnyLog())):  # type: ignore[arg-type]
        registry.register(collector)
    text = generate_latest(registry).decode()
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines()
            if line and not line.startswith("#")}


def referenced_names(texts: list[str]) -> set[str]:
    return {name for text in texts for name in re.findall(r"\bairgate_[a-z_]+", text)}


def rule_exprs(text: str) -> list[str]:
    """The `expr:` values of a rules file, one-line or `|` blocks (not the annotations, whose
    mentions of metrics are for people)."""
    exprs: list[str] = []
    lines = text.splitlines()
    for index, line in enumerate(lines):
        key, _, rest = line.strip().partition("expr:")
        if key or not _:
            continue
        if rest.strip() != "|":
            exprs.append(rest.strip())
            continue
        indent = len(line) - len(line.lstrip())
        block = []
        for following in lines[index + 1:]:
            if following.strip() and len(following) - len(following.lstrip()) <= indent:
                break
            block.append(following.strip())
        exprs.append(" ".join(block))
    return exprs


def test_rules_and_dashboard_only_name_metrics_airgate_exposes() -> None:
    exprs = rule_exprs((PROMETHEUS / "airgate-rules.yml").read_text())
    assert len(exprs) == 9
    used = referenced_names(exprs) | referenced_names(dashboard_queries())
    assert "airgate_time_to_first_token_seconds_bucket" in used
    assert used - exposed_names() == set()
