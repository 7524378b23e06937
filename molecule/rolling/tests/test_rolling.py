"""Rolling restart and upgrades of the lab fleet while a producer keeps all four queues busy.

Each case checks, from outside the playbooks:
- every task sent ran to completion exactly once (ledger records; loss and duplicate counts reported);
- no task was killed: no WorkerLostError, no SIGKILL and no stop timeout in any unit's journal, and
  every stopped instance logged a warm shutdown;
- at no sampled moment were more nodes of a group out of service than the batch size allows.

The cases run in order on one lab: a restart refused by the capacity guard, a dry run (--check), a
roll refused for a group order that leaves a host out, a restart, an upgrade to a new release, an
upgrade to a release whose application cannot be imported (it must stop at the canary and put it
back), one that fails on a host's second instance, and a roll whose drain times out.
"""

import json
import os
import re
import shutil
import time

import pytest
import testinfra

import fleetload

PROJECT = fleetload.PROJECT
INVENTORY = str(PROJECT / "inventories" / "lab")
# The lab runs web-worker@web1, @web2, batch-worker@batch1 and two GPU instances on gpu1.
EXPECTED_NODES = 5
# Tasks per second sent to each queue, 0 to 5 s each (2.5 s on average): about 40% of the fleet's
# slots in steady state (web 16, batch 4, gpu 2), and under 80% of what is left while a web or GPU
# node is out. The batch queue has one host: it waits while batch1 rolls, and must lose nothing.
RATES = {"default": 1.5, "priority": 1.0, "batch": 0.6, "ml": 0.3}
WARMUP = 8  # seconds of load before the roll starts
COOLDOWN = 5  # seconds of load after it ends
NEW_RELEASE = "1.1.0"
BROKEN_RELEASE = "1.2.0-broken"
GPU1_BROKEN_RELEASE = "1.3.0-broken-on-gpu-1"
DEPLOYED_BROKEN_RELEASE = "1.5.0-broken"
# Lines that mean a task or a worker was killed, or a stop did not end warmly.
KILLED = re.compile(r"WorkerLostError|SIGKILL|status=9/KILL|code=killed|Cold shutdown|[Tt]imed out|"
                    r"Killing process|Failed with result '(timeout|signal|oom-kill)'")


def lab_host(name):
    return testinfra.get_host(f"ansible://{name}", ansible_inventory=INVENTORY)


class Fleet:
    def __init__(self):
        self.client = fleetload.lab_client(INVENTORY, PROJECT)
        self.host_groups = fleetload.worker_groups(INVENTORY, PROJECT)
        self.nodes = fleetload.discover_nodes(self.client, EXPECTED_NODES)
        self.node_groups = {node: self.host_groups[fleetload.node_host(node)] for node in self.nodes}
        # A batch of N hosts rolls their instances one after another: at most N nodes out at once. Worked out
        # by hand, not by the role's plan: the lab's groups have 2, 1 and 1 hosts, and serial [1, '25%']
        # makes batches of one host in each (25% of 2 rounds down to 0, and a batch has at least one host).
        self.allowed_out = {"web": 1, "batch": 1, "gpu": 1}
        assert set(self.host_groups.values()) == set(self.allowed_out), self.host_groups

    def units(self):
        """{host: {unit: MainPID}} of every worker instance."""
        state = {}
        for name in self.host_groups:
            host = lab_host(name)
            listing = host.check_output("systemctl list-units 'celery-worker@*' --all --plain --no-legend")
            units = sorted(line.split()[0] for line in listing.splitlines() if line.strip())
            state[name] = {unit: host.check_output(f"systemctl show -p MainPID --value {unit}") for unit in units}
        return state

    def releases(self):
        """{host: the release `current` points at}."""
        return {name: os.path.basename(lab_host(name).check_output("readlink /opt/celery-fleet/current"))
                for name in self.host_groups}


@pytest.fixture(scope="module")
def fleet():
    return Fleet()


def run_playbook(playbook, *extra_args):
    return fleetload.run_playbook(playbook, *extra_args, inventory=INVENTORY, project=PROJECT, timeout=1200)


