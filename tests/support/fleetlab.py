"""The lab fleet as the Molecule scenarios that work under load see it (rolling, faults).

One Fleet per scenario: its inventory sources, the load it sends, and the checks every case shares:
every task ran exactly once, capacity kept, warm stops only, drained before stopped.
"""

import base64
import json
import os
import re
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import unquote, urlsplit

import testinfra

import fleetload

PROJECT = fleetload.PROJECT
LAB_INVENTORY = PROJECT / "inventories" / "lab"
# The rolling scenario's lab: the lab inventory, then its own source (a short visibility timeout).
ROLLING_INVENTORIES = [LAB_INVENTORY, PROJECT / "molecule" / "rolling" / "inventory"]
LAB_HOSTS = {"broker1", "web1", "web2", "batch1", "gpu1", "monitor1"}
# The lab runs web-worker@web1, @web2, batch-worker@batch1 and two GPU instances on gpu1.
EXPECTED_NODES = 5
# Lines that mean a task or a worker was killed, or a stop did not end warmly.
KILLED = re.compile(r"WorkerLostError|SIGKILL|status=9/KILL|code=killed|Cold shutdown|[Tt]imed out|"
                    r"Killing process|Failed with result '(timeout|signal|oom-kill)'")


def lab_host(name):
    """A testinfra host of the lab (connection variables come from the lab inventory; a host of the bigger lab,
    inventories/lab-scale, through its container)."""
    if name not in LAB_HOSTS:
        return testinfra.get_host(f"docker://celery-fleet-lab-{name}")
    return testinfra.get_host(f"ansible://{name}", ansible_inventory=str(LAB_INVENTORY))


