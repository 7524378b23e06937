"""Faults under load on the lab: what each does to tasks, counted (sent, lost, run twice).

Every case sends ledger tasks to all four queues (every start and end recorded, as in test_rolling.py,
which runs first on the same lab) and prints its counts. The lab runs with a visibility timeout of 60 s
(molecule/rolling/inventory/hosts.yml), so that a lost host's tasks come back within a case.

Order: runs killed half-way (they need a fleet that rolls), the broker stopped before a roll, then
restarted and killed (one load), frozen under load, a worker host killed, one cut from the network, and results
filling their memory cap.
"""

import json
import subprocess
import threading
import time
import uuid

import pytest

import fleetlab
from fleetlab import EXPECTED_NODES, lab_host

INVENTORIES = fleetlab.ROLLING_INVENTORIES
# Runs that roll: tasks of 0-5 s, at the rolling scenario's rates (about 40% of the fleet's slots).
ROLL_RATES = {"default": 1.5, "priority": 1.0, "batch": 0.6, "ml": 0.3}
# Faults: tasks of 0-20 s (10 s on average), at about 40% of the slots (web 16, batch 4, gpu 2); with a
# web node lost, under 80% of what is left.
FAULT_RATES = {"default": 0.4, "priority": 0.24, "batch": 0.16, "ml": 0.08}
FAULT_DURATIONS = (0.0, 20.0)
VISIBILITY_TIMEOUT = 60
DRAIN_WAIT = "TASK [celery_worker : Drain: wait until the node has no reserved and no active task]"
# Back to the release the converge deployed (the rolls moved every host to 1.1.0): an upgrade like any other, and
# its wheelhouse is cached on the controller, so the case spends its time on the roll, not on a build.
INTERRUPTED_RELEASE = "1.0.0"
NETWORK = "celery-fleet-lab"


@pytest.fixture(scope="module")
def fleet():
    return fleetlab.Fleet(INVENTORIES, rates=ROLL_RATES)


def broker_pid():
    return lab_host("broker1").check_output("systemctl show -p MainPID --value redis-server")


def consuming_again(fleet, since, timeout=180):
    """Seconds from `since` until every node answers and consumes all of its queues again."""
    fleet.consuming(timeout=timeout)
    return round(time.time() - since, 1)


def queues_of(fleet, host):
    """The queues the nodes on `host` consume (what a fault on that host can leave in flight)."""
    return {queue for node, queues in fleet.nodes.items() if fleetlab.fleetload.node_host(node) == host
            for queue in queues}


def assert_duplicates_spanned(report, *faults):
    """A task that ran twice must have been running (or just ending: its acknowledgement in flight) when
    one of the `faults` (start, end) hit: a duplicate of a task that ended well before it, or began after it,
    is a bug."""
    first_runs = {}
    for record in sorted(report["records"], key=lambda record: record["started"]):
        first_runs.setdefault(record["token"], record)
    for token in report["duplicated_tokens"]:
        first = first_runs[token]
        assert any(first["started"] <= end and first["finished"] >= start - 2 for start, end in faults), (
            f"{token} ran twice but its first run ({first['started']:.1f}-{first['finished']:.1f}) did not span "
            f"a fault ({faults})")


def assert_gave_queues_back(output, node):
    """The run's preparation found `node` running and consuming nothing, and gave it its queues back."""
    lines = fleetlab.fleetload.task_results(output).get("celery_worker : Give each drained node its queues back", "")
    assert f"'{node}'" in lines and "changed:" in lines, output[-4000:]


# --- Runs that stop half-way ----------------------------------------------------------------------


