"""Rolling restart and upgrades of the lab fleet while a producer keeps all four queues busy.

Each case checks, from outside the playbooks:
- every task sent ran to completion exactly once (ledger records; loss and duplicate counts reported);
- no task was killed: no WorkerLostError, no SIGKILL and no stop timeout in any unit's journal, and
  every stopped instance logged a warm shutdown;
- at no sampled moment were more nodes of a group out of service than the batch size allows.

The cases run in order on one lab: a restart refused by the capacity guard, a dry run (--check), a
roll refused for a group order that leaves a host out, an upgrade to a new release, a plain deploy (site.yml)
of a release whose worker on the canary's second instance cannot start (it must stop there and put back both
instances), and a roll whose drain times out. Faults (a killed run, the broker, lost hosts) are the faults scenario's.
"""

import json
import os
import shutil
import subprocess
import threading
import time
from urllib.parse import parse_qsl, unquote, urlsplit

import pytest
import redis

import fleetlab
import fleetload
from fleetlab import PROJECT, assert_capacity_kept, assert_drained_before_stop, assert_rolled, assert_warm_stops_only

# Tasks per second sent to each queue, 0 to 5 s each (2.5 s on average): about 40% of the fleet's
# slots in steady state (web 16, batch 4, gpu 2), and under 80% of what is left while a web or GPU
# node is out. The batch queue has one host: it waits while batch1 rolls, and must lose nothing.
RATES = {"default": 1.5, "priority": 1.0, "batch": 0.6, "ml": 0.3}
NEW_RELEASE = "1.1.0"
# How an operator chasing a problem runs a playbook: the leak checks run these.
LOUD = ("-vvv", "--diff", "--become", "--become-method", "su")
# A release that imports everywhere but in a process given GPU 1: the health check's failure, not the app check's.
GPU1_BROKEN_RELEASE = "1.3.0-broken-on-gpu-1"
GPU1_CONDITION = "os.environ.get('CUDA_VISIBLE_DEVICES') == '1'"


@pytest.fixture(scope="module")
def fleet():
    return fleetlab.Fleet(fleetlab.ROLLING_INVENTORIES, rates=RATES)


def assert_every_task_ran_exactly_once(fleet, report, minimum=100):
    fleetlab.assert_every_task_ran_exactly_once(fleet, report, minimum)