class Fleet:
    """The deployed lab under a scenario's inventory sources, and the load its cases send.

    rates: {queue: tasks per second}; durations: (shortest, longest) seconds a task sleeps; task: the
    ledger task the load sends (args: seconds, token, ledger key), the example app's unless the lab runs another.
    """

    def __init__(self, inventories=(LAB_INVENTORY,), rates=None, durations=(0.0, 5.0), task=fleetload.LEDGER_TASK,
                 expected_nodes=EXPECTED_NODES, allowed_out=None):
        self.inventories = [str(source) for source in inventories]
        self.rates, self.durations, self.task = rates, durations, task
        self.expected_nodes = expected_nodes
        self.client = fleetload.lab_client(self.inventories, PROJECT)
        self.host_groups = fleetload.worker_groups(self.inventories, PROJECT)
        self.nodes = fleetload.discover_nodes(self.client, expected_nodes)
        self.secret_markers = secret_markers(self.client)
        self.node_groups = {node: self.host_groups[fleetload.node_host(node)] for node in self.nodes}
        # A batch of N hosts rolls their instances one after another: at most N nodes out at once. Worked out
        # by hand, not by the role's plan: the lab's groups have 2, 1 and 1 hosts, and serial [1, '25%']
        # makes batches of one host in each (25% of 2 rounds down to 0, and a batch has at least one host).
        self.allowed_out = allowed_out or {"web": 1, "batch": 1, "gpu": 1}
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

    def consuming(self, expected=None, timeout=30.0):
        return fleetload.discover_nodes(self.client, expected or self.expected_nodes, timeout=timeout)

    def run_playbook(self, playbook, *extra_args, timeout=1200):
        return fleetload.run_playbook(playbook, *extra_args, inventory=self.inventories, project=PROJECT,
                                      timeout=timeout)

    def kill_playbook_when(self, playbook, *extra_args, **options):
        return fleetload.kill_playbook_when(playbook, *extra_args, inventory=self.inventories, **options)

    def under_load(self, operation, label, warmup=4.0, cooldown=3.0, broker_faults=False, complete_timeout=180.0,
                   durations=None, rates=None, surge=False):
        """Run operation() -> (rc, output) while the producer sends tasks; return (rc, output, report)
        (report["records"]: the ledger). broker_faults: the broker goes away on purpose, so failed publishes
        (retried) and failed monitor samples are expected and reported instead of failing the case."""
        load = fleetload.Load(self.client, self.nodes, rates=rates or self.rates, durations=durations or self.durations,
                              task=self.task, surge=surge)
        load.start()
        time.sleep(warmup)
        load.mark("roll_start")
        rc, output = operation(load)
        load.mark("roll_end")
        time.sleep(cooldown)
        records = load.finish(complete_timeout=complete_timeout)
        assert not load.producer.errors, load.producer.errors
        if not broker_faults:
            assert not load.producer.send_failures, load.producer.send_failures[:5]
            assert not load.monitor.errors, load.monitor.errors[:5]
        report = fleetload.analyse(load.producer.sent, records, load.monitor.samples, self.node_groups, load.marks,
                                   self.allowed_out, load.starts)
        # Acknowledgements lost with a connection: these tasks run again after the visibility timeout.
        report["unacked_left"] = len(fleetload.unacked_tokens(self.client, load.ledger.key))
        queues = sorted({queue for queues in self.nodes.values() for queue in queues})
        report["lost_whereabouts"] = fleetload.whereabouts(self.client, load.ledger.key, report["lost_tokens"],
                                                           queues, load.starts)
        sent = {task["token"]: task for task in load.producer.sent}
        report["lost_queues"] = {token: sent[token]["queue"] for token in report["lost_tokens"]}
        report["lost_sent_at"] = {token: sent[token]["sent"] for token in report["lost_tokens"]}
        report["send_failures"] = len(load.producer.send_failures)
        report["monitor_errors"] = len(load.monitor.errors)
        report["monitor_retries"] = load.monitor.retries
        summary = {key: report[key] for key in ("sent", "completed", "lost", "duplicates", "started_again",
                                                "redelivered", "unknown", "unacked_left", "send_failures", "monitor_errors",
                                                "lost_whereabouts", "monitor_retries",
                                                "sent_per_queue", "ran_per_node", "ran_per_release",
                                                "max_out_of_service", "allowed_out_of_service", "samples",
                                                "slow_replies")}
        summary["roll_seconds"] = round(load.marks["roll_end"] - load.marks["roll_start"], 1)
        summary["complete_seconds"] = round(load.marks["complete"] - load.marks["load_stop"], 1)
        print(f"{label}: {json.dumps(summary, sort_keys=True)}")
        report["records"] = records
        report["marks"] = dict(load.marks)
        return rc, output, report

    def roll_under_load(self, playbook, *extra_args):
        """Run a playbook under load; return (rc, output, report)."""
        return self.under_load(lambda load: self.run_playbook(playbook, *extra_args),
                               f"{playbook} {' '.join(extra_args)}")

    def releases_running(self, timeout=60):
        """{node: releases its tasks ran on}, under load until every node has run at least one task."""
        load = fleetload.Load(self.client, self.nodes, rates=self.rates, durations=(0.0, 1.0), task=self.task)
        load.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and {r["node"] for r in load.ledger.records()} != set(self.nodes):
            time.sleep(1)
        seen = {}
        for record in load.finish():
            seen.setdefault(record["node"], set()).add(record["release"])
        return seen