def test_a_roll_killed_mid_drain_leaves_state_the_next_run_finishes(fleet):
    """SIGKILL of ansible-playbook (and its forks) while web1 drains: web1 is left consuming nothing. The
    next run (the web group's roll: the group web1 is in) gives it its queues back before any capacity is
    counted, then rolls; no task is lost or run twice across both runs."""
    before = fleet.units()

    def killed_then_rerun(load):
        killed = fleet.kill_playbook_when("rolling_restart.yml", marker=DRAIN_WAIT, after=0.5)
        # The run died after cancel_consumer: web1 runs and consumes nothing.
        left = fleetload_discover(fleet, consuming=False)
        assert left["web-worker@web1"] == [], (left, killed[-3000:])
        return fleet.run_playbook("rolling_restart.yml", "--limit", "web", "--extra-vars",
                                  '{"celery_worker_rolling_order": ["web"]}')

    rc, output, report = fleet.under_load(killed_then_rerun, "rolling_restart.yml killed mid-drain, then again")
    assert rc == 0, output[-4000:]
    assert_gave_queues_back(output, "web-worker@web1")
    fleetlab.assert_every_task_ran_exactly_once(fleet, report)
    after = fleet.units()
    assert all(after[name][unit] != pid for name in ("web1", "web2") for unit, pid in before[name].items())
    assert fleet.consuming() == fleet.nodes


def fleetload_discover(fleet, consuming=True):
    return fleetlab.fleetload.discover_nodes(fleet.client, timeout=10, hosts=list(fleet.host_groups),
                                             consuming=consuming)


def test_an_upgrade_killed_after_switching_some_hosts_is_finished_by_the_next_run(fleet):
    """SIGKILL once web1 and web2 run the new release and batch1 is next: the re-run finds web1 and web2
    already on it, still knows the release to go back to (recorded on each host when it switched), and
    ends with every node on the new release, no task lost or run twice."""
    old = fleet.releases()
    assert len(set(old.values())) == 1 and INTERRUPTED_RELEASE not in old.values()
    upgrade = ("--extra-vars", f"celery_worker_release={INTERRUPTED_RELEASE}")

    def killed_then_rerun(load):
        # One play, one batch after another: web1, web2, then batch1.
        fleet.kill_playbook_when("upgrade.yml", *upgrade, marker="PLAY [Roll the worker groups in order",
                                 occurrence=3)
        switched = fleet.releases()
        assert (switched["web1"], switched["web2"], switched["batch1"]) == (
            INTERRUPTED_RELEASE, INTERRUPTED_RELEASE, old["batch1"]), switched
        previous = lab_host("web1").check_output("readlink /opt/celery-fleet/previous")
        assert previous.endswith("/" + old["web1"]), previous
        return fleet.run_playbook("upgrade.yml", *upgrade)

    rc, output, report = fleet.under_load(killed_then_rerun, "upgrade.yml killed half-way, then again")
    assert rc == 0, output[-4000:]
    fleetlab.assert_every_task_ran_exactly_once(fleet, report)
    assert set(fleet.releases().values()) == {INTERRUPTED_RELEASE}
    assert fleet.releases_running() == {node: {INTERRUPTED_RELEASE} for node in fleet.nodes}
    for name in ("web1", "batch1"):
        previous = lab_host(name).check_output("readlink /opt/celery-fleet/previous")
        assert previous.endswith("/" + old[name]), (name, previous)


# --- The broker -----------------------------------------------------------------------------------


def test_a_roll_with_the_broker_stopped_refuses_in_seconds_and_drains_nothing(fleet):
    broker = lab_host("broker1")
    before = fleet.units()
    broker.check_output("systemctl stop redis-server")
    try:
        started = time.monotonic()
        rc, output = fleet.run_playbook("rolling_restart.yml")
        seconds = time.monotonic() - started
    finally:
        broker.check_output("systemctl start redis-server")
    print(f"roll with the broker stopped: refused after {seconds:.1f} s")
    assert rc != 0, output[-4000:]
    assert ("Wait until the nodes of the run's hosts answer" in output
            and "celery control wait_answering failed" in output), output[-4000:]
    assert "PLAY [Roll the worker groups" not in output
    assert fleet.units() == before, "a worker was stopped or restarted"
    # The workers reconnect by themselves and consume again.
    print(f"every node consuming again {consuming_again(fleet, time.time(), 60)} s after Redis started")