def roll_under_load(fleet, playbook, *extra_args):
    """Run a playbook while the producer sends tasks; return (rc, output, report) (report["records"]: the ledger)."""
    return under_load(fleet, lambda: run_playbook(playbook, *extra_args), f"{playbook} {' '.join(extra_args)}")


def under_load(fleet, operation, label):
    """Run operation() -> (rc, output) while the producer sends tasks; return (rc, output, report)."""
    load = fleetload.Load(fleet.client, fleet.nodes, rates=RATES)
    load.start()
    time.sleep(WARMUP)
    load.mark("roll_start")
    rc, output = operation()
    load.mark("roll_end")
    time.sleep(COOLDOWN)
    records = load.finish()
    assert not load.producer.errors, load.producer.errors
    assert not load.monitor.errors, load.monitor.errors
    report = fleetload.analyse(load.producer.sent, records, load.monitor.samples, fleet.node_groups, load.marks,
                               fleet.allowed_out, load.starts)
    summary = {key: report[key] for key in ("sent", "completed", "lost", "duplicates", "started_again",
                                            "redelivered", "unknown",
                                            "sent_per_queue", "ran_per_node", "ran_per_release",
                                            "max_out_of_service", "allowed_out_of_service", "samples")}
    summary["roll_seconds"] = round(load.marks["roll_end"] - load.marks["roll_start"], 1)
    print(f"{label}: {json.dumps(summary, sort_keys=True)}")
    report["records"] = records
    return rc, output, report


def assert_every_task_ran_exactly_once(report, minimum=100):
    assert report["sent"] >= minimum, f"the producer sent only {report['sent']} tasks"
    assert set(report["sent_per_queue"]) == set(RATES), report["sent_per_queue"]
    assert (report["lost"], report["duplicates"], report["started_again"], report["unknown"]) == (0, 0, 0, 0), (
        f"{report['lost']} task(s) lost {report['lost_tokens']}, {report['duplicates']} run twice "
        f"{report['duplicated_tokens']}, {report['started_again']} started again {report['started_again_tokens']}, "
        f"{report['unknown']} unknown, of {report['sent']} sent")


def assert_capacity_kept(report):
    for group, allowed in report["allowed_out_of_service"].items():
        assert report["max_out_of_service"].get(group, 0) <= allowed, (
            f"group {group}: {report['max_out_of_service'][group]} node(s) out of service at once "
            f"({report['worst_moment'][group]}); the batch size allows {allowed}")


def assert_rolled(report, nodes):
    """Each node went out of service exactly once (drain to consuming again), and came back."""
    for node in nodes:
        windows = report["windows"][node]
        assert len(windows) == 1, f"{node}: out-of-service windows {windows}"
        assert windows[0]["end"] is not None, f"{node} never came back into service"


def assert_warm_stops_only(fleet, since, stopped_units):
    """No kill in any worker unit's journal since `since`; every stopped unit logged a warm shutdown."""
    for name, units in stopped_units.items():
        host = lab_host(name)
        for unit in units:
            journal = host.check_output(f"journalctl --no-pager -o cat --since=@{int(since)} -u {unit}")
            killed = [line for line in journal.splitlines() if KILLED.search(line)]
            assert not killed, f"{name} {unit}: {killed}"
            assert "worker: Warm shutdown (MainProcess)" in journal, f"{name} {unit} did not shut down warmly"
        # And nothing was killed in the instances that were not stopped either.
        journal = host.check_output(f"journalctl --no-pager -o cat --since=@{int(since)} -u 'celery-worker@*'")
        killed = [line for line in journal.splitlines() if KILLED.search(line)]
        assert not killed, f"{name}: {killed}"


