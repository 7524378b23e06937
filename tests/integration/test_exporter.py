"""The fleet exporter against a real Redis and a real worker started through the fleet's runtime (no mocks):
exact queue depths over every priority sub-list, a node's release and unit memory from the runtime's
bootstep (its stats reply), scrapes served from the last refresh, and a frozen broker reported as down within the
refresh's deadline while scrapes still answer at once."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

import celery_control
import celery_fleet_exporter as exporter
import localredis

ROOT = Path(__file__).resolve().parents[2]
APP_SRC = ROOT / "app" / "src"
RUNTIME = ROOT / "roles" / "celery_worker" / "files"
NODE = "web-worker@exporter-test"
HOSTS = {"web9": {"group": "web", "nodes": {NODE: ["default", "priority"]}},
         "batch9": {"group": "batch", "nodes": {"batch-worker@batch9": ["batch"]}}}

assert shutil.which("redis-server"), "redis-server is needed: run ./fleet setup"


@pytest.fixture(scope="module")
def redis(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("redis")
    port = localredis.free_port()
    process = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                "--dir", str(workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            celery_control.within(2, lambda: __import__("redis").Redis.from_url(url).ping())
            break
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.1)
    yield {"url": url, "process": process}
    process.kill()
    process.wait(10)


@pytest.fixture(scope="module")
def worker(redis):
    """A worker loaded through celery_fleet_runtime, as the fleet's instances are (hence its fleet stats)."""
    env = dict(os.environ, CELERY_BROKER_URL=redis["url"], CELERY_FLEET_APP="celery_fleet_app",
               PYTHONPATH=f"{RUNTIME}{os.pathsep}{APP_SRC}")
    process = subprocess.Popen(
        [sys.executable, "-m", "celery", "--app", "celery_fleet_runtime:app", "worker", "--pool=threads",
         "--concurrency=2", f"--hostname={NODE}", "--queues=default,priority", "--without-mingle",
         "--without-gossip", "--loglevel=WARNING"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    app = celery_control.client_app(redis["url"], {})
    outcome = celery_control.wait_consuming(app, [NODE], ["default", "priority"], wait=30)
    if not outcome["consuming"]:
        process.kill()
        pytest.fail("the test worker never consumed its queues")
    yield app
    process.terminate()
    process.wait(30)
    app.close()


def config(url, **extra):
    return {"broker_url": url, "transport_options": {}, "queues": ["batch", "default", "priority"],
            "hosts": HOSTS, "min_online": None, "interval": 1.0, "timeout": 1.0, "deadline": 4.0, **extra}


def values(samples, metric):
    return {tuple(sorted(labels.items())): value for name, labels, value in samples if name == metric}


def test_every_priority_sub_list_is_counted_and_the_node_reports_itself(redis, worker):
    from celery import Celery

    producer = Celery("exporter-test-producer", broker=redis["url"])
    celery_control.run(worker, "cancel_consumer", destination=[NODE], queue="default", timeout=2)
    try:
        sent = {0: 2, 3: 1, 6: 4, 9: 3}
        for priority, count in sent.items():
            for _ in range(count):
                producer.send_task("celery_fleet_app.tasks.benchmark_task", args=[1], queue="default",
                                   priority=priority)
        clock = [1000.0]
        state = exporter.FleetState(config(redis["url"]), clock=lambda: clock[0])
        assert state.refresh() is True
        samples = state.samples
        assert values(samples, "celery_fleet_queue_ready_messages")[(("queue", "default"),)] == 10
        by_priority = values(samples, "celery_fleet_queue_ready_messages_by_priority")
        assert {dict(key)["priority"]: value for key, value in by_priority.items()
                if dict(key)["queue"] == "default"} == {"0": 2, "3": 1, "6": 4, "9": 3}
        assert values(samples, "celery_fleet_queue_consumers")[(("queue", "default"),)] == 0
        # The next message out stays the same one: its age grows with the clock between refreshes.
        clock[0] += 25
        state.refresh()
        assert values(state.samples, "celery_fleet_queue_oldest_message_age_seconds")[(("queue", "default"),)] == 25
        node = (("group", "web"), ("host", "web9"), ("node", NODE))
        assert values(state.samples, "celery_fleet_node_up")[node] == 1
        assert values(state.samples, "celery_fleet_node_in_service")[node] == 0  # drained of default
        assert values(state.samples, "celery_fleet_node_concurrency")[node] == 2
        groups = values(state.samples, "celery_fleet_group_nodes_in_service")
        assert groups == {(("group", "web"),): 0, (("group", "batch"),): 0}
        missing = (("group", "batch"), ("host", "batch9"), ("node", "batch-worker@batch9"))
        assert values(state.samples, "celery_fleet_node_up")[missing] == 0
        # The runtime's bootstep (no release: this worker's interpreter is not a release's venv).
        info = [labels for name, labels, _ in state.samples if name == "celery_fleet_node_info"]
        assert info == [{"node": NODE, "group": "web", "host": "web9", "release": "", "pool": "thread"}]
        # The memory of the worker's own cgroup, as the runtime reads it (the fleet: its systemd unit's).
        assert values(state.samples, "celery_fleet_node_resident_memory_bytes")[node] > 10 * 2**20
    finally:
        celery_control.run(worker, "add_consumer", destination=[NODE], queue="default", timeout=2)
        producer.close()
    assert celery_control.wait_drained(worker, [NODE], wait=20)["drained"] is True
    state.refresh()
    assert values(state.samples, "celery_fleet_queue_ready_messages")[(("queue", "default"),)] == 0
    assert values(state.samples, "celery_fleet_queue_oldest_message_age_seconds")[(("queue", "default"),)] == 0
    assert values(state.samples, "celery_fleet_node_in_service")[
        (("group", "web"), ("host", "web9"), ("node", NODE))] == 1


def scrape(port, timeout=2.0):
    started = time.monotonic()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as response:
        text = response.read().decode()
    families = {family.name: family for family in text_string_to_metric_families(text)}
    return families, time.monotonic() - started


def sample(families, name, **labels):
    family = families[name.removesuffix("_total") if name.endswith("_total") else name]
    return next(s.value for s in family.samples if s.name == name and all(s.labels.get(k) == v
                                                                           for k, v in labels.items()))


def test_a_frozen_broker_is_reported_down_and_scrapes_still_answer_at_once(redis, worker, tmp_path):
    port = localredis.free_port()
    path = tmp_path / "exporter.json"
    path.write_text(json.dumps(config(redis["url"], listen="127.0.0.1", port=port, deadline=3.0)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(str(ROOT / p) for p in (
        "roles/celery_monitor/files/exporter", "plugins/modules", "plugins/filter")))
    process = subprocess.Popen([sys.executable, "-m", "celery_fleet_exporter", "--config", str(path)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                families, _ = scrape(port)
                if sample(families, "celery_fleet_broker_up") == 1:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the exporter never reported the broker up"
            time.sleep(0.2)
        assert sample(families, "celery_fleet_node_up", node=NODE) == 1
        assert sample(families, "celery_fleet_queue_ready_messages", queue="priority") == 0
        redis["process"].send_signal(signal.SIGSTOP)
        try:
            frozen = time.monotonic()
            slowest = 0.0
            while True:
                families, took = scrape(port)
                slowest = max(slowest, took)
                if sample(families, "celery_fleet_broker_up") == 0:
                    break
                assert time.monotonic() - frozen < 3.0 + 1.0 + 2.0, "broker still reported up after the deadline"
                time.sleep(0.2)
            # Down within a refresh's deadline plus its interval; no fleet figure served as if current.
            assert time.monotonic() - frozen <= 6.0
            assert slowest < 0.5, f"a scrape waited {slowest:.2f} s on the frozen broker"
            assert "celery_fleet_queue_ready_messages" not in families
            assert sample(families, "celery_fleet_refresh_failures_total") >= 1
        finally:
            redis["process"].send_signal(signal.SIGCONT)
        deadline = time.monotonic() + 15
        while sample(scrape(port)[0], "celery_fleet_broker_up") != 1:
            assert time.monotonic() < deadline, "the exporter never saw the broker come back"
            time.sleep(0.2)
    finally:
        process.terminate()
        process.wait(10)
