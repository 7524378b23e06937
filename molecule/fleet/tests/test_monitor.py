"""The monitor host (monitor1) on the deployed lab: its services, Prometheus's targets and the alert rules
(promtool), Flower behind basic auth in a real browser, task events reaching it, and no secret on a command line.
Queue depths through the exporter and Prometheus are checked in test_status.py, with the drained node."""

import base64
import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import quote

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fleet import (EXPECTED_NODES, EXPORTER, MONITOR, PROJECT, lab_host, monitor_get, promql, run_python,
                   wait_for)

FLOWER_USER = "admin"
# LAB ONLY: inventories/lab's public vault holds it (the README says so); the tests log in with it.
FLOWER_PASSWORD = "Lab-flower/8%Xv#'Jm\"Tz2Qb6-FLOWERMARK"
SECRET_MARKS = ("FLOWERMARK", "MONMARK", "LEAKMARK", "ADMINMARK")
ARTIFACTS = PROJECT / ".artifacts"


@pytest.fixture(scope="module")
def monitor():
    return lab_host(MONITOR)


@pytest.fixture(scope="module")
def flower_url(monitor):
    address = monitor.interface("eth0").addresses[0]
    return f"http://{address}:5555"


def test_the_monitor_services_run_and_prometheus_scrapes_every_target(monitor):
    for unit in ("celery-fleet-exporter", "celery-fleet-flower", "prometheus", "prometheus-redis-exporter"):
        assert monitor.service(unit).is_running, unit
    seen = []

    def every_target_up():
        seen.append({labels["job"]: value for labels, value in promql("up")})
        return seen[-1] if len(seen[-1]) == 4 and all(value == 1 for value in seen[-1].values()) else None

    try:
        targets = wait_for(every_target_up, 60, "every target up")
    except AssertionError as error:
        raise AssertionError(f"{error}; up by job, last seen: {seen[-1:]}") from None
    assert set(targets) == {"celery-fleet", "redis", "flower", "prometheus"}
    # Redis's exporter logs in as the read-only monitoring user: the broker answers, no permission error.
    assert [value for _, value in promql("redis_up")] == [1.0]
    assert [value for _, value in promql("celery_fleet_broker_up")] == [1.0]
    log = monitor.run("journalctl -u prometheus-redis-exporter --since=-10min --no-pager").stdout
    assert "NOPERM" not in log and "WRONGPASS" not in log, log[-2000:]


def test_the_alert_rules_pass_promtool_s_tests(monitor):
    """promtool test rules on monitor1, against the rules the role installed there."""
    tests = (Path(__file__).parent / "files" / "celery-fleet.rules.test.yml").read_text()
    encoded = base64.b64encode(tests.encode()).decode()
    result = monitor.run(f"echo {encoded} | base64 -d > /tmp/celery-fleet.rules.test.yml && "
                         "promtool test rules /tmp/celery-fleet.rules.test.yml")
    assert result.rc == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr
    names = {rule["name"] for group in json.loads(monitor_get("http://127.0.0.1:9090/api/v1/rules")[1])["data"][
        "groups"] for rule in group["rules"]}
    assert names == {"CeleryFleetGroupBelowMinimum", "CeleryFleetGroupDegraded", "CeleryFleetQueueBacklog",
                     "CeleryFleetQueueOldestMessage", "CeleryFleetTaskFailureRatio", "CeleryFleetFlowerDown",
                     "CeleryFleetBrokerDown", "CeleryFleetBrokerMemoryHigh"}, names


def test_the_exporter_answers_scrapes_from_its_last_refresh(monitor):
    """Every node of the inventory reported, with the exporter's own metrics parsing as Prometheus parses them;
    a scrape never waits for the fleet (20 scrapes timed on monitor1)."""
    status, body = monitor_get(EXPORTER)
    assert status == 200
    families = {family.name: family for family in text_string_to_metric_families(body)}
    nodes = {sample.labels["node"]: sample.value for sample in families["celery_fleet_node_up"].samples}
    assert nodes == {node: 1.0 for node in EXPECTED_NODES}, nodes
    info = {sample.labels["node"]: sample.labels for sample in families["celery_fleet_node_info"].samples}
    assert {node: (labels["group"], labels["pool"]) for node, labels in info.items()} == {
        node: (expected["group"], "prefork") for node, expected in EXPECTED_NODES.items()}
    assert all(labels["release"] for labels in info.values()), info
    timing = monitor.run("python3 -c \"import time, urllib.request\n"
                         "t = []\nfor _ in range(20):\n    s = time.monotonic()\n"
                         f"    urllib.request.urlopen('{EXPORTER}').read()\n    t.append(time.monotonic() - s)\n"
                         "print(max(t), sorted(t)[10])\"")
    slowest, median = map(float, timing.stdout.split())
    print(f"exporter scrape with {len(EXPECTED_NODES)} nodes: median {median * 1000:.1f} ms, "
          f"max {slowest * 1000:.1f} ms")
    assert slowest < 1.0, timing.stdout