def assert_drained_before_stop(fleet, since, stopped_units, records):
    """The drain really drained: every task the old process ran had finished before it got SIGTERM.

    Without a drain, a warm shutdown would still let running tasks finish, after the signal. Tasks
    carry the PID of the worker's main process, which is the unit's MainPID.
    """
    for name, units in stopped_units.items():
        host = lab_host(name)
        for unit, pid in units.items():
            journal = host.check_output(f"journalctl --no-pager -o short-unix --since=@{int(since)} -u {unit}")
            warm = [float(line.split()[0]) for line in journal.splitlines() if "Warm shutdown (MainProcess)" in line]
            assert warm, f"{name} {unit}: no warm shutdown"
            ran = [r["finished"] for r in records if r["host"] == name and str(r["worker_pid"]) == pid]
            assert ran, f"{name} {unit} (PID {pid}) ran no task of the load before it was stopped"
            assert max(ran) <= warm[0], (
                f"{name} {unit}: a task finished {max(ran) - warm[0]:.2f} s after SIGTERM: the node was not drained")


def test_capacity_guard_refuses_to_drain_below_the_minimum(fleet):
    before = fleet.units()
    rc, output = run_playbook("rolling_restart.yml", "--extra-vars", "celery_worker_rolling_min_online=2")
    assert rc != 0, output[-4000:]
    message = " ".join(output.split())
    assert ("Rolling restart failed on web1, instance web (web-worker@web1), at step 'capacity guard': "
            "Capacity guard: 1 other node(s) of group web are in service (web-worker@web2); "
            "celery_worker_rolling_min_online needs 2. Not draining web-worker@web1. "
            "Nothing was drained or stopped.") in message, output[-4000:]
    # Nothing was drained or restarted.
    assert fleet.units() == before
    assert fleetload.discover_nodes(fleet.client, EXPECTED_NODES) == fleet.nodes


def test_a_dry_run_changes_nothing(fleet):
    before = fleet.units()
    rc, output = run_playbook("rolling_restart.yml", "--check")
    assert rc == 0, output[-4000:]
    assert "PLAY [Roll the worker groups in order, a canary batch first in each]" in output
    assert fleet.units() == before
    assert fleetload.discover_nodes(fleet.client, EXPECTED_NODES) == fleet.nodes


def test_a_roll_that_would_leave_a_host_out_is_refused(fleet):
    before = fleet.units()
    rc, output = run_playbook("rolling_restart.yml", "--extra-vars", '{"celery_worker_rolling_order": ["web", "batch"]}')
    assert rc != 0, output[-4000:]
    message = " ".join(output.split())
    assert ("celery_worker_rolling_order ['web', 'batch'] must together hold every worker host of the run; "
            "worker hosts in none of them: ['gpu1']") in message, output[-4000:]
    assert "PLAY [Roll the worker groups" not in output
    assert fleet.units() == before


def test_rolling_restart_under_load_loses_nothing(fleet):
    """An order of one group that holds every worker host (the upgrade below rolls the default three)."""
    before = fleet.units()
    since = time.time()
    rc, output, report = roll_under_load(fleet, "rolling_restart.yml", "--extra-vars",
                                         '{"celery_worker_rolling_order": ["workers"]}')
    assert rc == 0, output[-4000:]
    assert_every_task_ran_exactly_once(report)
    assert_capacity_kept(report)
    assert_rolled(report, fleet.nodes)
    after = fleet.units()
    for name, units in before.items():
        assert set(after[name]) == set(units), name
        for unit, pid in units.items():
            assert after[name][unit] != pid, f"{name} {unit} was not restarted"
    assert_warm_stops_only(fleet, since, before)
    assert_drained_before_stop(fleet, since, before, report["records"])
    assert fleetload.discover_nodes(fleet.client, EXPECTED_NODES) == fleet.nodes


