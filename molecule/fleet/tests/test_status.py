"""playbooks/status.yml, the fleet exporter and Prometheus on the deployed lab: known numbers of tasks at
different priorities in each of the four queues while every node is drained of them (beat paused, so that
its ticks do not add to the priority queue): status JSON, the exporter and a PromQL query all report the exact
totals per priority sub-list and summed; batch1 (batch's one node) shown drained and its group one below what it
has, the live group rule pending; then all back to 0, and the capacity view sizing batch from those tasks."""

import json
import time

import fleetload
from fleet import EXPECTED_NODES, INVENTORY, exporter_samples, lab_host, promql, run_python, wait_for

NODE = "batch-worker@batch1"
# Tasks per queue and priority while no node consumes the queue.
SENT = {"batch": {0: 4, 3: 3, 6: 2, 9: 5}, "default": {0: 2, 3: 1, 9: 3}, "priority": {6: 2, 9: 1},
        "ml": {0: 1, 3: 2}}
CONSUMERS = {queue: sorted(node for node, expected in EXPECTED_NODES.items() if queue in expected["queues"])
             for queue in SENT}
GROUP = frozenset({("group", "batch")})
NODE_LABELS = frozenset({("node", NODE), ("group", "batch"), ("host", "batch1")})


def by_priority(queue):
    return {str(priority): SENT[queue].get(priority, 0) for priority in (0, 3, 6, 9)}


def status(tmp_path, name):
    path = tmp_path / f"{name}.json"
    started = time.monotonic()
    rc, output = fleetload.run_playbook("status.yml", "--extra-vars", f"celery_fleet_status_file={path}",
                                        inventory=INVENTORY, timeout=300)
    assert rc == 0, output[-4000:]
    print(f"status.yml ({name}): {time.monotonic() - started:.1f} s")
    return json.loads(path.read_text()), output


def control(action):
    """cancel_consumer or add_consumer for every queue on every node that consumes it; every node confirms."""
    replies = run_python(lab_host("web1"), f"""
import json
from celery_fleet_runtime import app
print(json.dumps({{queue: getattr(app.control, {action!r})(queue, destination=nodes, reply=True, timeout=3)
                  for queue, nodes in {CONSUMERS!r}.items()}}))
""")
    for queue, nodes in CONSUMERS.items():
        answered = {node for reply in replies[queue] for node in reply}
        assert answered == set(nodes), (action, queue, replies[queue])


def exporter_while_drained():
    """The fleet exporter (monitor1) reports the exact totals, per priority and summed, and batch1 drained."""
    def exact():
        samples = exporter_samples()
        for queue in SENT:
            labels = frozenset({("queue", queue)})
            found = {dict(labels)["priority"]: value for (name, labels), value in samples.items()
                     if name == "celery_fleet_queue_ready_messages_by_priority" and ("queue", queue) in labels}
            if (samples.get(("celery_fleet_queue_ready_messages", labels)) != sum(SENT[queue].values())
                    or found != by_priority(queue)):
                return None
        drained = (samples.get(("celery_fleet_node_in_service", NODE_LABELS)) == 0
                   and samples.get(("celery_fleet_group_nodes_in_service", GROUP)) == 0)
        return samples if drained else None
    samples = wait_for(exact, 30, "the exporter's exact totals")
    assert samples[("celery_fleet_node_up", NODE_LABELS)] == 1 and samples[("celery_fleet_broker_up", frozenset())] == 1
    assert all(samples[("celery_fleet_queue_consumers", frozenset({("queue", queue)}))] == 0 for queue in SENT)
    assert samples[("celery_fleet_group_nodes", GROUP)] == 1
    # The next message out of batch has waited since the exporter first saw it, a few seconds by now.
    assert samples[("celery_fleet_queue_oldest_message_age_seconds", frozenset({("queue", "batch")}))] >= 0
    print("exporter, every queue drained:", {dict(labels).get("queue"): value for (name, labels), value in
                                              samples.items() if name == "celery_fleet_queue_ready_messages"})
    return samples


def prometheus_while_drained():
    """Prometheus (PromQL over its HTTP API) holds the same totals, and the live group rule is pending."""
    expected = {queue: float(sum(counts.values())) for queue, counts in SENT.items()}
    wait_for(lambda: {labels["queue"]: value for labels, value in promql("celery_fleet_queue_ready_messages")}
             == expected, 30, "Prometheus's totals")
    for queue in SENT:
        found = {labels["priority"]: value for labels, value in
                 promql(f'celery_fleet_queue_ready_messages_by_priority{{queue="{queue}"}}')}
        assert found == {priority: float(count) for priority, count in by_priority(queue).items()}, (queue, found)
    summed = promql('sum by (queue) (celery_fleet_queue_ready_messages_by_priority{queue="batch"})')
    assert [value for _, value in summed] == [expected["batch"]]
    alerts = wait_for(lambda: promql('ALERTS{alertname="CeleryFleetGroupDegraded",group="batch"}'), 30,
                      "the live CeleryFleetGroupDegraded rule")
    assert alerts[0][0]["alertstate"] in ("pending", "firing"), alerts
    print("Prometheus, every queue drained:", expected, alerts)