def test_flower_refuses_without_credentials_and_its_metrics_parse(flower_url):
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{flower_url}/workers", timeout=10)
    assert refused.value.code == 401
    request = urllib.request.Request(f"{flower_url}/workers")
    token = base64.b64encode(f"{FLOWER_USER}:{FLOWER_PASSWORD}".encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200
    wrong = urllib.request.Request(f"{flower_url}/workers", headers={"Authorization": "Basic " + base64.b64encode(
        f"{FLOWER_USER}:{FLOWER_PASSWORD}x".encode()).decode()})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(wrong, timeout=10)
    assert refused.value.code == 401
    # Read-only (celery_monitor_flower_read_only): with the password, the control API is refused. (Revoking an id
    # no task has would change nothing, were it accepted.)
    revoke = urllib.request.Request(f"{flower_url}/api/task/revoke/00000000-0000-0000-0000-000000000000",
                                    data=b"", method="POST", headers={"Authorization": f"Basic {token}"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(revoke, timeout=10)
    assert refused.value.code == 403, refused.value.read()
    # (Flower 2.2 serves /metrics without auth: the README says to bind it where only operators reach it.)
    with urllib.request.urlopen(f"{flower_url}/metrics", timeout=10) as response:
        families = {family.name for family in text_string_to_metric_families(response.read().decode())}
    assert {"flower_events", "flower_worker_online"} <= families, families


def test_tasks_send_events_that_flower_counts(flower_url):
    """Workers send task events while the fleet has a monitor (-E, task_send_sent_event through the runtime)."""
    def succeeded():
        with urllib.request.urlopen(f"{flower_url}/metrics", timeout=10) as response:
            text = response.read().decode()
        return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
                   if sample.name == "flower_events_total" and sample.labels.get("type") == "task-succeeded"
                   and sample.labels.get("task") == "celery_fleet_app.tasks.benchmark_task")
    before = succeeded()
    sent = run_python(lab_host("web1"), """
import json
from celery_fleet_runtime import app
results = [app.send_task("celery_fleet_app.tasks.benchmark_task", args=[n], queue="default") for n in range(10)]
print(json.dumps([r.get(timeout=30) for r in results]))
""")
    assert len(sent) == 10
    wait_for(lambda: succeeded() >= before + 10, 20, "Flower counting the 10 tasks' events")


def test_flower_s_page_lists_every_node_in_a_browser(flower_url):
    """Headless Chromium (Debian's) logs in with basic auth and renders the workers page; the screenshot is kept
    in .artifacts/ (the README's is one of these)."""
    chromium = shutil.which("chromium")
    assert chromium, "chromium is needed: ./fleet setup installs it"
    host = flower_url.split("://", 1)[1]
    logged_in = f"http://{FLOWER_USER}:{quote(FLOWER_PASSWORD, safe='')}@{host}/workers"
    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "flower-workers.png"
    common = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=8000",
              "--window-size=1280,800"]
    env = dict(os.environ, HOME=str(ARTIFACTS))
    dom = subprocess.run(common + ["--dump-dom", logged_in], capture_output=True, text=True, timeout=120, env=env)
    missing = [node for node in EXPECTED_NODES if node not in dom.stdout]
    assert not missing, f"not on Flower's page: {missing}\n{dom.stdout[-2000:]}"
    subprocess.run(common + [f"--screenshot={screenshot}", logged_in], capture_output=True, timeout=120, env=env,
                   check=True)
    assert screenshot.stat().st_size > 10_000
    refused = subprocess.run(common + ["--dump-dom", f"{flower_url}/workers"], capture_output=True, text=True,
                             timeout=120, env=env)
    assert not any(node in refused.stdout for node in EXPECTED_NODES), "Flower's page without credentials"


def test_no_secret_on_a_command_line_or_in_a_world_readable_file(monitor):
    args = monitor.run("ps -eo args").stdout
    assert not any(mark in args for mark in SECRET_MARKS), [line for line in args.splitlines()
                                                            if any(mark in line for mark in SECRET_MARKS)]
    config = monitor.file("/etc/celery-fleet-monitor/monitor.json")
    assert config.mode == 0o640 and config.user == "root" and config.group == "celery-monitor"
    password_file = monitor.file("/etc/prometheus/redis-exporter-password.json")
    assert password_file.mode == 0o640 and password_file.group == "prometheus"
    world = monitor.run("grep -rlE '%s' /etc /opt/celery-fleet-monitor 2>/dev/null | xargs -r stat -c '%%a %%n'"
                        % "|".join(SECRET_MARKS)).stdout.split("\n")
    readable = [line for line in world if line and int(line.split()[0], 8) & 0o004]
    assert not readable, readable