def test_upgrade_under_load_switches_every_node_and_loses_nothing(fleet):
    old_releases = fleet.releases()
    assert NEW_RELEASE not in old_releases.values()
    before = fleet.units()
    since = time.time()
    rc, output, report = roll_under_load(fleet, "upgrade.yml", "--extra-vars", f"celery_worker_release={NEW_RELEASE}")
    assert rc == 0, output[-4000:]
    assert_every_task_ran_exactly_once(report)
    assert_capacity_kept(report)
    assert_rolled(report, fleet.nodes)
    assert set(fleet.releases().values()) == {NEW_RELEASE}
    # Tasks ran on both releases, and after the roll only on the new one.
    assert set(report["ran_per_release"]) == set(old_releases.values()) | {NEW_RELEASE}, report["ran_per_release"]
    assert_warm_stops_only(fleet, since, before)
    assert_drained_before_stop(fleet, since, before, report["records"])
    # Every node now runs tasks in a process started from the new release.
    assert releases_running(fleet) == {node: {NEW_RELEASE} for node in fleet.nodes}


def releases_running(fleet, timeout=60):
    """{node: releases its tasks ran on}, under load until every node has run at least one task."""
    load = fleetload.Load(fleet.client, fleet.nodes, rates=RATES)
    load.start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and {r["node"] for r in load.ledger.records()} != set(fleet.nodes):
        time.sleep(1)
    seen = {}
    for record in load.finish():
        seen.setdefault(record["node"], set()).add(record["release"])
    return seen


