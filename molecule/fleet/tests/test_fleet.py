"""The deployed fleet, checked through Celery's own control API and real tasks."""

import base64
import time

import pytest

from fleet import EXPECTED_NODES, control, lab_host, run_python

# Fleet-wide checks run once, from web1 (any worker host reaches the broker).
testinfra_hosts = ["ansible://web1"]


def test_every_expected_node_answers_ping(host):
    replies = control(host, "ping")
    assert set(replies) == set(EXPECTED_NODES)
    assert all(reply == {"ok": "pong"} for reply in replies.values())


def test_each_node_consumes_exactly_its_queues(host):
    active_queues = control(host, "active_queues")
    consumed = {node: {queue["name"] for queue in queues} for node, queues in active_queues.items()}
    assert consumed == {node: spec["queues"] for node, spec in EXPECTED_NODES.items()}


def test_each_node_runs_the_configured_pool_and_concurrency(host):
    stats = control(host, "stats")
    assert set(stats) == set(EXPECTED_NODES)
    for node, spec in EXPECTED_NODES.items():
        pool = stats[node]["pool"]
        assert pool["implementation"] == "celery.concurrency.prefork:TaskPool", node
        assert pool["max-concurrency"] == spec["concurrency"], node


def test_batch_recycles_children_after_1000_tasks(host):
    stats = control(host, "stats")
    assert stats["batch-worker@batch1"]["pool"]["max-tasks-per-child"] == 1000
    assert stats["web-worker@web1"]["pool"]["max-tasks-per-child"] in (None, "N/A", 0)


def test_benchmark_task_returns_42(host):
    result = run_python(host, """
import json
from celery_fleet_app.tasks import benchmark_task
print(json.dumps(benchmark_task.delay(21).get(timeout=30)))
""")
    assert result == 42


@pytest.mark.parametrize("queue,group", [
    ("default", "web"), ("priority", "web"), ("batch", "batch"), ("ml", "gpu"),
])
def test_a_task_sent_to_a_queue_runs_on_that_group(host, queue, group):
    results = run_python(host, f"""
import json
from celery_fleet_app.tasks import whoami
pending = [whoami.apply_async(queue={queue!r}) for _ in range(6)]
print(json.dumps([p.get(timeout=30) for p in pending]))
""")
    for result in results:
        assert result["queue"] == queue
        assert EXPECTED_NODES[result["node"]]["group"] == group


def test_routed_tasks_land_on_their_queues(host):
    results = run_python(host, """
import json
from celery_fleet_app.tasks import priority_echo, batch_sum, ml_infer
print(json.dumps({
    "priority": priority_echo.delay("x").get(timeout=30),
    "batch": batch_sum.delay([1, 2, 3]).get(timeout=30),
    "ml": ml_infer.delay([1.0, 3.0]).get(timeout=30),
}))
""")
    assert results["priority"]["queue"] == "priority" and results["priority"]["node"].startswith("web-worker@")
    assert results["batch"]["sum"] == 6 and results["batch"]["node"] == "batch-worker@batch1"
    assert results["ml"]["mean"] == 2.0 and results["ml"]["node"].startswith("gpu-worker-")


def test_each_gpu_instance_is_pinned_to_its_own_device(host):
    results = run_python(host, """
import json
from celery_fleet_app.tasks import ml_infer
pending = [ml_infer.apply_async(args=([1.0],)) for _ in range(20)]
print(json.dumps([p.get(timeout=30) for p in pending]))
""")
    pinned = {result["node"]: result["cuda_visible_devices"] for result in results}
    assert pinned == {"gpu-worker-1@gpu1": "0", "gpu-worker-2@gpu1": "1"}


def test_sigkill_of_a_worker_is_restarted_by_systemd_and_rejoins(host):
    web1 = lab_host("web1")
    unit = "celery-worker@web.service"
    old_pid = web1.check_output(f"systemctl show -p MainPID --value {unit}")
    assert old_pid != "0"
    web1.run_expect([0], f"kill -KILL {old_pid}")
    deadline = time.monotonic() + 60
    new_pid = old_pid
    while time.monotonic() < deadline:
        new_pid = web1.check_output(f"systemctl show -p MainPID --value {unit}")
        if new_pid not in ("0", old_pid) and web1.service(unit).is_running:
            if "web-worker@web1" in control(host, "ping", timeout=2):
                break
        time.sleep(1)
    else:
        pytest.fail(f"{unit} did not come back (MainPID {new_pid})")
    assert int(web1.check_output(f"systemctl show -p NRestarts --value {unit}")) >= 1


def test_a_package_planted_by_the_worker_user_is_never_imported(host):
    """A task (running as celery) plants a celery_fleet_app package where it can: its home, the state
    directory (the old working directory). It cannot write the working directory (the release); after a
    restart the worker still imports the release's package."""
    web1 = lab_host("web1")
    unit = "celery-worker@web.service"
    planted = "/var/lib/celery-fleet/celery_fleet_app"
    web1.run_expect([0], f"runuser -u celery -- mkdir -p {planted}")
    code = base64.b64encode(b'raise SystemExit("planted package imported")\n').decode()
    web1.run_expect([0], f"runuser -u celery -- python3 -c \"import base64; open('{planted}/__init__.py', 'w')"
                         f".write(base64.b64decode('{code}').decode())\"")
    refused = web1.run("runuser -u celery -- mkdir /opt/celery-fleet/current/celery_fleet_app")
    assert refused.rc != 0 and "Permission denied" in refused.stderr, refused.stderr
    try:
        since = int(time.time())
        web1.run_expect([0], f"systemctl restart {unit}")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and "web-worker@web1" not in control(host, "ping", timeout=2):
            time.sleep(1)
        journal = web1.check_output(f"journalctl --no-pager -o cat --since=@{since} -u {unit}")
        assert "planted package imported" not in journal
        assert "web-worker@web1" in control(host, "ping", timeout=2), journal[-2000:]
    finally:
        web1.run(f"rm -rf {planted}")
