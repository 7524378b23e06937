"""playbooks/status.yml, the fleet exporter and Prometheus on the deployed lab: exact queue depths over every
priority sub-list while the queue's only node is drained, the node shown drained and its group below what it
has (the live alert rule pending), then all back to 0."""

import json
import time

import fleetload
from fleet import EXPECTED_NODES, INVENTORY, exporter_samples, lab_host, promql, run_python, wait_for

NODE = "batch-worker@batch1"
SENT = {0: 4, 3: 3, 6: 2, 9: 5}  # batch tasks per priority while batch1 consumes nothing


def status(tmp_path, name):
    path = tmp_path / f"{name}.json"
    started = time.monotonic()
    rc, output = fleetload.run_playbook("status.yml", "--extra-vars", f"celery_fleet_status_file={path}",
                                        inventory=INVENTORY, timeout=300)
    assert rc == 0, output[-4000:]
    print(f"status.yml ({name}): {time.monotonic() - started:.1f} s")
    return json.loads(path.read_text()), output


def control(action, queue):
    return run_python(lab_host("web1"), f"""
import json
from celery_fleet_runtime import app
print(json.dumps(getattr(app.control, {action!r})({queue!r}, destination=[{NODE!r}], reply=True, timeout=3)))
""")


QUEUE = frozenset({("queue", "batch")})
GROUP = frozenset({("group", "batch")})
NODE_LABELS = frozenset({("node", NODE), ("group", "batch"), ("host", "batch1")})


def exporter_while_drained():
    """The fleet exporter (monitor1) reports the exact totals, per priority and summed, and the node drained."""
    def exact():
        samples = exporter_samples()
        by_priority = {dict(labels)["priority"]: value for (name, labels), value in samples.items()
                       if name == "celery_fleet_queue_ready_messages_by_priority" and ("queue", "batch") in labels}
        done = (samples.get(("celery_fleet_queue_ready_messages", QUEUE)) == sum(SENT.values())
                and by_priority == {str(priority): count for priority, count in SENT.items()}
                and samples.get(("celery_fleet_node_in_service", NODE_LABELS)) == 0
                and samples.get(("celery_fleet_group_nodes_in_service", GROUP)) == 0)
        return samples if done else None
    samples = wait_for(exact, 30, "the exporter's exact totals")
    assert samples[("celery_fleet_node_up", NODE_LABELS)] == 1 and samples[("celery_fleet_broker_up", frozenset())] == 1
    assert samples[("celery_fleet_queue_consumers", QUEUE)] == 0
    assert samples[("celery_fleet_group_nodes", GROUP)] == 1
    print("exporter, batch drained:", {name: value for (name, labels), value in samples.items()
                                       if labels in (QUEUE, GROUP)})
    return samples


def prometheus_while_drained():
    """Prometheus (a PromQL query over its HTTP API) holds the same totals, and the group rule is pending."""
    wait_for(lambda: [value for _, value in promql('celery_fleet_queue_ready_messages{queue="batch"}')]
             == [float(sum(SENT.values()))], 30, "Prometheus's total")
    by_priority = {labels["priority"]: value for labels, value in
                   promql('celery_fleet_queue_ready_messages_by_priority{queue="batch"}')}
    assert by_priority == {str(priority): float(count) for priority, count in SENT.items()}, by_priority
    alerts = wait_for(lambda: promql('ALERTS{alertname="CeleryFleetGroupDegraded",group="batch"}'), 30,
                      "the live CeleryFleetGroupDegraded rule")
    assert alerts[0][0]["alertstate"] in ("pending", "firing"), alerts
    print("Prometheus, batch drained:", by_priority, alerts)


def test_status_counts_every_priority_and_shows_a_drained_node(tmp_path):
    assert control("cancel_consumer", "batch")
    try:
        sent = run_python(lab_host("web1"), f"""
import json
from celery_fleet_runtime import app
for priority, count in {SENT!r}.items():
    for number in range(count):
        app.send_task("celery_fleet_app.tasks.benchmark_task", args=[number], queue="batch", priority=priority)
print(json.dumps(sum({SENT!r}.values())))
""")
        drained, output = status(tmp_path, "drained")
        exported = exporter_while_drained()
        prometheus_while_drained()
    finally:
        assert control("add_consumer", "batch")
    nodes = {node["node"]: node for node in drained["nodes"]}
    queues = {queue["queue"]: queue for queue in drained["queues"]}
    groups = {group["group"]: group for group in drained["groups"]}
    assert queues["batch"]["by_priority"] == {str(priority): count for priority, count in SENT.items()}, queues["batch"]
    assert queues["batch"]["ready"] == sent == 14 and queues["batch"]["consumers"] == []
    assert nodes[NODE]["state"] == "drained" and nodes[NODE]["consuming"] == []
    assert groups["batch"]["in_service"] == 0 and groups["batch"]["can_roll"] is False
    assert {name: node["state"] for name, node in nodes.items() if name != NODE} == {
        name: "in service" for name in EXPECTED_NODES if name != NODE}
    for name, expected in EXPECTED_NODES.items():
        node = nodes[name]
        assert (node["group"], node["concurrency"], node["pool"]) == (expected["group"], expected["concurrency"],
                                                                      "prefork"), node
        assert node["release"] and node["uptime"] >= 0 and node["memory"] > 10 * 2**20, node
        assert 0 <= node["utilisation"] <= 1, node
    table = output[output.index("NODE "):]
    assert "batch-worker@batch1" in table and "drained" in table and "QUEUE" in table and "GUARD MINIMUM" in table
    print(table[:table.index("PLAY RECAP") if "PLAY RECAP" in table else None])

    deadline = time.monotonic() + 60
    while True:
        after, _ = status(tmp_path, "after")
        queues = {queue["queue"]: queue for queue in after["queues"]}
        if queues["batch"]["ready"] == 0 and queues["batch"]["unacked"] == 0 or time.monotonic() > deadline:
            break
    nodes = {node["node"]: node for node in after["nodes"]}
    assert queues["batch"]["ready"] == 0 and queues["batch"]["unacked"] == 0, queues["batch"]
    # The exporter and Prometheus go back to 0 too, the group back in full.
    wait_for(lambda: exporter_samples().get(("celery_fleet_queue_ready_messages", QUEUE)) == 0
             and exporter_samples().get(("celery_fleet_group_nodes_in_service", GROUP)) == 1, 30, "exporter at 0")
    wait_for(lambda: promql('celery_fleet_queue_ready_messages{queue="batch"}') == [({"__name__":
             "celery_fleet_queue_ready_messages", "instance": "127.0.0.1:9808", "job": "celery-fleet",
             "queue": "batch"}, 0.0)], 30, "Prometheus at 0")
    assert exported[("celery_fleet_node_resident_memory_bytes", NODE_LABELS)] > 10 * 2**20
    assert queues["batch"]["consumers"] == [NODE] and nodes[NODE]["state"] == "in service"
    assert all(group["in_service"] == group["nodes"] for group in after["groups"]), after["groups"]
