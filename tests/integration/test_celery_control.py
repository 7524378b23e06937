"""celery_control against a real Redis and a real Celery worker on loopback (no mocks)."""

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import celery_control
import localredis

APP_SRC = Path(__file__).resolve().parents[2] / "app" / "src"
NODE = "unit-worker@localhost"

# ./fleet setup installs redis-server; without it these tests fail rather than skip.
assert shutil.which("redis-server"), "redis-server is needed: run ./fleet setup"


@pytest.fixture(scope="module")
def broker_url(tmp_path_factory):
    with localredis.redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture(scope="module")
def worker(broker_url):
    env = dict(os.environ, CELERY_BROKER_URL=broker_url, PYTHONPATH=str(APP_SRC))
    process = subprocess.Popen(
        [sys.executable, "-m", "celery", "--app", "celery_fleet_app", "worker", "--pool=threads", "--concurrency=1",
         f"--hostname={NODE}", "--queues=default,priority", "--without-mingle", "--without-gossip",
         "--loglevel=WARNING"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    from celery import Celery
    app = Celery("unit-test-control", broker=broker_url)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        _, replies = celery_control.run(app, "ping", timeout=0.5)
        if NODE in replies:
            break
    else:
        process.kill()
        pytest.fail("the test worker never answered ping")
    yield app
    process.terminate()
    process.wait(30)
    app.close()


def queues_of(app):
    _, replies = celery_control.run(app, "inspect", "active_queues", timeout=1)
    return {q["name"] for q in replies[NODE]}


def test_ping_names_the_node_and_changes_nothing(worker):
    changed, replies = celery_control.run(worker, "ping", destination=[NODE], timeout=1)
    assert changed is False
    assert replies == {NODE: {"ok": "pong"}}


def test_inspect_stats_reports_the_pool(worker):
    changed, replies = celery_control.run(worker, "inspect", "stats", destination=[NODE], timeout=1)
    assert changed is False
    assert replies[NODE]["pool"]["implementation"] == "celery.concurrency.thread:TaskPool"


def test_inspect_active_and_reserved_are_empty_when_idle(worker):
    assert celery_control.run(worker, "inspect", "active", timeout=1)[1] == {NODE: []}
    assert celery_control.run(worker, "inspect", "reserved", timeout=1)[1] == {NODE: []}


def test_cancel_then_add_consumer_moves_the_queue_and_reports_changed_once(worker):
    assert queues_of(worker) == {"default", "priority"}
    changed, _ = celery_control.run(worker, "cancel_consumer", queue="priority", destination=[NODE], timeout=1)
    assert changed is True
    assert queues_of(worker) == {"default"}
    # Again: nothing left to cancel, so nothing changes.
    changed, _ = celery_control.run(worker, "cancel_consumer", queue="priority", destination=[NODE], timeout=1)
    assert changed is False
    changed, _ = celery_control.run(worker, "add_consumer", queue="priority", destination=[NODE], timeout=1)
    assert changed is True
    assert queues_of(worker) == {"default", "priority"}


def test_several_queues_move_in_one_call_and_only_what_changes_is_sent(worker):
    assert queues_of(worker) == {"default", "priority"}
    changed, _ = celery_control.run(worker, "cancel_consumer", queue="priority", destination=[NODE], timeout=1)
    # One queue already cancelled: the call cancels the other and confirms it.
    changed, replies = celery_control.run(worker, "cancel_consumer", queue=["default", "priority"], destination=[NODE],
                                          timeout=1)
    assert changed is True and "default" in replies[NODE]["ok"] and "priority" not in replies[NODE]["ok"]
    assert queues_of(worker) == set()
    changed, replies = celery_control.run(worker, "add_consumer", queue=["default", "priority"], destination=[NODE],
                                          timeout=1)
    assert changed is True and "default" in replies[NODE]["ok"] and "priority" in replies[NODE]["ok"]
    assert queues_of(worker) == {"default", "priority"}
    assert celery_control.run(worker, "add_consumer", queue=["default", "priority"], destination=[NODE],
                              timeout=1)[0] is False


def test_check_mode_reports_without_changing(worker):
    changed, _ = celery_control.run(worker, "cancel_consumer", queue="default", destination=[NODE],
                                    timeout=1, check_mode=True)
    assert changed is True
    assert queues_of(worker) == {"default", "priority"}


def test_consumer_actions_need_a_queue(worker):
    with pytest.raises(ValueError, match="queue is required"):
        celery_control.run(worker, "cancel_consumer", destination=[NODE])


def test_pending_counts_reserved_and_active_until_the_node_is_idle(worker):
    from celery import Celery

    producer = Celery("unit-test-producer", broker=worker.conf.broker_url)
    try:
        for token in ("first", "second"):
            producer.send_task("celery_fleet_app.tasks.sleep_task", args=[2, token], queue="default")
        # One slot: one task runs, the other waits in the worker's reserved list.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            changed, replies = celery_control.run(worker, "pending", destination=[NODE], timeout=1)
            if replies.get(NODE) == {"reserved": 1, "active": 1, "total": 2}:
                break
        else:
            pytest.fail(f"never saw one active and one reserved task: {replies}")
        assert changed is False
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            replies = celery_control.run(worker, "pending", destination=[NODE], timeout=1)[1]
            if replies.get(NODE, {}).get("total") == 0:
                break
        else:
            pytest.fail(f"the node never became idle: {replies}")
        assert replies == {NODE: {"reserved": 0, "active": 0, "total": 0}}
    finally:
        producer.close()


def test_pending_leaves_out_nodes_that_do_not_answer(worker):
    assert celery_control.run(worker, "pending", destination=["nobody@nowhere"], timeout=0.5)[1] == {}


def test_documentation_parses_and_matches_the_argument_spec():
    import yaml

    documented = yaml.safe_load(celery_control.DOCUMENTATION)["options"]
    yaml.safe_load(celery_control.RETURN)
    assert documented["action"]["choices"] == ["ping", "inspect", "pending", "cancel_consumer", "add_consumer",
                                               "wait_consuming", "wait_answering", "wait_drained", "status",
                                               "restart_consuming"]
    source = Path(celery_control.__file__).read_text()
    for action in documented["action"]["choices"]:
        assert f'"{action}"' in source.split("def main")[1], action


def test_consumer_actions_fail_when_a_named_node_does_not_answer(worker):
    with pytest.raises(RuntimeError, match="no answer from nobody@nowhere"):
        celery_control.run(worker, "cancel_consumer", queue="default", destination=[NODE, "nobody@nowhere"],
                           timeout=0.5)
    assert queues_of(worker) == {"default", "priority"}


# --- Bounded calls and the fleet's transport options (what every client of the fleet must use) ---------

FLEET_OPTIONS = {"visibility_timeout": 4500, "socket_timeout": 2.0, "socket_connect_timeout": 2.0,
                 "socket_keepalive": True, "unacked_mutex_expire": 30}


@pytest.fixture
def silent_peer():
    """A TCP peer that accepts connections and never answers: a hung broker."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    accepted = []
    stop = threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"redis://127.0.0.1:{server.getsockname()[1]}/0"
    stop.set()
    thread.join(5)
    for connection in accepted:
        connection.close()
    server.close()


def test_a_control_call_against_a_broker_that_never_answers_fails_within_its_bound(silent_peer):
    app = celery_control.client_app(silent_peer, FLEET_OPTIONS)
    started = time.monotonic()
    with pytest.raises(Exception):
        celery_control.within(20, celery_control.run, app, "inspect", "active_queues", timeout=1)
    elapsed = time.monotonic() - started
    app.close()
    # The socket timeout (2 s per operation, a couple of attempts) ends it; the deadline is the backstop.
    assert elapsed < 20, f"took {elapsed:.1f} s"


def test_the_deadline_ends_any_call():
    started = time.monotonic()
    with pytest.raises(celery_control.DeadlineExceeded, match="deadline of 0.5 s"):
        celery_control.within(0.5, time.sleep, 5)
    assert time.monotonic() - started < 2


def test_a_control_call_to_a_stopped_broker_fails_at_once():
    port = localredis.free_port()  # nothing listens there
    app = celery_control.client_app(f"redis://127.0.0.1:{port}/0", FLEET_OPTIONS)
    started = time.monotonic()
    with pytest.raises(Exception):
        celery_control.within(20, celery_control.run, app, "ping", timeout=1)
    app.close()
    assert time.monotonic() - started < 15


def unacked_message(client, broker_url, queue, age):
    """One task message left unacknowledged `age` seconds ago on `queue`, as kombu's Redis transport records
    it (the `unacked` hash and its `unacked_index` by delivery time), with the queue itself empty. Returns
    its delivery tag."""
    from celery import Celery

    sender = Celery("unit-test-sender", broker=broker_url, set_as_current=False)
    sender.send_task("celery_fleet_app.tasks.whoami", queue=queue)  # declares the queue and its binding
    sender.close()
    raw = client.rpop(queue)
    tag = f"{queue}-delivery-tag"
    client.hset("unacked", tag, json.dumps([json.loads(raw), queue, queue]))
    client.zadd("unacked_index", {tag: time.time() - age})
    return tag


@pytest.mark.parametrize("options, restored", [({}, {"running-4000s": 1, "abandoned-5000s": 1}),
                                               (FLEET_OPTIONS, {"running-4000s": 0, "abandoned-5000s": 1})],
                         ids=["kombu-default-3600s", "the-fleet-s-4500s"])
def test_a_control_call_restores_unacked_messages_older_than_its_own_visibility_timeout(broker_url, options,
                                                                                       restored):
    """kombu's restore sweep runs in every client that polls the broker (here a ping waiting for replies):
    with kombu's default 3600 s a control call hands a task delivered 4000 s ago (still running, under a
    3900 s hard limit) to a second worker; with the fleet's 4500 s it leaves that one alone and still puts
    back one abandoned 5000 s ago. (Database 3, queues named afresh: the module's test worker sweeps
    database 0, and kombu remembers the queues it declared.)"""
    import uuid

    import redis as redis_client

    url = broker_url.rsplit("/", 1)[0] + "/3"
    client = redis_client.Redis.from_url(url)
    run_id = uuid.uuid4().hex[:8]
    queues = {name: f"{name}-{run_id}" for name in restored}
    tags = {name: unacked_message(client, url, queue, int(name.split("-")[1][:-1]))
            for name, queue in queues.items()}
    app = celery_control.client_app(url, options)
    celery_control.run(app, "ping", timeout=0.5)
    app.close()
    assert {name: client.llen(queue) for name, queue in queues.items()} == restored
    assert {name: int(not client.hexists("unacked", tag)) for name, tag in tags.items()} == restored


def test_the_capacity_guard_asks_the_nodes_it_counts_and_judges_with_the_filter(worker):
    """The drain's call checks the group's capacity itself (no module run of its own): the nodes the guard counts
    are asked for their queues, and the filter's celery_fleet_capacity_guard judges the replies."""
    drained = "web-worker@drained"
    group = {"h0": {drained: ["default", "priority"]}, "h1": {NODE: ["default", "priority"]}}
    verdict = celery_control.capacity_guard(worker, {"node": drained, "group": "web", "host_nodes": group,
                                                     "batch_hosts": [], "min_online": None}, timeout=2)
    assert verdict["counted"] == [NODE] and verdict["in_service"] == [NODE] and verdict["refusal"] == "", verdict
    # A batch-mate's nodes never count; a node expected to consume a queue it does not, and one that never answers,
    # are not in service, and the refusal names both.
    group = {"h0": {drained: ["default"]}, "h1": {NODE: ["default", "priority", "batch"]},
             "h2": {"web-worker@ghost": ["default"]}, "h3": {"web-worker@mate": ["default"]}}
    started = time.monotonic()
    verdict = celery_control.capacity_guard(worker, {"node": drained, "group": "web", "host_nodes": group,
                                                     "batch_hosts": ["h3"], "min_online": 1}, timeout=1)
    assert verdict["counted"] == [NODE, "web-worker@ghost"] and verdict["in_service"] == [], verdict
    assert verdict["refusal"] == (
        "Capacity guard: 0 other node(s) of group web are in service (none); celery_worker_rolling_min_online needs "
        f"1; {NODE} does not consume batch; web-worker@ghost does not answer. Not draining {drained}"), verdict
    assert time.monotonic() - started < 3
    # Nothing to count (a one-node group) asks nobody.
    verdict = celery_control.capacity_guard(worker, {"node": drained, "group": "web", "host_nodes": {"h0": {}},
                                                     "min_online": 0}, timeout=2)
    assert verdict["counted"] == [] and verdict["refusal"] == "", verdict


def test_wait_consuming_answers_as_soon_as_the_node_consumes_its_queues(worker):
    outcome = celery_control.wait_consuming(worker, [NODE], ["priority", "default"], wait=10)
    assert outcome["consuming"] is True and outcome["seconds"] < 1.0, outcome
    assert sorted(queue["name"] for queue in outcome["replies"][NODE]) == ["default", "priority"]


def test_wait_consuming_gives_up_after_its_wait_when_the_queues_differ(worker):
    started = time.monotonic()
    outcome = celery_control.wait_consuming(worker, [NODE], ["default"], wait=2)
    assert outcome["consuming"] is False and 1.5 <= time.monotonic() - started < 4, outcome


def test_wait_answering_ends_when_every_node_answered_whatever_it_consumes(worker):
    celery_control.run(worker, "cancel_consumer", destination=[NODE], queue="priority")
    try:
        outcome = celery_control.wait_answering(worker, [NODE], wait=10)
        assert outcome["answering"] is True and outcome["seconds"] < 1.0, outcome
        assert [queue["name"] for queue in outcome["replies"][NODE]] == ["default"]
    finally:
        celery_control.run(worker, "add_consumer", destination=[NODE], queue="priority")


def test_wait_answering_waits_out_a_node_that_never_answers_without_failing(worker):
    """A roll's prepare: a node that cannot start must not stop the roll that would fix it."""
    started = time.monotonic()
    outcome = celery_control.wait_answering(worker, [NODE, "absent-worker@nowhere"], wait=2)
    assert outcome["answering"] is False and 1.5 <= time.monotonic() - started < 4, outcome
    assert list(outcome["replies"]) == [NODE]


def test_wait_consuming_sees_a_node_started_while_it_waits(broker_url, worker):
    """The health check of a roll: asked right after the start, it answers within a poll of the node's first
    consuming moment, and says how long that took."""
    node = "late-worker@localhost"
    env = dict(os.environ, CELERY_BROKER_URL=broker_url, PYTHONPATH=str(APP_SRC))
    command = [sys.executable, "-m", "celery", "--app", "celery_fleet_app", "worker", "--pool=threads",
               "--concurrency=1", f"--hostname={node}", "--queues=batch", "--without-mingle", "--without-gossip",
               "--loglevel=WARNING"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        outcome = celery_control.wait_consuming(worker, [node], ["batch"], wait=30)
        assert outcome["consuming"] is True and 0 < outcome["seconds"] < 30, outcome
        print(f"\nstart to consuming, seen by wait_consuming: {outcome['seconds']} s")
    finally:
        process.terminate()
        process.wait(30)


def test_wait_drained_answers_within_a_poll_of_the_last_task_finishing(worker):
    """The drain of a roll: one call that sees the node idle as soon as its last task (2 s, one more reserved
    behind it) finished, instead of one Ansible retry a second."""
    from celery import Celery

    producer = Celery("unit-test-producer", broker=worker.conf.broker_url)
    try:
        for token in ("first", "second"):
            producer.send_task("celery_fleet_app.tasks.sleep_task", args=[2, token], queue="default")
        deadline = time.monotonic() + 10
        while celery_control.run(worker, "pending", destination=[NODE], timeout=1)[1].get(NODE, {}).get("total") != 2:
            assert time.monotonic() < deadline, "the tasks never reached the node"
        started = time.monotonic()
        outcome = celery_control.wait_drained(worker, [NODE], wait=20)
        waited = time.monotonic() - started
        assert outcome["drained"] is True and outcome["replies"] == {NODE: {"reserved": 0, "active": 0, "total": 0}}
        # Two 2 s tasks one after the other on one slot: idle after 2-4 s, seen within a poll (+ one ask).
        assert 1.0 < waited < 6.0 and abs(outcome["seconds"] - waited) < 1.0, (waited, outcome)
        print(f"\nwait_drained: idle seen {outcome['seconds']} s into the wait")
    finally:
        producer.close()


def test_wait_drained_gives_up_after_its_wait_and_says_what_is_left(worker):
    from celery import Celery

    producer = Celery("unit-test-producer", broker=worker.conf.broker_url)
    try:
        producer.send_task("celery_fleet_app.tasks.sleep_task", args=[4, "long"], queue="default")
        started = time.monotonic()
        outcome = celery_control.wait_drained(worker, [NODE], wait=1.5)
        assert outcome["drained"] is False and 1.0 <= time.monotonic() - started < 4, outcome
        assert outcome["replies"][NODE]["total"] >= 1
        assert celery_control.wait_drained(worker, [NODE], wait=15)["drained"] is True
    finally:
        producer.close()


def test_status_counts_every_priority_sub_list_and_the_unacked_per_queue(worker):
    """Ready messages in every priority sub-list kombu uses (an LLEN of the bare name sees priority 0 only),
    unacknowledged ones per queue, and each node's load, from one call."""
    from celery import Celery

    producer = Celery("unit-test-producer", broker=worker.conf.broker_url)
    celery_control.run(worker, "cancel_consumer", destination=[NODE], queue="default", timeout=2)
    try:
        sent = {0: 3, 3: 2, 9: 4}
        for priority, count in sent.items():
            for _ in range(count):
                producer.send_task("celery_fleet_app.tasks.benchmark_task", args=[1], queue="default",
                                   priority=priority)
        # One slot on "priority": one task runs, the other waits reserved (prefetched, so unacknowledged).
        for token in ("first", "second"):
            producer.send_task("celery_fleet_app.tasks.sleep_task", args=[5, token], queue="priority")
        deadline = time.monotonic() + 10
        while True:
            outcome = celery_control.status(worker, ["default", "priority", "batch"])
            reserved = outcome["nodes_status"].get(NODE, {}).get("reserved")
            if (reserved == 1 and outcome["queues_status"]["priority"]["unacked"] == 1) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        queues, node = outcome["queues_status"], outcome["nodes_status"][NODE]
        assert queues["default"]["by_priority"] == {"0": 3, "3": 2, "6": 0, "9": 4}, queues
        assert queues["default"]["ready"] == 9 and queues["default"]["consumers"] == []
        assert queues["priority"]["ready"] == 0 and queues["priority"]["consumers"] == [NODE]
        assert queues["priority"]["unacked"] == 1 and queues["default"]["unacked"] == 0, queues
        assert queues["batch"] == {"ready": 0, "by_priority": {"0": 0, "3": 0, "6": 0, "9": 0}, "unacked": 0,
                                   "oldest_by_priority": {"0": None, "3": None, "6": None, "9": None},
                                   "consumers": []}
        # The next message out of each non-empty sub-list, by its delivery tag (a UUID).
        oldest = queues["default"]["oldest_by_priority"]
        assert oldest["6"] is None and all(len(oldest[p]) == 36 for p in ("0", "3", "9")), oldest
        assert len(set(oldest.values()) - {None}) == 3
        # The next one out is the first one sent: kombu pushes on the left and pops on the right.
        import redis
        client = redis.Redis.from_url(worker.conf.broker_url)
        stored = [json.loads(raw)["properties"]["delivery_tag"] for raw in client.lrange("default", 0, -1)]
        assert len(stored) == 3 and oldest["0"] == stored[-1] != stored[0], (oldest, stored)
        client.close()
        assert (node["active"], node["reserved"], node["concurrency"], node["pool"]) == (1, 1, 1, "thread"), node
        assert node["queues"] == ["priority"] and node["uptime"] >= 0 and node["processed"] >= 0
    finally:
        celery_control.run(worker, "add_consumer", destination=[NODE], queue="default", timeout=2)
        producer.close()
    assert celery_control.wait_drained(worker, [NODE], wait=20)["drained"] is True
    after = celery_control.status(worker, ["default", "priority"])["queues_status"]
    assert after["default"]["ready"] == 0 and after["priority"]["unacked"] == 0, after


def test_status_on_a_broker_whose_acl_predates_lindex_and_hscan_still_counts_the_queues(broker_url, worker):
    """A running Redis applies its users file at its next restart: until then a client user without LINDEX and
    HSCAN gets the depths, and None (unknown) for the oldest message and the unacknowledged count."""
    import redis
    from celery import Celery

    admin = redis.Redis.from_url(broker_url)
    admin.execute_command("ACL", "SETUSER", "oldacl", "on", ">oldacl-pw", "~*", "&*", "+@all", "-lindex", "-hscan")
    host_port = broker_url.split("@")[-1].split("//")[-1].split("/")[0]
    old = Celery("unit-test-old-acl", broker=f"redis://oldacl:oldacl-pw@{host_port}/0")
    celery_control.run(worker, "cancel_consumer", destination=[NODE], queue="default", timeout=2)
    try:
        worker.send_task("celery_fleet_app.tasks.benchmark_task", args=[1], queue="default", priority=3)
        queues = celery_control.status(old, ["default"])["queues_status"]
        assert queues["default"]["by_priority"]["3"] == 1 and queues["default"]["ready"] == 1, queues
        assert queues["default"]["oldest_by_priority"]["3"] is None and queues["default"]["unacked"] is None, queues
    finally:
        celery_control.run(worker, "add_consumer", destination=[NODE], queue="default", timeout=2)
        old.close()
        admin.execute_command("ACL", "DELUSER", "oldacl")
        admin.close()
    assert celery_control.wait_drained(worker, [NODE], wait=20)["drained"] is True


def test_restart_stops_switches_the_release_and_starts_then_the_wait_sees_the_node(broker_url, worker, tmp_path):
    """restart_consuming's steps with a stand-in for systemctl that stops and starts a real worker: the stop waits
    for the warm shutdown, the links point at their targets before the start, and the wait sees the new node."""
    node = "rolled-worker@localhost"
    env = dict(os.environ, CELERY_BROKER_URL=broker_url, PYTHONPATH=str(APP_SRC))
    command = [sys.executable, "-m", "celery", "--app", "celery_fleet_app", "worker", "--pool=threads",
               "--concurrency=1", f"--hostname={node}", "--queues=batch", "--without-mingle", "--without-gossip",
               "--loglevel=WARNING"]
    processes, calls = [subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)], []
    (tmp_path / "releases" / "old").mkdir(parents=True)
    (tmp_path / "releases" / "new").mkdir()
    (tmp_path / "current").symlink_to(tmp_path / "releases" / "old")

    def systemctl(argv):
        calls.append((argv, os.readlink(tmp_path / "current")))
        if argv[1] == "stop":
            processes[-1].terminate()
            processes[-1].wait(30)
        elif argv[1] == "show":
            return 0, ("active\n" if "ActiveState" in argv else "success\n"), ""
        else:
            processes.append(subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        return 0, "", ""

    try:
        assert celery_control.wait_consuming(worker, [node], ["batch"], wait=30)["consuming"]
        timings = celery_control.restart("celery-worker@batch.service", [
            {"path": str(tmp_path / "previous"), "target": str(tmp_path / "releases" / "old")},
            {"path": str(tmp_path / "current"), "target": str(tmp_path / "releases" / "new")}], systemctl)
        assert [argv for argv, _ in calls] == [
            ["systemctl", "show", "-p", "ActiveState", "--value", "--", "celery-worker@batch.service"],
            ["systemctl", "stop", "--", "celery-worker@batch.service"],
            ["systemctl", "show", "-p", "Result", "--value", "--", "celery-worker@batch.service"],
            ["systemctl", "start", "--", "celery-worker@batch.service"]]
        # Stopped on the old release, started on the new one; the release it left recorded.
        assert [link for _, link in calls] == [str(tmp_path / "releases" / "old")] * 3 + [
            str(tmp_path / "releases" / "new")]
        assert os.readlink(tmp_path / "previous") == str(tmp_path / "releases" / "old")
        assert processes[0].returncode is not None and timings["stop_seconds"] > 0
        outcome = celery_control.wait_consuming(worker, [node], ["batch"], wait=30)
        assert outcome["consuming"] is True, outcome
        print(f"\nrestart: stop {timings['stop_seconds']} s, start {timings['start_seconds']} s, "
              f"start to consuming {outcome['seconds']} s")
    finally:
        for process in processes:
            process.terminate()
            process.wait(30)


def test_restart_names_the_step_that_failed(tmp_path):
    def failing(step):
        def systemctl(argv):
            return (1, "", f"Job for {argv[-1]} failed.") if argv[1] == step else (0, "success\n", "")
        return systemctl

    with pytest.raises(celery_control.StepFailed, match="systemctl stop unit.service failed") as failure:
        celery_control.restart("unit.service", [], failing("stop"))
    assert failure.value.step == "stop"
    with pytest.raises(celery_control.StepFailed) as failure:
        celery_control.restart("unit.service", [], failing("start"))
    assert failure.value.step == "start"
    # A stop that systemd ended with SIGKILL at TimeoutStopSec: systemctl exits 0, the unit's result says so.
    with pytest.raises(celery_control.StepFailed, match="did not stop warmly .*timeout") as failure:
        celery_control.restart("unit.service", [], lambda argv: (0, "timeout\n" if argv[1] == "show" else "", ""))
    assert failure.value.step == "stop"
    # A unit that was not running (a surge process that failed in an earlier roll): its old result is not this stop's.
    assert celery_control.restart("unit.service", [], lambda argv: (
        0, ("failed\n" if "ActiveState" in argv else "exit-code\n") if argv[1] == "show" else "", ""))
    # A link that cannot be made (a directory in its place) fails the start, before systemd is asked to start.
    (tmp_path / "current").mkdir()
    calls = []
    with pytest.raises(celery_control.StepFailed, match="pointing") as failure:
        celery_control.restart("unit.service", [{"path": str(tmp_path / "current"), "target": "/x"}],
                               lambda argv: calls.append(argv) or (0, "success\n", ""))
    assert failure.value.step == "start" and [argv[1] for argv in calls] == ["show", "stop", "show"]
    assert not list(tmp_path.glob(".current.celery-fleet-*"))