def test_the_broker_restarted_then_killed_under_load_loses_nothing(fleet):
    """A restart (SIGTERM, Redis writes its AOF and stops), then, once every node consumes again, a SIGKILL
    (systemd starts it again), under one load: the queues and the unacknowledged set come back from the AOF,
    the workers reconnect. Tasks whose acknowledgement was lost with the connection run again: counted, and
    each must have been running when the broker went."""
    broker = lab_host("broker1")
    pids = [broker_pid()]
    moments = []

    def faults_then_wait(load):
        for fault in ("systemctl restart redis-server", "kill -9"):
            fault_at = time.time()
            broker.check_output(f"kill -9 {pids[-1]}" if fault == "kill -9" else fault)
            fleet.consuming(timeout=120)
            moments.append((fault, fault_at, time.time()))
            pids.append(broker_pid())
        return 0, ""

    _, _, report = fleet.under_load(faults_then_wait, "broker: systemctl restart redis-server, then kill -9",
                                    warmup=10, broker_faults=True, durations=FAULT_DURATIONS, rates=FAULT_RATES)
    assert len(set(pids)) == 3, f"Redis did not restart each time: main PIDs {pids}"
    # Each start replayed the AOF whole: Redis 7.0 drops a transaction the default user may not run, with this
    # line, and kombu's unacked entries are transactions (celery_fleet_redis_acl).
    journal = broker.check_output(f"journalctl -u redis-server --no-pager -o cat --since @{int(moments[0][1])}")
    assert journal.count("Ready to accept connections") >= 2, journal[-3000:]  # both starts are in the window
    assert "AOF-loading-client" not in journal and "NOPERM" not in journal, journal[-3000:]
    for fault, fault_at, consuming_at in moments:
        print(f"broker {fault}: every node consuming again after {consuming_at - fault_at:.1f} s")
        assert consuming_at - fault_at < 60, (fault, consuming_at - fault_at)
    # A restart closes every client's connection, each node's blocked BRPOP included: a message Redis popped for a
    # reply the worker never read is lost, since kombu writes the unacked entry only once the reply arrives
    # (kombu#305, #1733 and its revert #2154, celery#4354). Seen once in the CI runs (1 of 48 sent). At most one per
    # node's BRPOP connection and fault, and checked to be exactly that (never started, in no queue, not
    # unacknowledged, sent before the broker was back).
    fleetlab.assert_every_task_ran_exactly_once(
        fleet, report, minimum=15, duplicates_allowed=report["sent"], lost_allowed=len(fleet.nodes) * len(moments),
        in_flight_to=sorted({queue for queues in fleet.nodes.values() for queue in queues}),
        sent_before=moments[-1][2])
    assert_duplicates_spanned(report, *[(fault_at, consuming_at) for _, fault_at, consuming_at in moments])