def test_status_counts_every_priority_and_shows_a_drained_node(tmp_path):
    beat = lab_host("batch1")
    beat.check_output("systemctl stop celery-beat.service")
    control("cancel_consumer")
    try:
        sent = run_python(lab_host("web1"), f"""
import json
from celery_fleet_runtime import app
for queue, counts in {SENT!r}.items():
    for priority, count in counts.items():
        for number in range(count):
            app.send_task("celery_fleet_app.tasks.benchmark_task", args=[number], queue=queue, priority=priority)
print(json.dumps(sum(sum(counts.values()) for counts in {SENT!r}.values())))
""")
        drained, output = status(tmp_path, "drained")
        exported = exporter_while_drained()
        prometheus_while_drained()
    finally:
        control("add_consumer")
        beat.check_output("systemctl start celery-beat.service")
    assert sent == 26
    nodes = {node["node"]: node for node in drained["nodes"]}
    queues = {queue["queue"]: queue for queue in drained["queues"]}
    groups = {group["group"]: group for group in drained["groups"]}
    for queue in SENT:
        assert queues[queue]["by_priority"] == by_priority(queue), queues[queue]
        assert queues[queue]["ready"] == sum(SENT[queue].values()) and queues[queue]["consumers"] == [], queues[queue]
    assert nodes[NODE]["state"] == "drained" and nodes[NODE]["consuming"] == []
    assert groups["batch"]["nodes"] == 1 and groups["batch"]["in_service"] == 0 and groups["batch"]["can_roll"] is False
    for name, expected in EXPECTED_NODES.items():
        node = nodes[name]
        assert node["state"] == "drained", node
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
        if all(queues[queue]["ready"] == 0 and queues[queue]["unacked"] == 0 for queue in SENT) \
                or time.monotonic() > deadline:
            break
    nodes = {node["node"]: node for node in after["nodes"]}
    assert all(queues[queue]["ready"] == 0 and queues[queue]["unacked"] == 0 for queue in SENT), queues
    assert all(queues[queue]["consumers"] == CONSUMERS[queue] for queue in SENT), queues
    assert all(node["state"] == "in service" for node in nodes.values()), nodes
    assert all(group["in_service"] == group["nodes"] for group in after["groups"]), after["groups"]
    # The exporter and Prometheus go back to 0 too, every group back in full.
    wait_for(lambda: (lambda samples: all(samples.get(("celery_fleet_queue_ready_messages",
                                                        frozenset({("queue", queue)}))) == 0 for queue in SENT)
                      and samples.get(("celery_fleet_group_nodes_in_service", GROUP)) == 1)(exporter_samples()),
             30, "the exporter at 0")
    wait_for(lambda: {value for _, value in promql("celery_fleet_queue_ready_messages")} == {0.0}, 30,
             "Prometheus at 0")
    assert exported[("celery_fleet_node_resident_memory_bytes", NODE_LABELS)] > 10 * 2**20
    # The capacity view: the inventory's hosts and slots per group, and what Flower's events made of batch's
    # arrival and mean duration. Prometheus's increase() counts nothing for a counter's first sample, and on a
    # fresh lab Flower's counters for batch1 first appear with the 14 tasks above: 4 more, once scraped, count.
    more = run_python(lab_host("web1"), """
import json
from celery_fleet_runtime import app
results = [app.send_task("celery_fleet_app.tasks.benchmark_task", args=[n], queue="batch") for n in range(4)]
print(json.dumps([result.get(timeout=30) for result in results]))
""")
    assert len(more) == 4

    def capacity():
        rows = {row["group"]: row for row in status(tmp_path, "capacity")[0]["capacity"] or []}
        return rows if rows.get("batch", {}).get("mean_seconds") is not None else None
    rows = wait_for(capacity, 60, "batch's tasks in the capacity view")
    assert {group: (row["hosts"], row["slots"]) for group, row in rows.items()} == {
        "batch": (1, 4), "gpu": (1, 2), "web": (2, 16)}, rows
    assert rows["batch"]["arrival_per_second"] > 0 and rows["batch"]["hosts_needed"] >= 1, rows["batch"]
    print("capacity:", rows)


def test_status_keeps_its_table_when_the_monitor_s_prometheus_is_down(tmp_path):
    """The capacity view is the monitor's; the table is the fleet's: with Prometheus stopped on monitor1 the run
    still succeeds and shows every node, with no capacity view (null in the JSON)."""
    monitor = lab_host("monitor1")
    monitor.check_output("systemctl stop prometheus")
    try:
        fleet, output = status(tmp_path, "prometheus-down")
    finally:
        monitor.check_output("systemctl start prometheus")
    assert fleet["capacity"] is None, fleet["capacity"]
    assert {node["node"] for node in fleet["nodes"]} == set(EXPECTED_NODES), fleet["nodes"]
    assert "CAPACITY" not in output and "in service" in output, output[-3000:]
