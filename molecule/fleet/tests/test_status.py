"""playbooks/status.yml on the deployed lab: exact queue depths over every priority sub-list while the queue's
only node is drained, the node shown drained and its group below its guard minimum, then all back to 0."""

import json
import time

import fleetload
from fleet import EXPECTED_NODES, INVENTORY, lab_host, run_python

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
    assert queues["batch"]["consumers"] == [NODE] and nodes[NODE]["state"] == "in service"
    assert all(group["in_service"] == group["nodes"] for group in after["groups"]), after["groups"]