def test_a_broker_frozen_mid_drain_fails_the_roll_in_time_and_a_re_run_completes(fleet):
    """kill -STOP of Redis for 40 s while web1 drains: every control call is bounded
    (celery_worker_rolling_call_timeout, 3 s here), so the drain fails at most one call after its deadline
    (10 s here), naming the step, and the rescue's put-back gives up after the start timeout (6 s here)
    plus one call, leaving web1 drained (the run ended 24.2-24.5 s after the freeze on the lab). After kill -CONT a re-run gives web1 its queues back, rolls, and
    every node consumes."""
    broker = lab_host("broker1")
    pid = broker_pid()
    drain_timeout, call_timeout, start_timeout, frozen = 10, 3, 6, 40
    roll_vars = json.dumps({"celery_worker_group_settings": {"time_limit": drain_timeout, "soft_time_limit": 8,
                                                             "prefetch_multiplier": 1},
                            "celery_worker_rolling_drain_margin": 0, "celery_worker_rolling_order": ["web"],
                            "celery_worker_rolling_start_timeout": start_timeout,
                            "celery_worker_rolling_call_timeout": call_timeout})
    thaw = threading.Timer(frozen, lambda: broker.run(f"kill -CONT {pid}"))
    rescue = "TASK [celery_worker : Read the failed step"

    def freeze():
        broker.check_output(f"kill -STOP {pid}")
        thaw.start()
        watcher.start()

    exporter = {}

    def watch_exporter():
        """The monitor's exporter while Redis is frozen: a scrape answers at once from the last refresh, and
        reports the broker down once a refresh has missed its deadline (8 s) plus an interval (2 s here)."""
        time.sleep(15)
        started = time.monotonic()
        exporter["samples"] = fleetlab.exporter_samples()
        exporter["seconds"] = time.monotonic() - started

    watcher = threading.Thread(target=watch_exporter)
    mutex_ttl = []

    def frozen_roll_then_rerun(load):
        # Before the freeze the exporter sees the broker, over TLS since the converge.
        fleetlab.wait_for(lambda: fleetlab.exporter_samples().get(("celery_fleet_broker_up", frozenset())) == 1, 30,
                          "the exporter seeing the broker before the freeze")
        try:
            rc, output, times = fleetlab.fleetload.run_playbook_acting(
                "rolling_restart.yml", "--limit", "web", "--extra-vars", roll_vars, inventory=INVENTORIES,
                marker=DRAIN_WAIT, act=freeze, watch=[rescue])
        finally:
            thaw.join()
            broker.run(f"kill -CONT {pid}")  # whatever happened above, Redis runs again
            if watcher.ident is not None:
                watcher.join()
        # A client killed at its deadline during the freeze may have held (or just asked for) kombu's restore
        # lock: it must expire within the fleet's unacked_mutex_expire (30 s), not kombu's 300 s, or no client
        # puts back a lost worker's tasks for five minutes (the case after next lost 6 of 53 that way).
        mutex_ttl.append(fleet.client.redis(admin=True).ttl("unacked_mutex"))
        drain_failed = times[rescue] - times["acted"] if times[rescue] else None
        ended = times["ended"] - times["acted"]
        print(f"broker frozen mid-drain for {frozen} s: the drain failed {drain_failed} s and the run ended "
              f"{ended:.1f} s after the freeze (drain deadline {drain_timeout} s, call timeout {call_timeout} s, start timeout "
              f"{start_timeout} s)")
        assert rc != 0, output[-4000:]
        message = " ".join(output.split())
        assert "Rolling restart failed on web1, instance web (web-worker@web1), at step 'drain'" in message, (
            output[-4000:])
        assert "Putting it back failed too" in message, output[-4000:]
        assert drain_failed is not None and drain_failed < drain_timeout + call_timeout + 10, drain_failed
        # The rescue: the put-back's own deadline plus one call, and a few seconds of Ansible.
        assert ended - drain_failed < start_timeout + call_timeout + 15, ended
        rc, output = fleet.run_playbook("rolling_restart.yml", "--limit", "web", "--extra-vars",
                                        '{"celery_worker_rolling_order": ["web"]}')
        assert_gave_queues_back(output, "web-worker@web1")
        return rc, output

    rc, output, report = fleet.under_load(frozen_roll_then_rerun, "broker frozen mid-drain, then a re-run",
                                          broker_faults=True)
    assert rc == 0, output[-4000:]
    assert fleet.consuming() == fleet.nodes
    fleetlab.assert_every_task_ran_exactly_once(fleet, report, minimum=50, duplicates_allowed=report["sent"])
    samples = exporter["samples"]
    print(f"exporter 15 s into the freeze: scrape {exporter['seconds']:.2f} s, broker_up "
          f"{samples.get(('celery_fleet_broker_up', frozenset()))}")
    assert samples[("celery_fleet_broker_up", frozenset())] == 0 and exporter["seconds"] < 5, exporter["seconds"]
    assert samples[("celery_fleet_refresh_failures_total", frozenset())] >= 1
    assert not [name for name, _ in samples if name.startswith("celery_fleet_queue_")], "stale figures served"
    print(f"kombu's restore lock after the thaw: TTL {mutex_ttl[0]} s (-2: free)")
    assert mutex_ttl[0] <= 30, mutex_ttl


# --- Worker hosts -----------------------------------------------------------------------------------