def broken_copy(tmp_path, condition="True"):
    """A copy of the application whose package raises on import when `condition` holds."""
    source = shutil.copytree(PROJECT / "app", tmp_path / "app",
                             ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    init = source / "src" / "celery_fleet_app" / "__init__.py"
    init.write_text(f"import os\nif {condition}:\n"
                    f"    raise ImportError('celery-fleet test: this release cannot be imported')\n" + init.read_text())
    return source


def failed_upgrade_under_load(fleet, failing_host, release, source, playbook="upgrade.yml", **extra_vars):
    """Upgrade to a release that fails on `failing_host`, under load. Checks what every failed upgrade
    must leave: the run failed, no host's release changed, no host but `failing_host` was touched,
    every node consumes again, no task was lost or run twice, capacity was kept.
    Returns (message on one line, full output, report, units before, start time, releases before)."""
    releases = fleet.releases()
    before = fleet.units()
    since = time.time()
    rc, output, report = roll_under_load(
        fleet, playbook, "--extra-vars",
        json.dumps({"celery_worker_release": release, "celery_worker_app_source": str(source),
                    "celery_worker_rolling_start_timeout": 30, **extra_vars}))
    assert rc != 0, output[-4000:]
    # The new release was staged everywhere, but only the failing host was touched and it is back as it was.
    assert fleet.releases() == releases
    after = fleet.units()
    assert {name: units for name, units in after.items() if name != failing_host} == {
        name: units for name, units in before.items() if name != failing_host}, (
        f"a host other than {failing_host} changed")
    assert fleetload.discover_nodes(fleet.client, EXPECTED_NODES) == fleet.nodes
    assert_every_task_ran_exactly_once(report)
    assert_capacity_kept(report)
    return " ".join(output.split()), output, report, before, since, releases


def test_upgrade_to_a_release_that_cannot_import_stops_at_the_canary_and_rolls_back(fleet, tmp_path):
    message, output, report, before, since, releases = failed_upgrade_under_load(
        fleet, "web1", BROKEN_RELEASE, broken_copy(tmp_path))
    assert "Rolling upgrade failed on web1, instance web (web-worker@web1), at step 'health check'" in message, (
        output[-4000:])
    assert "put back on its previous release and is consuming again" in message
    assert fleet.units()["web1"]["celery-worker@web.service"] != before["web1"]["celery-worker@web.service"]
    assert set(report["ran_per_release"]) == set(releases.values()), report["ran_per_release"]
    # The canary's old process stopped warmly; the broken one never ran a task.
    assert_warm_stops_only(fleet, since, {"web1": ["celery-worker@web.service"]})
    assert_drained_before_stop(fleet, since, {"web1": {"celery-worker@web.service": before["web1"][
        "celery-worker@web.service"]}}, report["records"])


def test_a_failed_upgrade_takes_back_the_instances_of_the_host_already_upgraded(fleet, tmp_path):
    """gpu1 runs two instances. The new release imports on GPU 0 and not on GPU 1: the first instance
    upgrades, the second fails, and both must end on the old release (a host never runs two)."""
    message, output, report, before, since, releases = failed_upgrade_under_load(
        fleet, "gpu1", GPU1_BROKEN_RELEASE, broken_copy(tmp_path, "os.environ.get('CUDA_VISIBLE_DEVICES') == '1'"),
        celery_worker_rolling_order=["gpu", "web", "batch"])
    assert ("Rolling upgrade failed on gpu1, instance gpu-2 (gpu-worker-2@gpu1), at step 'health check'" in message
            and "and so were the instances of the host already upgraded: gpu-1" in message), output[-4000:]
    after = fleet.units()
    assert all(after["gpu1"][unit] != pid for unit, pid in before["gpu1"].items()), (before["gpu1"], after["gpu1"])
    # gpu-worker-1 ran tasks on the new release for a while; now both GPU nodes run the old one.
    assert GPU1_BROKEN_RELEASE in report["ran_per_release"], report["ran_per_release"]
    running = releases_running(fleet)
    assert running == {node: set(releases.values()) for node in fleet.nodes}, running
    assert_warm_stops_only(fleet, since, {"gpu1": list(before["gpu1"])})
    assert_drained_before_stop(fleet, since, {"gpu1": before["gpu1"]}, report["records"])


def test_a_drain_that_times_out_leaves_the_node_running_and_consuming(fleet):
    """The drain deadline is prefetch_multiplier x time_limit + margin. Computed here from a 2 s limit
    (the running workers keep theirs), it passes while web1 still runs tasks of up to 5 s: the roll must
    stop at step 'drain', give web1 its queues back without ever stopping it, and lose nothing."""
    before = fleet.units()
    rc, output, report = roll_under_load(
        fleet, "rolling_restart.yml", "--extra-vars",
        json.dumps({"celery_worker_group_settings": {"time_limit": 2, "soft_time_limit": 1, "prefetch_multiplier": 1},
                    "celery_worker_rolling_drain_margin": 0}))
    assert rc != 0, output[-4000:]
    message = " ".join(output.split())
    assert ("Rolling restart failed on web1, instance web (web-worker@web1), at step 'drain': "
            "web-worker@web1 still had") in message and "after the drain timeout of 2 s" in message, output[-4000:]
    assert "put back on its previous release and is consuming again" in message
    assert fleet.units() == before, "a worker was stopped"
    assert fleetload.discover_nodes(fleet.client, EXPECTED_NODES) == fleet.nodes
    assert_every_task_ran_exactly_once(report, minimum=50)  # a short run: about 30 s of load
    assert_capacity_kept(report)


def test_a_plain_deploy_of_a_release_that_cannot_import_stops_at_the_canary_and_puts_it_back(fleet, tmp_path):
    """site.yml with a new release on a running fleet: it changes running instances only through the roll's
    drain, warm stop, start and health check, canary first. The broken release stops the deploy at web1,
    which goes back to its release; no other host's release or process changed; nothing lost."""
    message, output, report, before, since, releases = failed_upgrade_under_load(
        fleet, "web1", DEPLOYED_BROKEN_RELEASE, broken_copy(tmp_path), playbook="site.yml")
    assert "Rolling upgrade failed on web1, instance web (web-worker@web1), at step 'health check'" in message, (
        output[-4000:])
    assert "put back on its previous release and is consuming again" in message
    assert "PLAY [Report the fleet" not in output
    assert_warm_stops_only(fleet, since, {"web1": ["celery-worker@web.service"]})
    assert_drained_before_stop(fleet, since, {"web1": {"celery-worker@web.service": before["web1"][
        "celery-worker@web.service"]}}, report["records"])


# --- A run that stops half-way, and a broker that is gone -------------------------------------------

DRAIN_WAIT = "TASK [celery_worker : Drain: wait until the node has no reserved and no active task]"
INTERRUPTED_RELEASE = "1.4.0"


def test_a_roll_killed_mid_drain_leaves_state_the_next_run_finishes(fleet):
    """SIGKILL of ansible-playbook (and its forks) while web1 drains: web1 is left consuming nothing. The
    next run gives it its queues back before any capacity is counted, then rolls everything; no task is
    lost or run twice across both runs."""
    before = fleet.units()

    def killed_then_rerun():
        killed = fleetload.kill_playbook_when("rolling_restart.yml", inventory=INVENTORY, marker=DRAIN_WAIT,
                                              after=0.5)
        # The run died after cancel_consumer: web1 runs and consumes nothing.
        left = fleetload.discover_nodes(fleet.client, timeout=10, hosts=["web1", "web2", "batch1", "gpu1"],
                                        consuming=False)
        assert left["web-worker@web1"] == [], (left, killed[-3000:])
        return run_playbook("rolling_restart.yml")

    rc, output, report = under_load(fleet, killed_then_rerun, "rolling_restart.yml killed mid-drain, then again")
    assert rc == 0, output[-4000:]
    assert "Give each drained node its queues back" in output
    assert_every_task_ran_exactly_once(report)
    after = fleet.units()
    assert all(after[name][unit] != pid for name, units in before.items() for unit, pid in units.items())
    assert fleetload.discover_nodes(fleet.client, EXPECTED_NODES) == fleet.nodes


def test_an_upgrade_killed_after_switching_some_hosts_is_finished_by_the_next_run(fleet):
    """SIGKILL once web1 and web2 run the new release and batch1 is next: the re-run finds web1 and web2
    already on it, still knows the release to go back to (recorded on each host when it switched), and
    ends with every node on the new release, no task lost or run twice."""
    old = fleet.releases()
    assert len(set(old.values())) == 1 and INTERRUPTED_RELEASE not in old.values()
    upgrade = ("--extra-vars", f"celery_worker_release={INTERRUPTED_RELEASE}")

    def killed_then_rerun():
        # One play, one batch after another: web1, web2, then batch1.
        fleetload.kill_playbook_when("upgrade.yml", *upgrade, inventory=INVENTORY,
                                     marker="PLAY [Roll the worker groups in order", occurrence=3)
        switched = fleet.releases()
        assert (switched["web1"], switched["web2"], switched["batch1"]) == (
            INTERRUPTED_RELEASE, INTERRUPTED_RELEASE, old["batch1"]), switched
        previous = lab_host("web1").check_output("readlink /opt/celery-fleet/previous")
        assert os.path.basename(previous) == old["web1"], previous
        return run_playbook("upgrade.yml", *upgrade)

    rc, output, report = under_load(fleet, killed_then_rerun, "upgrade.yml killed half-way, then again")
    assert rc == 0, output[-4000:]
    assert_every_task_ran_exactly_once(report)
    assert set(fleet.releases().values()) == {INTERRUPTED_RELEASE}
    assert releases_running(fleet) == {node: {INTERRUPTED_RELEASE} for node in fleet.nodes}
    for name in ("web1", "batch1"):
        previous = lab_host(name).check_output("readlink /opt/celery-fleet/previous")
        assert os.path.basename(previous) == old[name], (name, previous)


# Last: a broker restart is felt by every client for a while (the workers reconnect by themselves).
def test_a_roll_with_the_broker_stopped_refuses_in_seconds_and_drains_nothing(fleet):
    broker = lab_host("broker1")
    before = fleet.units()
    broker.check_output("systemctl stop redis-server")
    try:
        started = time.monotonic()
        rc, output = run_playbook("rolling_restart.yml")
        seconds = time.monotonic() - started
    finally:
        broker.check_output("systemctl start redis-server")
    print(f"roll with the broker stopped: refused after {seconds:.1f} s")
    assert rc != 0, output[-4000:]
    assert "Wait until the host's nodes answer" in output and "celery control inspect failed" in output, (
        output[-4000:])
    assert "PLAY [Roll the worker groups" not in output
    assert fleet.units() == before, "a worker was stopped or restarted"
    # The workers reconnect by themselves and consume again.
    assert fleetload.discover_nodes(fleet.client, EXPECTED_NODES, timeout=60) == fleet.nodes