def assert_every_task_ran_exactly_once(fleet, report, minimum=100, duplicates_allowed=0, lost_allowed=0,
                                       in_flight_to=(), sent_before=float("inf")):
    """lost_allowed: tasks a fault may lose in the Redis transport's delivery window, and only those: sent to one
    of `in_flight_to` (the queues of the node the fault hit) before `sent_before` (the fault's end), never started,
    in no queue and not unacknowledged (see fleetload.whereabouts). Each BRPOP connection of that node can lose
    at most one."""
    assert report["sent"] >= minimum, f"the producer sent only {report['sent']} tasks"
    assert set(report["sent_per_queue"]) == {"default", "priority", "batch", "ml"}, report["sent_per_queue"]
    counts = (report["lost"], report["duplicates"], report["started_again"], report["unknown"])
    in_window = [token for token in report["lost_tokens"]
                 if report["lost_whereabouts"][token] == "nowhere" and report["lost_queues"][token] in in_flight_to
                 and report["lost_sent_at"][token] <= sent_before]
    assert (report["lost"] == len(in_window) <= lost_allowed and report["unknown"] == 0
            and max(counts[1:3]) <= duplicates_allowed), (
        f"{report['lost']} task(s) lost {report['lost_whereabouts']} (queues {report['lost_queues']}), "
        f"{report['duplicates']} run twice {report['duplicated_tokens']}, {report['started_again']} started again "
        f"{report['started_again_tokens']}, {report['unknown']} unknown, of {report['sent']} sent")
    if in_window:
        print(f"lost in the transport's delivery window (BRPOP before the unacked write, kombu#305): {in_window}")


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


def assert_warm_stops_only(since, stopped_units):
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


def assert_drained_before_stop(since, stopped_units, records):
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


# --- celery beat: the example app's tick (CELERY_FLEET_APP_TICK_SECONDS, inventories/lab) -----------------
BEAT_TICK = 2.0


def beat_ticks_since(broker, since, key="sent"):
    """The example app's tick records (beat:ticks:sent, written by beat as it sends; :ran, by the worker)."""
    records = [json.loads(record) for record in broker.lrange(f"beat:ticks:{key}", 0, -1)]
    return sorted((record for record in records if record["at"] >= since), key=lambda record: record["at"])


def assert_beat_ticked_through_a_restart(broker, since, period=BEAT_TICK):
    """Beat was restarted once since `since` (two sending processes), sent no tick twice (two sends closer
    than half the period) and skipped none at once: the tick due while it was stopped came when it was back
    (longest gap under three periods). Returns the numbers, for the report."""
    sent = beat_ticks_since(broker, since - period)
    times = [tick["at"] for tick in sent]
    gaps = [later - earlier for earlier, later in zip(times, times[1:])]
    processes = {(tick["host"], tick["pid"]) for tick in sent}
    assert len(processes) == 2, f"beat should have been restarted once: senders {sorted(processes)}"
    assert min(gaps) > period / 2, f"a tick was sent twice: gaps {gaps}"
    assert max(gaps) < 3 * period, f"ticks were skipped: gaps {gaps}"
    ran = {tick["id"] for tick in beat_ticks_since(broker, since - period, "ran")}
    missing = [tick["id"] for tick in sent[:-2] if tick["id"] not in ran]
    assert not missing, f"sent ticks that never ran: {missing}"
    return {"ticks": len(sent), "span_s": round(times[-1] - times[0], 1), "longest_gap_s": round(max(gaps), 2),
            "shortest_gap_s": round(min(gaps), 2), "period_s": period}


# --- Secrets: a run watched for the broker's passwords -------------------------------------------------------


def secret_markers(client):
    """What would betray the broker's passwords (the clients' from the client's URL, the admin's) in any
    encoding: each password's runs of 8 or more letters and digits (unchanged in a URL's percent-encoding,
    JSON, shell quoting and Python reprs)."""
    secrets = {unquote(urlsplit(client.broker_url).password), client.admin[1]}
    return sorted({run for secret in secrets for run in re.findall(r"[A-Za-z0-9]{8,}", secret)})


class ProcessSampler:
    """Samples `ps -eo args` on lab hosts (docker exec, from the controller) until stopped: every command line
    that ran long enough to be seen while a playbook ran."""

    def __init__(self, hosts=("broker1", "web1"), interval=0.2):
        self.hosts, self.interval = hosts, interval
        self.samples = {host: 0 for host in hosts}
        self.lines = set()
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._halt.is_set():
            for host in self.hosts:
                result = subprocess.run(["docker", "exec", f"celery-fleet-lab-{host}", "ps", "-eo", "args"],
                                        capture_output=True, text=True, check=False)
                if result.returncode == 0:
                    self.samples[host] += 1
                    self.lines.update(f"{host}: {line}" for line in result.stdout.splitlines())
            self._halt.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *_):
        self._halt.set()
        self._thread.join(30)