def test_a_worker_host_killed_under_load_its_tasks_come_back_after_the_visibility_timeout(fleet):
    """docker kill web2 with tasks running: its tasks stay unacknowledged until the visibility timeout
    (60 s here) has passed, then any client's restore sweep puts them back and another node runs them.
    A roll started meanwhile refuses before changing anything, naming the lost host."""
    moments = {}

    def kill_and_roll(load):
        subprocess.run(["docker", "kill", "celery-fleet-lab-web2"], check=True, capture_output=True)
        moments["killed"] = time.time()
        rc, output = fleet.run_playbook("rolling_restart.yml")
        moments["refused"] = time.time()
        moments["limited_rc"], moments["limited_output"] = fleet.run_playbook(
            "rolling_restart.yml", "--limit", "all:!web2", "--extra-vars", "celery_worker_rolling_min_online=1")
        return rc, output

    try:
        rc, output, report = fleet.under_load(kill_and_roll, "worker host web2 killed", warmup=12,
                                              durations=FAULT_DURATIONS, rates=FAULT_RATES,
                                              complete_timeout=VISIBILITY_TIMEOUT + 120)
    finally:
        subprocess.run(["docker", "start", "celery-fleet-lab-web2"], check=True, capture_output=True)
    assert rc != 0, output[-4000:]
    message = " ".join(output.split())
    assert "Cannot reach web2 (web2: Error response from daemon: Container" in message, output[-4000:]
    assert "is not running" in message and "Nothing was changed" in message
    assert "PLAY [Roll the worker groups" not in output
    print(f"roll with web2 lost: refused after {moments['refused'] - moments['killed']:.1f} s")
    # Left out of the run, web2 still counts against its group: the capacity guard refuses to drain web1.
    message = " ".join(moments["limited_output"].split())
    assert moments["limited_rc"] != 0 and (
        "Rolling restart failed on web1, instance web (web-worker@web1), at step 'capacity guard': Capacity guard: "
        "0 other node(s) of group web are in service (none); celery_worker_rolling_min_online needs 1; host(s) web2 "
        "of group web are not in this run, their nodes unknown. Not draining web-worker@web1") in message, message[-3000:]
    # The tasks web2 held ran again elsewhere, once the visibility timeout had passed.
    late = [record["finished"] - moments["killed"] for record in report["records"]
            if record["finished"] > moments["killed"] + VISIBILITY_TIMEOUT - 30]
    print(f"web2's tasks: {len(late)} finished elsewhere, the last {max(late, default=0):.1f} s after the kill")
    # One task may be lost with web2 and no more: kombu's Redis transport takes a message off its queue with BRPOP and
    # writes to the unacked hash only after the reply has reached the worker (kombu#305, celery#7950), so a host
    # killed in between loses that one message. web2 runs one instance: one BRPOP connection. The lost task is
    # checked to be exactly that (never started, in no queue, not unacknowledged, sent to web2's queues).
    fleetlab.assert_every_task_ran_exactly_once(fleet, report, minimum=15, duplicates_allowed=report["sent"],
                                                lost_allowed=1, in_flight_to=queues_of(fleet, "web2"),
                                                sent_before=moments["killed"])
    # A task web2 had started and never finished ran again; nothing ran twice to completion.
    assert report["duplicates"] == 0, report["duplicated_tokens"]
    assert late and max(late) < VISIBILITY_TIMEOUT + 60, late
    print(f"web2 back: every node consuming again {consuming_again(fleet, moments['killed'], 120)} s after the kill")