def test_the_broker_serves_tls_only_and_clients_check_its_certificate(fleet):
    """celery_broker_tls (this scenario's inventory): the plain port is closed, a client that does not check the
    certificate against the fleet's CA is refused, the fleet's own clients connect over TLS."""
    parts = urlsplit(fleet.client.broker_url)
    query = dict(parse_qsl(parts.query))
    assert parts.scheme == "rediss" and query["ssl_cert_reqs"] == "required", parts.scheme
    credentials = {"host": parts.hostname, "port": parts.port, "username": unquote(parts.username),
                   "password": unquote(parts.password), "socket_timeout": 5, "socket_connect_timeout": 5}
    # Plain TCP, right user and password: the TLS listener drops it.
    with pytest.raises(redis.exceptions.ConnectionError) as plain:
        redis.Redis(**credentials).ping()
    # TLS without the fleet's CA (the system's CAs only): the certificate does not verify.
    with pytest.raises(redis.exceptions.ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
        redis.Redis(ssl=True, ssl_cert_reqs="required", **credentials).ping()
    # With the CA the workers hold: it answers.
    assert redis.Redis(ssl=True, ssl_cert_reqs="required", ssl_ca_certs=query["ssl_ca_certs"], **credentials).ping()
    print(f"plain TCP refused ({plain.value}); TLS without the CA: certificate verify failed; with it: PONG")

    broker = fleetlab.lab_host("broker1")
    config = broker.file("/etc/redis/redis.conf").content_string
    assert "\nport 0\n" in config and f"\ntls-port {parts.port}\n" in config
    # Redis listens on the queue and results instances' ports only, both TLS (results: port + 1, the lab caps them).
    results_config = broker.file("/etc/redis/redis-results.conf").content_string
    assert "\nport 0\n" in results_config and f"\ntls-port {parts.port + 1}\n" in results_config
    ports = {line.split()[3].rpartition(":")[2] for line in broker.run("ss -Htln").stdout.splitlines()}
    assert {str(parts.port), str(parts.port + 1)} <= ports, ports
    key = broker.file("/etc/redis/tls/redis.key")
    assert (key.user, key.mode) == ("redis", 0o600)
    ca = broker.file("/etc/redis/tls/ca.crt").content_string
    for host in ("web1", "web2", "batch1", "gpu1"):
        worker = fleetlab.lab_host(host)
        assert worker.file("/etc/celery-fleet/broker-ca.crt").content_string == ca, host
        # From a worker host too, a plain PING gets no Redis reply (a plain Redis would say -NOAUTH).
        reply = worker.run(f"timeout 5 bash -c 'exec 3<>/dev/tcp/broker1/{parts.port} && echo connected; "
                           f"printf \"PING\\r\\n\" >&3; timeout 2 head -c 64 <&3 | od -c | head -3'").stdout
        assert reply.startswith("connected"), (host, reply)  # the port is open: TLS answers there, not Redis
        assert "N   O   A   U   T   H" not in reply and "P   O   N   G" not in reply, (host, reply)
    # Every node answers the control API, over TLS.
    assert fleet.consuming() == fleet.nodes


def test_capacity_guard_refuses_to_drain_below_the_minimum(fleet):
    before = fleet.units()
    rc, output = fleet.run_playbook("rolling_restart.yml", "--extra-vars", "celery_worker_rolling_min_online=2")
    assert rc != 0, output[-4000:]
    message = " ".join(output.split())
    assert ("Rolling restart failed on web1, instance web (web-worker@web1), at step 'capacity guard': "
            "Capacity guard: 1 other node(s) of group web are in service (web-worker@web2); "
            "celery_worker_rolling_min_online needs 2. Not draining web-worker@web1. "
            "Nothing was drained or stopped.") in message, output[-4000:]
    # Nothing was drained or restarted.
    assert fleet.units() == before
    assert fleet.consuming() == fleet.nodes


def test_a_dry_run_changes_nothing(fleet):
    before = fleet.units()
    rc, output = fleet.run_playbook("rolling_restart.yml", "--check")
    assert rc == 0, output[-4000:]
    assert "PLAY [Roll the worker groups in order, a canary batch first in each]" in output
    assert fleet.units() == before
    assert fleet.consuming() == fleet.nodes


def test_a_roll_that_would_leave_a_host_out_is_refused(fleet):
    before = fleet.units()
    rc, output = fleet.run_playbook("rolling_restart.yml", "--extra-vars", '{"celery_worker_rolling_order": ["web", "batch"]}')
    assert rc != 0, output[-4000:]
    message = " ".join(output.split())
    assert ("celery_worker_rolling_order ['web', 'batch'] must together hold every worker host of the run; "
            "worker hosts in none of them: ['gpu1']") in message, output[-4000:]
    assert "PLAY [Roll the worker groups" not in output
    assert fleet.units() == before


def test_upgrade_under_load_switches_every_node_and_loses_nothing(fleet):
    """While the broker's and web1's command lines are sampled: no password of the broker shows in a command
    line. (The deploy below runs as an operator debugging would, -vvv --diff and become, through the same
    plays as upgrade.yml, and its output, command lines, journals and world-readable files are scanned too.)
    A rolling restart under load is the fleet scenario's (tests/test_app.py, with an operator's own app)."""
    old_releases = fleet.releases()
    assert NEW_RELEASE not in old_releases.values()
    before = fleet.units()
    since = time.time()
    with fleetlab.ProcessSampler() as sampler:
        rc, output, report = fleet.roll_under_load("upgrade.yml", "--become", "--become-method", "su",
                                                   "--extra-vars", f"celery_worker_release={NEW_RELEASE}")
    assert rc == 0, output[-4000:]
    leaks = fleetlab.assert_no_secret_leaked(fleet.secret_markers, output, sampler, hosts=())
    print(f"\nleak check (command lines, and the output): {json.dumps(leaks)}")
    assert_every_task_ran_exactly_once(fleet, report)
    assert_capacity_kept(report)
    assert_rolled(report, fleet.nodes)
    assert set(fleet.releases().values()) == {NEW_RELEASE}
    # Tasks ran on both releases, and after the roll only on the new one.
    assert set(report["ran_per_release"]) == set(old_releases.values()) | {NEW_RELEASE}, report["ran_per_release"]
    assert_warm_stops_only(since, before)
    assert_drained_before_stop(since, before, report["records"])
    # Every node now runs tasks in a process started from the new release.
    assert fleet.releases_running() == {node: {NEW_RELEASE} for node in fleet.nodes}
    # celery beat (batch1) restarted in the roll's last play: its 2 s tick neither twice nor skipped.
    time.sleep(fleetlab.BEAT_TICK)
    beat = fleetlab.assert_beat_ticked_through_a_restart(fleet.client.redis(), since)
    print(f"\nbeat across the roll: {json.dumps(beat)}")


def broken_copy(tmp_path, condition):
    """A copy of the application whose package raises on import when `condition` holds (a Python expression;
    os and sys are imported). A release that cannot be imported at all never gets this far: the application check
    refuses it before current moves (tests/integration/test_app_runtime.py); one that fails only when the
    worker starts (a setting, a library or a device it needs then) is what the roll's canary catches."""
    source = shutil.copytree(PROJECT / "app", tmp_path / "app",
                             ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    init = source / "src" / "celery_fleet_app" / "__init__.py"
    init.write_text(f"import os\nimport sys\nif {condition}:\n"
                    f"    raise ImportError('celery-fleet test: this release cannot be imported')\n" + init.read_text())
    return source


def failed_upgrade_under_load(fleet, failing_host, release, source, playbook="upgrade.yml", arguments=(),
                              **extra_vars):
    """Upgrade to a release that fails on `failing_host`, under load. Checks what every failed upgrade
    must leave: the run failed, no host's release changed, no host but `failing_host` was touched,
    every node consumes again, no task was lost or run twice, capacity was kept.
    Returns (message on one line, full output, report, units before, start time, releases before)."""
    releases = fleet.releases()
    before = fleet.units()
    since = time.time()
    rc, output, report = fleet.roll_under_load(
        playbook, *arguments, "--extra-vars",
        json.dumps({"celery_worker_release": release, "celery_worker_app_source": str(source),
                    "celery_worker_rolling_start_timeout": 15, **extra_vars}))
    assert rc != 0, output[-4000:]
    # The new release was staged everywhere, but only the failing host was touched and it is back as it was.
    assert fleet.releases() == releases
    after = fleet.units()
    assert {name: units for name, units in after.items() if name != failing_host} == {
        name: units for name, units in before.items() if name != failing_host}, (
        f"a host other than {failing_host} changed")
    assert fleet.consuming() == fleet.nodes
    assert_every_task_ran_exactly_once(fleet, report)
    assert_capacity_kept(report)
    return " ".join(output.split()), output, report, before, since, releases


def test_a_deploy_of_a_release_that_fails_on_a_host_stops_there_and_takes_back_its_instances(fleet, tmp_path):
    """site.yml with a new release on a running fleet: it installs the release on every host, then changes
    running instances only through the roll's drain, warm stop, start and health check, canary first (gpu1 in
    this order). gpu1 runs two instances; the release imports on GPU 0 and not on GPU 1: the first instance
    upgrades, the second fails, and both must end on the old release (a host never runs two). No other host's
    release or process changed; nothing lost. (upgrade.yml rolls through the same plays, after its staging play:
    its success under load is the case above.)"""
    # gpu1 too: its roll and rescue run there.
    with fleetlab.ProcessSampler(hosts=("broker1", "web1", "gpu1")) as sampler:
        message, output, report, before, since, releases = failed_upgrade_under_load(
            fleet, "gpu1", GPU1_BROKEN_RELEASE, broken_copy(tmp_path, GPU1_CONDITION), playbook="site.yml",
            arguments=LOUD, celery_worker_rolling_order=["gpu", "web", "batch"])
    leaks = fleetlab.assert_no_secret_leaked(fleet.secret_markers, output, sampler)
    print(f"\nleak check (output, command lines, journals, world-readable files): {json.dumps(leaks)}")
    install = fleetload.task_results(output).get(
        "celery_worker : Install the application into the release virtualenv", "")
    assert all(f"changed: [{host}]" in install for host in fleet.host_groups), install[-2000:]
    assert ("Rolling upgrade failed on gpu1, instance gpu-2 (gpu-worker-2@gpu1), at step 'health check'" in message
            and "and so were the instances of the host already upgraded: gpu-1" in message), output[-4000:]
    assert "PLAY [Report which worker nodes are online" not in output
    after = fleet.units()
    assert all(after["gpu1"][unit] != pid for unit, pid in before["gpu1"].items()), (before["gpu1"], after["gpu1"])
    # gpu-worker-1 ran tasks on the new release for a while; now both GPU nodes run the old one.
    assert GPU1_BROKEN_RELEASE in report["ran_per_release"], report["ran_per_release"]
    running = fleet.releases_running()
    assert running == {node: set(releases.values()) for node in fleet.nodes}, running
    assert_warm_stops_only(since, {"gpu1": list(before["gpu1"])})
    assert_drained_before_stop(since, {"gpu1": before["gpu1"]}, report["records"])


def test_a_drain_that_times_out_leaves_the_node_running_and_consuming(fleet):
    """The drain deadline is prefetch_multiplier x time_limit + margin. Computed here from a 2 s limit
    (the running workers keep theirs), it passes while web1 still runs tasks of up to 5 s: the roll must
    stop at step 'drain', give web1 its queues back without ever stopping it, and lose nothing."""
    before = fleet.units()
    extra = json.dumps({"celery_worker_group_settings": {"time_limit": 2, "soft_time_limit": 1,
                                                         "prefetch_multiplier": 1},
                        "celery_worker_rolling_drain_margin": 0})
    # Tasks of 5-8 s keep web1 busy at its drain (with the default 0-5 s, web1 was once idle within 2 s and
    # drained in time, so the case failed on batch1 instead).
    rc, output, report = fleet.under_load(lambda load: fleet.run_playbook("rolling_restart.yml", "--extra-vars", extra),
                                          "rolling_restart.yml (drain timeout)", durations=(5.0, 8.0))
    assert rc != 0, output[-4000:]
    message = " ".join(output.split())
    assert ("Rolling restart failed on web1, instance web (web-worker@web1), at step 'drain': "
            "web-worker@web1 still had") in message and "after the drain timeout of 2 s" in message, output[-4000:]
    assert "put back on its previous release and is consuming again" in message
    assert fleet.units() == before, "a worker was stopped"
    assert fleet.consuming() == fleet.nodes
    assert_every_task_ran_exactly_once(fleet, report, minimum=50)  # a short run: about 30 s of load
    assert_capacity_kept(report)


def test_a_bigger_lab_rolls_batches_of_two_hosts_guards_them_and_a_failure_waits_for_its_batch(fleet):
    """Four web hosts (web3 and web4 from inventories/lab-scale, one slot each) and serial [1, '50%']: a canary,
    then web2 and web3 together, then web4.
    - The guard never counts a batch-mate: with celery_worker_rolling_min_online 3, the canary rolls (three others in
      service), and the second batch is refused, each host seeing only web1 and web4 (counting the other host of its
      batch would have made three).
    - A failure waits for its batch: with web3's node frozen (SIGSTOP) once the canary runs again, and min_online 2,
      web3's drain fails while web2, in the same batch, finishes its roll; the run then stops, and web4 is never
      touched. (Before the fix Ansible's any_errors_fatal failed web3 at web2's rescued guard failure, and web2's
      rescue never ran.)
    Under load, every task runs exactly once, and at most two web nodes are out of service at any time."""
    environment = {"CELERY_FLEET_LAB_WEB_HOSTS": "4"}
    inventories = fleetlab.ROLLING_INVENTORIES + [PROJECT / "inventories" / "lab-scale"]
    os.environ.update(environment)
    try:
        for playbook, args in (("lab_up.yml", ()), ("site.yml", ("--limit", "web3,web4"))):
            rc, output = fleetload.run_playbook(playbook, *args, inventory=[str(i) for i in inventories],
                                                project=PROJECT, timeout=900)
            assert rc == 0, output[-4000:]
        big = fleetlab.Fleet(inventories, rates=RATES, expected_nodes=fleetlab.EXPECTED_NODES + 2,
                             allowed_out={"web": 2, "batch": 1, "gpu": 1})
        serial = {"celery_worker_rolling_serial": [1, "50%"], "celery_worker_rolling_order": ["web"]}

        before = big.units()
        rc, output = big.run_playbook("rolling_restart.yml", "--limit", "web", "--extra-vars",
                                      json.dumps(serial | {"celery_worker_rolling_min_online": 3}))
        assert rc != 0, output[-4000:]
        message = " ".join(output.split())
        for host in ("web2", "web3"):
            assert (f"Rolling restart failed on {host}, instance web (web-worker@{host}), at step 'capacity guard': "
                    "Capacity guard: 2 other node(s) of group web are in service (web-worker@web1, web-worker@web4); "
                    "celery_worker_rolling_min_online needs 3.") in message, output[-4000:]
        after = big.units()
        assert after["web1"] != before["web1"], "the canary did not roll"
        assert {host: after[host] for host in ("web2", "web3", "web4")} == {
            host: before[host] for host in ("web2", "web3", "web4")}

        before = big.units()
        extra = json.dumps(serial | {"celery_worker_rolling_min_online": 2,
                                     # (The put-back of web3 waits this long for it to consume.)
                                     "celery_worker_rolling_start_timeout": 15})

        def on(host, *command):
            return subprocess.run(["docker", "exec", f"celery-fleet-lab-{host}", *command], capture_output=True,
                                  text=True, timeout=60, check=True).stdout.strip()

        def main_pid(host):
            return on(host, "systemctl", "show", "-p", "MainPID", "--value", "celery-worker@web.service")

        def signal_web3(name):
            on("web3", "systemctl", "kill", f"--signal={name}", "celery-worker@web.service")

        def frozen_web3_roll(load):
            # web3 is frozen once the canary (web1) runs again, before its own batch drains it, and thawed when
            # the run ends: frozen for less than the visibility timeout (60 s here), so that the tasks it holds
            # are never handed to a second worker (kombu's Redis transport redelivers an unacknowledged message
            # after it: a node frozen longer runs them twice once thawed).
            frozen = threading.Event()

            def freeze_after_canary():
                first = main_pid("web1")
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline and not finished.is_set():
                    if main_pid("web1") not in (first, "0"):
                        signal_web3("STOP")
                        frozen.set()
                        return
                    time.sleep(0.3)

            finished = threading.Event()
            watcher = threading.Thread(target=freeze_after_canary, daemon=True)
            watcher.start()
            try:
                return big.run_playbook("rolling_restart.yml", "--limit", "web", "--extra-vars", extra)
            finally:
                finished.set()
                watcher.join(30)
                signal_web3("CONT")
                assert frozen.is_set(), "web3 was never frozen: the canary did not restart"

        rc, output, report = big.under_load(frozen_web3_roll, "rolling_restart.yml (four web hosts, web3 frozen)")
        assert rc != 0, output[-4000:]
        message = " ".join(output.split())
        assert "Rolling restart failed on web3, instance web (web-worker@web3), at step 'drain'" in message, (
            output[-4000:])
        after = big.units()
        assert after["web1"] != before["web1"] and after["web2"] != before["web2"], "the batch did not finish"
        assert after["web3"] == before["web3"] and after["web4"] == before["web4"]
        assert report["max_out_of_service"]["web"] == 2, report["max_out_of_service"]
        assert big.consuming(timeout=60) and len(big.consuming()) == fleetlab.EXPECTED_NODES + 2
        fleetlab.assert_every_task_ran_exactly_once(big, report, minimum=50)
        fleetlab.assert_capacity_kept(report)
    finally:
        # The usual lab again: web3 and web4 stop warmly (what they hold goes back to the queues), then go.
        for host in ("web3", "web4"):
            subprocess.run(["docker", "exec", f"celery-fleet-lab-{host}", "systemctl", "stop", "celery-workers.target"],
                           capture_output=True, timeout=120)
            subprocess.run(["docker", "rm", "-f", "-v", f"celery-fleet-lab-{host}"], capture_output=True, timeout=60)
        for name in environment:
            os.environ.pop(name, None)


def test_a_surge_roll_never_lowers_capacity_and_a_failed_surge_touches_nothing(fleet):
    """rolling_mode surge on web and batch (batch is a one-node group): each instance's surge process starts and
    consumes before the instance is drained, and is drained and stopped once the instance consumes again.
    - Deploying the mode writes the surge unit and options and restarts no instance.
    - Under load, no node of any group is ever out of service without its surge process serving in its stead (the
      monitor's samples, every 0.25 s), every surge process served, every task runs exactly once, and no surge
      process is left running.
    - A surge process that does not consume its queues (its options changed on web1) fails the roll at step 'surge':
      nothing was drained or stopped, the surge process is stopped, the instance never restarted.
    - site.yml without the mode removes the surge unit and options, again restarting nothing."""
    settings = {"soft_time_limit": 40, "time_limit": 45}  # the scenario inventory's
    # The release the fleet runs now (an earlier case upgraded it): a site.yml naming another would roll to it.
    (release,) = set(fleet.releases().values())
    surge = json.dumps({"celery_worker_group_settings": settings | {"rolling_mode": "surge", "surge_memory": "1G"},
                        "celery_worker_rolling_order": ["web", "batch"], "celery_worker_release": release})
    surge_hosts = ("web1", "web2", "batch1")
    try:
        before = fleet.units()
        # For every host: gpu1's GPU group is refused before any host is changed.
        rc, output = fleet.run_playbook("site.yml", "--extra-vars", surge)
        assert rc != 0, output[-4000:]
        assert ("gpu1: celery_worker_group_settings.rolling_mode is surge, which runs a second process of an instance "
                "during its roll, on the same GPU(s)") in " ".join(output.split()), output[-4000:]
        assert "TASK [celery_worker : Write the environment file, the worker units" not in output, output[-4000:]
        # (The extra vars apply to every host: gpu1, whose GPU group preflight refuses surge, is left out.)
        rc, output = fleet.run_playbook("site.yml", "--limit", "web,batch", "--extra-vars", surge)
        assert rc == 0, output[-4000:]
        assert fleet.units() == before, "deploying surge mode restarted instances"
        for name in surge_hosts:
            host = fleetlab.lab_host(name)
            assert host.file("/etc/systemd/system/celery-worker-surge@.service").exists
            assert host.file(f"/etc/celery-fleet/surge/{'web' if name.startswith('web') else 'batch'}.env").contains(
                "-surge@")

        rc, output, report = fleet.under_load(
            lambda load: fleet.run_playbook("rolling_restart.yml", "--limit", "web,batch", "--extra-vars", surge),
            "rolling_restart.yml (surge mode, web and batch)", surge=True)
        assert rc == 0, output[-4000:]
        assert report["max_out_of_service_with_surge"] == {"web": 0, "batch": 0, "gpu": 0}, (
            report["max_out_of_service_with_surge"], report["worst_moment_with_surge"], report["marks"])
        assert report["surged_nodes"] == ["batch-worker@batch1", "web-worker@web1", "web-worker@web2"], report
        # The surge processes served: batch1's, at least, took the batch queue's tasks while batch1 rolled.
        assert report["ran_per_node"].get("batch-worker-surge@batch1", 0) > 0, report["ran_per_node"]
        after = fleet.units()
        for name in surge_hosts:
            assert after[name] != before[name], f"{name} did not roll"
            states = fleetlab.lab_host(name).run("systemctl is-active 'celery-worker-surge@*'").stdout.split()
            assert set(states) <= {"inactive", "failed"}, (name, states)
        assert fleet.consuming() == fleet.nodes
        assert_every_task_ran_exactly_once(fleet, report, minimum=50)

        web1 = fleetlab.lab_host("web1")
        # A surge process that runs but consumes only default: the health check fails, the rescue must stop it.
        web1.check_output("sed -i 's/--queues=default,priority/--queues=default/' /etc/celery-fleet/surge/web.env")
        before = fleet.units()
        rc, output = fleet.run_playbook("rolling_restart.yml", "--limit", "web", "--extra-vars",
                                        json.dumps(json.loads(surge) | {"celery_worker_rolling_start_timeout": 10}))
        assert rc != 0, output[-4000:]
        message = " ".join(output.split())
        assert ("Rolling restart failed on web1, instance web (web-worker@web1), at step 'surge': "
                "web-worker-surge@web1 did not consume exactly default,priority within celery_worker_rolling_start_timeout "
                "(10 s): it consumes default") in message, output[-4000:]
        assert "Nothing was drained or stopped. Its surge process was stopped." in message, output[-4000:]
        assert fleet.units() == before
        assert web1.run("systemctl is-active celery-worker-surge@web.service").stdout.strip() != "active"
        assert fleet.consuming() == fleet.nodes
    finally:
        rc, output = fleet.run_playbook("site.yml", "--extra-vars", json.dumps({"celery_worker_release": release}))
        assert rc == 0, output[-4000:]
    for name in surge_hosts:
        host = fleetlab.lab_host(name)
        assert not host.file("/etc/systemd/system/celery-worker-surge@.service").exists
        assert not host.file("/etc/celery-fleet/surge").exists