def assert_no_secret_leaked(markers, output, sampler, hosts=("broker1", "web1", "web2", "batch1", "gpu1")):
    """No marker in the playbook's output, in any sampled command line, in any host's journal or in any
    world-readable file of any host. Returns the counts, for the report."""
    found = {"output": [marker for marker in markers if marker in output],
             "ps": sorted(line for line in sampler.lines if any(marker in line for marker in markers))}
    pattern = " ".join(f"-e '{marker}'" for marker in markers)

    def scan(name):
        host = lab_host(name)
        journal = host.run(f"journalctl --no-pager -o cat | grep -F {pattern}")
        files = host.run(f"find / -xdev \\( -path /proc -o -path /sys \\) -prune -o -type f -perm -004 -size -20M "
                         f"-print0 | xargs -0 grep -lF {pattern}")
        return {f"{name} journal": journal.stdout.splitlines()[:5],
                f"{name} world-readable files": files.stdout.splitlines()}

    with ThreadPoolExecutor(max_workers=max(len(hosts), 1)) as pool:
        for result in pool.map(scan, hosts):
            found.update(result)
    leaks = {where: what for where, what in found.items() if what}
    assert not leaks, f"broker passwords leaked: {leaks}"
    # The control: the markers do match the password where it must be (percent-encoded in a 0640 file).
    if hosts:
        assert lab_host("web1").run(f"grep -qF {pattern} /etc/celery-fleet/celery.env").rc == 0
    return {"output_bytes": len(output), "ps_samples": dict(sampler.samples), "ps_lines": len(sampler.lines),
            "hosts_scanned": len(hosts)}


# --- The monitor host (celery_monitor) -----------------------------------------------------------------------------
MONITOR = "monitor1"
EXPORTER = "http://127.0.0.1:9808/metrics"
PROMETHEUS = "http://127.0.0.1:9090"


def monitor_get(url, timeout=10):
    """GET a URL from monitor1 with its system Python (its services listen on loopback): (status, body)."""
    code = f"""
import json, urllib.error, urllib.request
try:
    with urllib.request.urlopen({url!r}, timeout={timeout}) as response:
        print(json.dumps([response.status, response.read().decode()]))
except urllib.error.HTTPError as error:
    print(json.dumps([error.code, error.read().decode(errors="replace")]))
"""
    encoded = base64.b64encode(code.encode()).decode()
    result = lab_host(MONITOR).run(f"python3 -c \"import base64; exec(base64.b64decode('{encoded}'))\"")
    assert result.rc == 0, result.stderr
    status, body = json.loads(result.stdout.strip().splitlines()[-1])
    return status, body


def exporter_samples():
    """{(name, frozenset(labels)): value} of the fleet exporter's last refresh, parsed as Prometheus parses it."""
    from prometheus_client.parser import text_string_to_metric_families

    status, body = monitor_get(EXPORTER)
    assert status == 200, body
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(body) for sample in family.samples}


def promql(query):
    """An instant PromQL query against monitor1's Prometheus, over its HTTP API: [(labels, value)]."""
    from urllib.parse import urlencode

    status, body = monitor_get(f"{PROMETHEUS}/api/v1/query?{urlencode({'query': query})}")
    assert status == 200, body
    answer = json.loads(body)
    assert answer["status"] == "success", answer
    return [(item["metric"], float(item["value"][1])) for item in answer["data"]["result"]]


def wait_for(check, seconds, what):
    """check() until it returns a true value or `seconds` pass; the last value, asserted true."""
    deadline = time.monotonic() + seconds
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            assert value, f"{what}: not within {seconds} s"
            return value
        time.sleep(1)