def test_a_worker_cut_from_the_network_for_30_s_consumes_again_and_loses_nothing(fleet):
    """docker network disconnect web1, reconnect after 30 s. Its tasks run on; their acknowledgements may
    be lost with the connection, and such tasks run again after the visibility timeout (counted)."""
    container = "celery-fleet-lab-web1"
    moments = {}

    def cut(load):
        subprocess.run(["docker", "network", "disconnect", NETWORK, container], check=True, capture_output=True)
        moments["cut"] = time.time()
        time.sleep(30)
        subprocess.run(["docker", "network", "connect", "--alias", "web1", NETWORK, container], check=True,
                       capture_output=True)
        moments["reconnected"] = time.time()
        fleet.consuming(timeout=120)
        moments["consuming"] = time.time()
        return 0, ""

    # The wait for every task's record is bounded by what can still come: a task whose acknowledgement was lost runs
    # again once it has been unacknowledged for the visibility timeout, within its longest duration, and the wait
    # starts at least 30 s after the cut. The one task kombu#305 may lose (below) never comes: 180 s of waiting for it
    # was the slowest part of the whole suite. (What puts such a task back in time is the harness's own monitor: its
    # client polls the broker every 0.25 s until the wait ends, and kombu sweeps the unacked index on about every 10th
    # empty poll; the workers' own sweep runs only every unacked_restore_interval x throttle, 100 s.)
    _, _, report = fleet.under_load(cut, "worker web1 cut from the network for 30 s", warmup=10,
                                    durations=FAULT_DURATIONS, rates=FAULT_RATES,
                                    complete_timeout=VISIBILITY_TIMEOUT + FAULT_DURATIONS[1] + 20)
    print(f"web1 consuming again {moments['consuming'] - moments['reconnected']:.1f} s after it was reconnected")
    # One task of 67 was lost here in one CI run of four. Redis keeps web1's blocked BRPOP through the cut (it sees
    # no FIN): the next message of its queues is popped on the server and written to a socket nobody reads, and
    # kombu writes the unacked entry only once the reply arrives (kombu#305, celery#7950). One per BRPOP
    # connection, web1 has one: at most one task, never started, in no queue, not unacknowledged.
    fleetlab.assert_every_task_ran_exactly_once(fleet, report, minimum=15, duplicates_allowed=report["sent"],
                                                lost_allowed=1, in_flight_to=queues_of(fleet, "web1"),
                                                sent_before=moments["reconnected"])
    assert_duplicates_spanned(report, (moments["cut"], moments["consuming"]))


# --- Memory -----------------------------------------------------------------------------------------


def test_results_filling_their_cap_are_evicted_and_the_queues_lose_nothing(fleet):
    """The lab caps results at 64 MiB on their own instance (volatile-ttl: the oldest first). 150 MiB of result-sized
    values written under load: the results instance evicts, never refuses; the queue instance is not
    touched; every task runs once; a fresh result can still be stored and read."""
    # INFO is the admin's (the clients' ACL user may not run it); the flood writes as the clients do.
    results = fleet.client.redis(fleet.client.result_url, admin=True)
    queues = fleet.client.redis(admin=True)
    writer = fleet.client.redis(fleet.client.result_url)
    evicted_before = results.info("stats")["evicted_keys"]
    queue_memory_before = queues.info("memory")["used_memory"]
    value = b"r" * 65536

    def flood(load):
        for batch in range(30):
            pipe = writer.pipeline(transaction=False)
            for index in range(80):
                pipe.set(f"celery-task-meta-flood-{batch}-{index}-{uuid.uuid4().hex}", value, ex=86400)
            pipe.execute()
        return 0, ""

    # The flood itself takes seconds: a longer warmup and cooldown than a roll's give the load its 50 tasks.
    _, _, report = fleet.under_load(flood, "results flooded past their 64 MiB cap", warmup=8.0, cooldown=5.0)
    memory = results.info("memory")
    evicted = results.info("stats")["evicted_keys"] - evicted_before
    print(f"results instance: {evicted} keys evicted, used {memory['used_memory'] / 2**20:.1f} MiB of "
          f"{memory['maxmemory'] / 2**20:.0f} MiB; queue instance used "
          f"{queue_memory_before / 2**20:.1f} -> {queues.info('memory')['used_memory'] / 2**20:.1f} MiB")
    assert memory["maxmemory"] == 64 * 2**20 and memory["maxmemory_policy"] == "volatile-ttl"
    assert evicted > 0 and memory["used_memory"] <= memory["maxmemory"] * 1.05
    assert queues.info("memory")["maxmemory"] == 0
    fleetlab.assert_every_task_ran_exactly_once(fleet, report, minimum=50)
    # Results still work: a task's result is stored and read back at the cap.
    app = fleet.client.app("faults-results")
    app.conf.result_backend = fleet.client.result_url
    assert app.send_task("celery_fleet_app.tasks.priority_echo", args=["at-the-cap"],
                         queue="priority").get(timeout=30)["value"] == "at-the-cap"
    assert len(fleet.consuming()) == EXPECTED_NODES
