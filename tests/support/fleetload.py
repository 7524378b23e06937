"""Load, ledger and in-service monitor for a Celery fleet under a rolling operation.

Shared by the rolling Molecule scenario (molecule/rolling), the fleet scenario's playbook runs and the
benchmark (benchmarks/bench_rolling.py); runs on the controller and talks to the broker directly.
Imported through pytest's pythonpath (pytest.ini); `./fleet bench` sets PYTHONPATH for the benchmark.

- Producer sends `ledger_task(seconds, token, ledger)` tasks of random duration to the fleet's queues,
  either at a fixed rate per queue (open loop) or topping each queue up to a backlog (saturation).
- Each task appends one record to a Redis list (the ledger) when its body has run: a token without a
  record was lost, a token with two records ran twice.
- Monitor asks every node which queues it consumes several times a second: a node is in service when
  it answers and consumes all of its queues. A drained or stopped node is out of service.
- analyse() turns the three into counts, out-of-service windows and throughput.
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import subprocess
import threading
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import redis
import yaml
from celery import Celery

import celery_fleet

PROJECT = Path(__file__).resolve().parents[2]
# The worker role's defaults: the one place for the profiles, the roll's order and its serial.
ROLE_DEFAULTS = yaml.safe_load((PROJECT / "roles" / "celery_worker" / "defaults" / "main.yml").read_text())
ROLE_DEFAULTS_BROKER = yaml.safe_load((PROJECT / "roles" / "celery_broker" / "defaults" / "main.yml").read_text())
LEDGER_TASK = "celery_fleet_app.tasks.ledger_task"


# --- The lab ------------------------------------------------------------------------------------


def ansible_env(project: Path = PROJECT) -> dict:
    """Environment for ansible commands: the project's config, no colour, and the lab's vault password
    unless another one is set."""
    env = dict(os.environ, ANSIBLE_CONFIG=str(project / "ansible.cfg"), ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0")
    # LAB ONLY: the lab's vault password is public.
    env.setdefault("ANSIBLE_VAULT_PASSWORD_FILE", str(project / "inventories" / "lab" / "lab-vault-password.txt"))
    return env


def inventory_args(inventory) -> list[str]:
    """-i arguments for one inventory source, or a list of them (later sources override earlier ones)."""
    sources = inventory if isinstance(inventory, (list, tuple)) else [inventory]
    return [argument for source in sources for argument in ("-i", str(source))]


def inventory_list(inventory, project: Path = PROJECT) -> dict:
    """`ansible-inventory --list` of an inventory (or a list of sources), vault decrypted."""
    result = subprocess.run(["ansible-inventory", *inventory_args(inventory), "--list"], capture_output=True,
                            text=True, check=True, env=ansible_env(project))
    return json.loads(result.stdout)


def run_playbook(playbook: str, *extra_args: str, inventory: str | Path, project: Path = PROJECT,
                 timeout: float | None = None) -> tuple[int, str]:
    """Run playbooks/<playbook>; return its exit status and its output (stdout then stderr, no colour codes)."""
    run = subprocess.run(["ansible-playbook", *inventory_args(inventory), str(project / "playbooks" / playbook),
                          *extra_args], capture_output=True, text=True, env=ansible_env(project), cwd=project,
                         timeout=timeout)
    return run.returncode, re.sub(r"\x1b\[[0-9;]*m", "", run.stdout + run.stderr)


def manifest_objects(directory: Path) -> dict:
    """{"Kind/name": (file name, object)} of every YAML document in a directory of rendered manifests."""
    import yaml

    found = {}
    for path in sorted(Path(directory).glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document:
                found[f"{document['kind']}/{document['metadata']['name']}"] = (path.name, document)
    return found


RECAP = re.compile(r"^(\S+)\s+: ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.MULTILINE)


def kill_playbook_when(playbook: str, *extra_args: str, inventory: str | Path, marker: str, occurrence: int = 1,
                       project: Path = PROJECT, timeout: float = 600, after: float = 0.0) -> str:
    """Run playbooks/<playbook> and SIGKILL it (its whole process group, forks included, as a lost SSH
    session or an OOM kill would) `after` seconds after `marker` appears in its output for the
    `occurrence`-th time. Returns the output up to then. AssertionError when the run ends, or the timeout
    passes, before that."""
    import signal
    import tempfile

    with tempfile.TemporaryFile(mode="w+") as log:
        process = subprocess.Popen(["ansible-playbook", *inventory_args(inventory),
                                    str(project / "playbooks" / playbook),
                                    *extra_args], stdout=log, stderr=subprocess.STDOUT, env=ansible_env(project),
                                   cwd=project, start_new_session=True)
        deadline = time.monotonic() + timeout
        try:
            while True:
                log.seek(0)
                output = log.read()
                if output.count(marker) >= occurrence:
                    break
                if process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"{marker!r} never appeared (rc {process.poll()}):\n{output[-3000:]}")
                time.sleep(0.1)
            time.sleep(after)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(30)
        log.seek(0)
        return re.sub(r"\x1b\[[0-9;]*m", "", log.read())


def run_playbook_acting(playbook: str, *extra_args: str, inventory, marker: str, act, watch=(),
                        project: Path = PROJECT, timeout: float = 1200) -> tuple[int, str, dict]:
    """Run playbooks/<playbook> and call act() once `marker` appears in its output (a fault provoked at a
    known step, while the run goes on). Returns (exit status, output, {"marker", "acted", "ended", and each
    string of `watch` that appeared after the marker: when it first did}: epoch seconds). AssertionError
    when the run ends before the marker."""
    import tempfile

    times = {}
    with tempfile.TemporaryFile(mode="w+") as log:
        process = subprocess.Popen(["ansible-playbook", *inventory_args(inventory),
                                    str(project / "playbooks" / playbook), *extra_args], stdout=log,
                                   stderr=subprocess.STDOUT, env=ansible_env(project), cwd=project)
        deadline = time.monotonic() + timeout
        try:
            while "acted" not in times:
                log.seek(0)
                if marker in log.read():
                    times["marker"] = time.time()
                    act()
                    times["acted"] = time.time()
                elif process.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise AssertionError(f"{marker!r} never appeared (rc {process.poll()}):\n{log.read()[-3000:]}")
                else:
                    time.sleep(0.1)
            while process.poll() is None and time.monotonic() < deadline:
                log.seek(0)
                output = log.read()
                for text in watch:
                    if text not in times and text in output:
                        times[text] = time.time()
                time.sleep(0.1)
            process.wait(max(1.0, deadline - time.monotonic()))
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(30)
        times["ended"] = time.time()
        log.seek(0)
        output = log.read()
        for text in watch:
            times.setdefault(text, times["ended"] if text in output else None)
        return process.returncode, re.sub(r"\x1b\[[0-9;]*m", "", output), times


def _ledger_token(message: dict, ledger_key: str) -> str | None:
    """The token of a kombu message (a dict with its base64 `body`) if it is one of this ledger's tasks: the body
    is Celery's protocol 2 [args, kwargs, embed], and a ledger task's args are [seconds, token, ledger key]."""
    try:
        args = json.loads(base64.b64decode(message["body"]))[0]
    except (ValueError, KeyError, TypeError, IndexError):
        return None
    return args[1] if isinstance(args, list) and len(args) == 3 and args[2] == ledger_key else None


def unacked_tokens(client: FleetClient, ledger_key: str) -> list[str]:
    """Tokens of the ledger's tasks still in kombu's `unacked` hash: delivered, never acknowledged (their
    acknowledgement was lost with a connection). Redis gives them out again once the visibility timeout
    has passed: each is a run still to come."""
    tokens = []
    # Each value is kombu's [message, exchange, routing key].
    for raw in client.redis(admin=True).hvals("unacked"):  # HVALS: the admin's, not the clients'
        try:
            token = _ledger_token(json.loads(raw)[0], ledger_key)
        except (ValueError, TypeError, IndexError, KeyError):
            continue
        if token is not None:
            tokens.append(token)
    return sorted(tokens)


def queued_tokens(client: FleetClient, ledger_key: str, queues) -> dict:
    """{token: list name} of the ledger's tasks still waiting in a queue: every priority sub-list of each of
    `queues`, named as the transport names them."""
    found = {}
    broker = client.redis(admin=True)
    app = client.app("fleetload-queued")
    try:
        with app.connection_for_read() as connection:
            channel = connection.default_channel
            names = [channel._q_for_pri(queue, step) for queue in queues for step in channel.priority_steps]
    finally:
        app.close()
    for name in names:
        for raw in broker.lrange(name, 0, -1):  # each entry is a kombu message
            try:
                token = _ledger_token(json.loads(raw), ledger_key)
            except ValueError:
                continue
            if token is not None:
                found[token] = name.encode("unicode_escape").decode()
    return found


def whereabouts(client: FleetClient, ledger_key: str, lost: list[str], queues, starts: Counter) -> dict:
    """Where each lost task is: "unacked" (delivered, waiting for a restore sweep), "queued:<list>" (never
    consumed), "started N times" (ran and its record never came), or "nowhere": never started and gone from
    the broker, which only the Redis transport's delivery window explains (BRPOP removes the message on the
    server; the consumer writes it to the unacked hash afterwards, so a consumer that dies or is cut off in
    between loses it: kombu#305, celery#7950)."""
    unacked = set(unacked_tokens(client, ledger_key))
    queued = queued_tokens(client, ledger_key, queues)
    places = {}
    for token in lost:
        if token in unacked:
            places[token] = "unacked"
        elif token in queued:
            places[token] = f"queued:{queued[token]}"
        elif starts.get(token):
            places[token] = f"started {starts[token]} times"
        else:
            places[token] = "nowhere"
    return places


def recap(output: str) -> dict:
    """{host: {"ok", "changed", "unreachable", "failed"}} from a playbook's PLAY RECAP (the last one a host has)."""
    return {host: dict(zip(("ok", "changed", "unreachable", "failed"), map(int, counts)))
            for host, *counts in RECAP.findall(output)}


def task_results(output: str) -> dict:
    """{task name: the lines a playbook printed for it} (the last run of each task name), e.g.
    task_results(out)["celery_broker : Install Redis from Debian's packages"] holds "changed: [broker1]"."""
    tasks = {}
    for block in output.split("\nTASK [")[1:]:
        name, _, rest = block.partition("]")
        tasks[name] = rest
    return tasks


@dataclass
class FleetClient:
    """How a client reaches the fleet: broker and result URLs, and the fleet's transport options (the
    visibility timeout above all: a client with kombu's default would hand long tasks to a second worker)."""

    broker_url: str
    result_url: str
    transport_options: dict = field(default_factory=dict)
    # The broker's admin user (Redis ACL), for what the clients' user may not run (INFO, CONFIG).
    admin: tuple[str, str] | None = None

    def app(self, name: str) -> Celery:
        return Celery(name, broker=self.broker_url, set_as_current=False,
                      broker_transport_options=dict(self.transport_options))

    def redis(self, url: str | None = None, admin: bool = False) -> redis.Redis:
        timeout = self.transport_options.get("socket_timeout")
        url = url or self.broker_url
        if admin:  # the URL's credentials win over from_url's keywords: put the admin's in the URL
            user, password = (quote(value, safe="") for value in self.admin)
            parts = urlsplit(url)
            url = urlunsplit(parts._replace(netloc=f"{user}:{password}@{parts.netloc.rpartition('@')[2]}"))
        return redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)


def env_file(container: str, path: str = "/etc/celery-fleet/celery.env") -> dict:
    """The variables of an env file on a lab host (VAR="value" or VAR='value' lines)."""
    text = subprocess.run(["docker", "exec", container, "cat", path], capture_output=True, text=True,
                          check=True).stdout
    variables = {}
    for line in text.splitlines():
        name, equals, value = line.partition("=")
        if equals and not name.startswith("#"):
            variables[name.strip()] = value.strip().strip("'\"")
    return variables


def lab_client(inventory: str | Path = PROJECT / "inventories" / "lab", project: Path = PROJECT) -> FleetClient:
    """The lab's broker, reachable from the controller, with the transport options its workers use: read
    from a worker's env file, the one place the role writes them.

    The lab's hosts are containers: their names resolve only on the lab network, so the broker's
    container address is asked from Docker. With TLS, the CA the workers check the broker against is copied
    from the worker to the controller, and the URLs point to that copy (the address is in the certificate).
    """
    listing = inventory_list(inventory, project)
    broker = listing["broker"]["hosts"][0]
    hostvars = listing["_meta"]["hostvars"][broker]
    container = hostvars.get("ansible_host", broker)
    address = subprocess.run(
        ["docker", "inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}", container],
        capture_output=True, text=True, check=True).stdout.split()[0]
    worker_host = next(iter(worker_groups(inventory, project)))
    worker_container = listing["_meta"]["hostvars"][worker_host].get("ansible_host", worker_host)
    environment = env_file(worker_container)
    options = json.loads(environment["CELERY_BROKER_TRANSPORT_OPTIONS"])
    # The workers' URLs, with the broker's name (resolved on the lab network only) replaced by its address.
    urls = [urlsplit(environment[name]) for name in ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND")]
    query = dict(parse_qsl(urls[0].query))
    if "ssl_ca_certs" in query:
        ca_copy = Path(os.environ.get("TMPDIR", "/tmp")) / f"celery-fleet-lab-broker-ca-{container}.crt"
        ca_copy.write_text(subprocess.run(["docker", "exec", worker_container, "cat", query["ssl_ca_certs"]],
                                          capture_output=True, text=True, check=True).stdout)
        query["ssl_ca_certs"] = str(ca_copy)
    broker_url, result_url = (
        urlunsplit(url._replace(netloc=url.netloc.rpartition("@")[0] + f"@{address}:{url.port}",
                                query=urlencode(query, quote_via=quote) if query else "")) for url in urls)
    admin = (ROLE_DEFAULTS_BROKER["celery_broker_admin_user"], hostvars["vault_celery_broker_admin_password"])
    return FleetClient(broker_url, result_url, options, admin)


def worker_groups(inventory: str | Path = PROJECT / "inventories" / "lab", project: Path = PROJECT) -> dict:
    """{host: group} of the worker hosts: the group of each host that has a worker profile."""
    listing = inventory_list(inventory, project)
    hosts = {}
    for group in ROLE_DEFAULTS["celery_worker_profiles"]:
        for host in listing.get(group, {}).get("hosts", []):
            hosts.setdefault(host, group)
    return hosts


def allowed_out_of_service(host_groups: dict, order=None, serial=None) -> dict:
    """{group: most hosts of the group a roll takes out at once}, from the role's own plan of the roll
    (celery_fleet.rolling_plan) for `order` and `serial` (default: the role's)."""
    order = order or ROLE_DEFAULTS["celery_worker_rolling_order"]
    serial = serial or ROLE_DEFAULTS["celery_worker_rolling_serial"]
    groups = {}
    for host, group in host_groups.items():
        groups.setdefault(group, []).append(host)
    plan = celery_fleet.rolling_plan([group for group in order if group in groups], serial, groups, list(host_groups))
    assert not plan["errors"], plan["errors"]
    allowed, position = {}, 0
    for size in plan["batches"]:
        for host in plan["hosts"][position:position + size]:
            allowed[host_groups[host]] = max(allowed.get(host_groups[host], 0), size)
        position += size
    return allowed


def node_host(node: str) -> str:
    """web-worker@web1 -> web1 (the short host name of a node)."""
    return node.split("@", 1)[1].split(".", 1)[0]


# --- Ledger ---------------------------------------------------------------------------------------


class Ledger:
    """The Redis list the ledger tasks append to, one JSON record per execution."""

    def __init__(self, client: FleetClient, key: str | None = None):
        self.key = key or f"celery-fleet:ledger:{uuid.uuid4().hex[:12]}"
        # Where the ledger tasks write it: the queue instance, which never evicts.
        self.client = client.redis(client.broker_url)

    def records(self) -> list[dict]:
        return [json.loads(raw) for raw in self.client.lrange(self.key, 0, -1)]

    def tokens(self) -> Counter:
        return Counter(record["token"] for record in self.records())

    def starts(self) -> Counter:
        """How many times each task started (its body began to run)."""
        return Counter(raw.decode() for raw in self.client.lrange(f"{self.key}:started", 0, -1))

    def delete(self):
        self.client.delete(self.key, f"{self.key}:started")


# --- Producer -------------------------------------------------------------------------------------


class Producer(threading.Thread):
    """Sends ledger tasks of uniformly random duration to each queue until stop() is called.

    rates:   {queue: tasks per second}, sent at random (exponential) intervals; or
    backlog: {queue: messages}: keeps each queue's Redis list at least this long (saturation).
    """

    def __init__(self, client: FleetClient, ledger: Ledger, rates: dict | None = None, backlog: dict | None = None,
                 durations=(0.0, 5.0), seed: int = 4, task: str = LEDGER_TASK):
        super().__init__(name="fleetload-producer", daemon=True)
        if bool(rates) == bool(backlog):
            raise ValueError("give either rates or backlog")
        self.app = client.app("fleetload-producer")
        self.broker = client.redis()
        self.ledger = ledger
        self.rates, self.backlog = rates or {}, backlog or {}
        self.durations, self.task = durations, task
        self.random = random.Random(seed)
        self.sent: list[dict] = []
        self.errors: list[str] = []
        self.send_failures: list[str] = []
        self._halt = threading.Event()
        self._run_id = uuid.uuid4().hex[:8]

    def _send(self, queue: str):
        seconds = round(self.random.uniform(*self.durations), 3)
        token = f"{self._run_id}-{len(self.sent)}"
        # As a client of a fleet whose broker restarts would: a publish that fails (after Celery's own
        # retries) is tried again until it succeeds. It is counted as sent once it succeeded; a failed
        # publish that reached Redis all the same would show up as an unknown token.
        while True:
            try:
                self.app.send_task(self.task, args=[seconds, token, self.ledger.key], queue=queue)
                break
            # AttributeError: kombu 5.7.0 tearing down a connection the broker dropped ('NoneType' object
            # has no attribute 'client'), the client-side face of the bug in README "Failure modes".
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
                    redis.exceptions.BusyLoadingError, OSError, AttributeError) as error:
                self.send_failures.append(f"{time.time():.1f} {type(error).__name__}: {error}")
                if self._halt.wait(0.5):
                    return
        self.sent.append({"token": token, "queue": queue, "seconds": seconds, "sent": time.time()})

    def run(self):
        try:
            if self.rates:
                due = {queue: time.monotonic() + self.random.expovariate(rate) for queue, rate in self.rates.items()}
                while not self._halt.is_set():
                    queue = min(due, key=due.get)
                    self._halt.wait(max(0.0, due[queue] - time.monotonic()))
                    if self._halt.is_set():
                        break
                    self._send(queue)
                    due[queue] += self.random.expovariate(self.rates[queue])
            else:
                while not self._halt.is_set():
                    for queue, depth in self.backlog.items():
                        for _ in range(max(0, depth - self.broker.llen(queue))):
                            self._send(queue)
                    self._halt.wait(0.1)
        except Exception as error:  # noqa: BLE001 - reported by the caller, which fails on it
            self.errors.append(f"{type(error).__name__}: {error}")

    def stop(self):
        self._halt.set()
        self.join(30)
        self.app.close()


# --- Monitor --------------------------------------------------------------------------------------


class Monitor(threading.Thread):
    """Samples which nodes are in service (answer, and consume all of their queues) and queue depths."""

    def __init__(self, client: FleetClient, nodes: dict, interval: float = 0.25, timeout: float = 0.5,
                 surge: bool = False):
        super().__init__(name="fleetload-monitor", daemon=True)
        # rolling_mode surge: more nodes than `nodes` may answer (their surge processes), so each sample waits for
        # every reply (its timeout) instead of stopping at len(nodes) replies, which could leave a surge's out.
        self.surge = surge
        self.app = client.app("fleetload-monitor")
        self.broker = client.redis()
        self.nodes = {node: set(queues) for node, queues in nodes.items()}
        self.queues = sorted(set().union(*self.nodes.values()))
        self.interval, self.timeout = interval, timeout
        self.samples: list[dict] = []
        self.errors: list[str] = []
        self.retries: list[str] = []
        self._halt = threading.Event()

    def _consumed(self, destination=None, timeout=None, limit=None) -> dict:
        inspector = self.app.control.inspect(destination=destination, timeout=timeout or self.timeout, limit=limit)
        return {node: {queue["name"] for queue in reply} for node, reply in (inspector.active_queues() or {}).items()}

    def sample(self) -> dict:
        at = time.time()
        consumed = self._consumed(limit=None if self.surge else len(self.nodes))
        # A node that did not answer this time is asked again, alone and with more patience: a slow reply
        # (a node just back, on a busy host) must not pass for an outage. In surge mode, so is the surge process
        # of a node not in service (one just started answers late too).
        late = [node for node in self.nodes if node not in consumed]
        if self.surge:
            late += [celery_fleet.surge_node_name(node) for node, queues in self.nodes.items()
                     if consumed.get(node) != queues and consumed.get(celery_fleet.surge_node_name(node)) != queues]
        if late:
            consumed.update(self._consumed(destination=late, timeout=max(1.5, 3 * self.timeout)))
        # True: consumes all of its queues; False: answered without them (drained, its consumer restarting);
        # None: answered neither ask (stopped, frozen, or only slow: analyse() tells them apart, resolve_silences).
        in_service = {node: (consumed[node] == queues) if node in consumed else None
                      for node, queues in self.nodes.items()}
        # rolling_mode surge: the node's surge process, in service in its stead while the node rolls.
        surge = {node: consumed.get(celery_fleet.surge_node_name(node)) == queues
                 for node, queues in self.nodes.items()}
        depth = {queue: self.broker.llen(queue) for queue in self.queues}
        answers = {node: sorted(consumed[node]) for node, up in in_service.items() if up is False}
        return {"t": at, "in_service": in_service, "surge_in_service": surge, "depth": depth, "answers": answers}

    def run(self):
        while not self._halt.is_set():
            started = time.monotonic()
            try:
                self.samples.append(self.sample())
            except Exception as first:  # noqa: BLE001 - a broker hiccup is recorded, the monitor goes on
                # One dropped connection of the monitor's own (its pool reconnects) is tried again at once and
                # counted; a second failure in a row is an error. Message text kept: redis-py 8's repr drops it.
                self.retries.append(f"{type(first).__name__}: {first}")
                try:
                    self.samples.append(self.sample())
                except Exception as error:  # noqa: BLE001
                    self.errors.append(f"{type(error).__name__}: {error}")
            self._halt.wait(max(0.0, self.interval - (time.monotonic() - started)))

    def stop(self):
        self._halt.set()
        self.join(30)
        self.app.close()


def discover_nodes(client: FleetClient, expected: int | None = None, timeout: float = 30.0, hosts=None,
                   consuming: bool = True) -> dict:
    """{node: [queues]} of the online, consuming nodes (consuming=False: of the online ones, consuming or not).

    expected: wait until that many answer. None: collect every reply for 2 s (no early return), until
    each of `hosts` runs at least one node. AssertionError when the timeout passes first.
    """
    app = client.app("fleetload-discover")
    try:
        deadline = time.monotonic() + timeout
        replies = {}
        errors = []
        while time.monotonic() < deadline:
            try:
                if expected:
                    replies = app.control.inspect(timeout=1.0, limit=expected).active_queues() or {}
                    done = len(replies) >= expected
                else:
                    replies = app.control.inspect(timeout=2.0).active_queues() or {}
                    done = bool(replies) and set(hosts or []) <= {node_host(node) for node in replies}
            except (redis.exceptions.ConnectionError, redis.exceptions.BusyLoadingError, OSError) as error:
                # A broker (re)starting: wait for it, as the nodes do.
                errors.append(f"{type(error).__name__}: {error}")
                time.sleep(1)
                continue
            if done and (all(replies.values()) or not consuming):
                return {node: sorted(q["name"] for q in queues) for node, queues in replies.items()}
        raise AssertionError(f"expected {expected or hosts} consuming, got {sorted(replies)} (errors: {errors[-3:]})")
    finally:
        app.close()


# --- A run under load -----------------------------------------------------------------------------


class Load:
    """Producer + monitor + ledger around an operation: start(), run the operation, finish()."""

    def __init__(self, client: FleetClient, nodes: dict, rates=None, backlog=None, seed: int = 4,
                 monitor_interval: float = 0.25, durations=(0.0, 5.0), task: str = LEDGER_TASK, surge: bool = False):
        self.ledger = Ledger(client)
        self.producer = Producer(client, self.ledger, rates=rates, backlog=backlog, seed=seed, durations=durations,
                                 task=task)
        self.monitor = Monitor(client, nodes, interval=monitor_interval, surge=surge)
        self.nodes = nodes
        self.marks: dict[str, float] = {}
        self.starts: Counter = Counter()

    def mark(self, name: str):
        self.marks[name] = time.time()

    def start(self):
        self.mark("load_start")
        self.monitor.start()
        self.producer.start()

    def finish(self, complete_timeout: float = 180.0, settle: float = 3.0) -> list[dict]:
        """Stop sending, wait until every sent task has a record (or the timeout), stop monitoring."""
        self.producer.stop()
        self.mark("load_stop")
        wanted = {task["token"] for task in self.producer.sent}
        deadline = time.monotonic() + complete_timeout
        while time.monotonic() < deadline and not wanted <= set(self.ledger.tokens()):
            time.sleep(0.5)
        time.sleep(settle)  # a late duplicate would land now
        self.monitor.stop()
        self.mark("complete")
        records = self.ledger.records()
        self.starts = self.ledger.starts()
        self.ledger.delete()
        return records


# A node that answers neither of a sample's asks (0.5 s, then 1.5 s alone) is silent, not yet out of service: a
# process busy on a starved host (2 cores, a deploy's pip install beside it) answers late and goes on consuming.
# A silent stretch counts as in service only when it is this short, has in-service samples on both sides, and the
# same worker process ran the node's tasks before and after it (a restart changes the PID; a stopped or frozen
# process, kill -STOP, stays silent far longer than this).
SLOW_REPLY_SECONDS = 3.0


def resolve_silences(samples: list[dict], records: list[dict]) -> tuple[list[dict], dict]:
    """(samples with each short silence of a running process counted in service, {node: [[start, end], ...]})."""
    by_node = defaultdict(list)
    for record in records:
        by_node[record["node"]].append(record)

    def process(node, before=None, after=None):
        if before is not None:
            ran = [r for r in by_node[node] if r["finished"] < before]
            return max(ran, key=lambda r: r["finished"])["worker_pid"] if ran else None
        ran = [r for r in by_node[node] if r["started"] > after]
        return min(ran, key=lambda r: r["started"])["worker_pid"] if ran else None

    resolved = [dict(sample, in_service=dict(sample["in_service"])) for sample in samples]
    slow = defaultdict(list)
    nodes = {node for sample in samples for node in sample["in_service"]}
    for node in nodes:
        index = 0
        while index < len(resolved):
            if resolved[index]["in_service"].get(node) is not None or index == 0 \
                    or resolved[index - 1]["in_service"].get(node) is not True:
                index += 1
                continue
            end = index
            while end < len(resolved) and resolved[end]["in_service"].get(node) is None:
                end += 1
            if end < len(resolved) and resolved[end]["in_service"].get(node) is True:
                start_t, end_t = resolved[index]["t"], resolved[end]["t"]
                pid = process(node, before=start_t)
                if end_t - start_t <= SLOW_REPLY_SECONDS and pid is not None and pid == process(node, after=end_t):
                    for silent in resolved[index:end]:
                        silent["in_service"][node] = True
                    slow[node].append([start_t, end_t])
            index = end
    return resolved, dict(slow)


def out_of_service_windows(samples: list[dict], node: str) -> list[tuple[float, float | None]]:
    """[(first sample out, first sample back in service or None)] of one node."""
    windows, start = [], None
    for sample in samples:
        up = sample["in_service"].get(node, False)
        if not up and start is None:
            start = sample["t"]
        elif up and start is not None:
            windows.append((start, sample["t"]))
            start = None
    if start is not None:
        windows.append((start, None))
    return windows


def analyse(sent: list[dict], records: list[dict], samples: list[dict], node_groups: dict, marks: dict,
            allowed_out: dict | None = None, starts: Counter | None = None) -> dict:
    """Counts, per-group out-of-service maxima, per-node windows and throughput of a run under load.

    starts: {token: times its body started} (Ledger.starts()); a task started twice ran twice, even if
    the first run was killed before it could record its end.

    node_groups: {node: group}. allowed_out: {group: nodes allowed out of service at once}.
    marks: load_start, roll_start, roll_end, load_stop (epoch seconds).
    """
    sent_tokens = Counter(task["token"] for task in sent)
    ran = Counter(record["token"] for record in records)
    lost = sorted(token for token in sent_tokens if token not in ran)
    duplicated = {token: count for token, count in ran.items() if count > 1}
    unknown = sorted(token for token in ran if token not in sent_tokens)
    started_again = {token: count for token, count in (starts or {}).items() if count > 1}

    samples, slow_replies = resolve_silences(samples, records)
    max_out, worst = defaultdict(int), {}
    for sample in samples:
        out = Counter(node_groups[node] for node, up in sample["in_service"].items() if not up)
        for group in set(node_groups.values()):
            if out[group] > max_out[group]:
                max_out[group] = out[group]
                worst[group] = {"t": sample["t"], "out": sorted(node for node, up in sample["in_service"].items()
                                                               if not up and node_groups[node] == group)}

    # Capacity, surge processes counted: a node out of service whose surge process serves its queues is covered.
    max_uncovered, worst_uncovered = defaultdict(int), {}
    surged = set()
    for sample in samples:
        covering = sample.get("surge_in_service", {})
        surged.update(node for node, up in covering.items() if up)
        out = Counter(node_groups[node] for node, up in sample["in_service"].items()
                      if not up and not covering.get(node))
        for group in set(node_groups.values()):
            if out[group] > max_uncovered[group]:
                worst_uncovered[group] = {"t": sample["t"], "out": sorted(
                    node for node, up in sample["in_service"].items()
                    if not up and not covering.get(node) and node_groups[node] == group)}
            max_uncovered[group] = max(max_uncovered[group], out[group])

    by_node = defaultdict(list)
    for record in records:
        by_node[record["node"]].append(record)
    windows = {}
    for node in node_groups:
        windows[node] = []
        for start, end in out_of_service_windows(samples, node):
            # The drain waits for the tasks the stopping process still had: those of the worker process
            # that ran tasks before the window. A task the restarted process ran in the window (it
            # consumes before the monitor's next sample sees it back) is not part of the drain.
            old = {r.get("worker_pid") for r in by_node[node] if r["started"] < start}
            finished = [r["finished"] for r in by_node[node]
                        if start <= r["finished"] <= (end or float("inf")) and r.get("worker_pid") in old]
            drain = (max(finished) - start) if finished else 0.0
            inside = [sample for sample in samples if start <= sample["t"] < (end or float("inf"))]
            windows[node].append({
                "start": start, "end": end, "seconds": None if end is None else end - start,
                # What the node said while out: the queues it answered with, or "silent".
                "answers": sorted({json.dumps(sample.get("answers", {}).get(node, "silent")) for sample in inside
                                   if not sample["in_service"].get(node)}),
                "last_task_finished": max(finished) if finished else None,
                "drain_seconds": drain,
                "overhead_seconds": None if end is None else (end - start) - drain,
            })

    def rate(since, until):
        if since is None or until is None or until <= since:
            return None
        return sum(1 for r in records if since <= r["finished"] < until) / (until - since)

    steady = rate(marks.get("steady_start", marks.get("load_start")), marks.get("roll_start"))
    rolling = rate(marks.get("roll_start"), marks.get("roll_end"))
    per_second = Counter(int(r["finished"]) for r in records)
    return {
        "sent": len(sent), "completed": len(ran), "executions": sum(ran.values()),
        "lost": len(lost), "lost_tokens": lost[:20],
        "duplicates": sum(count - 1 for count in duplicated.values()), "duplicated_tokens": sorted(duplicated)[:20],
        "unknown": len(unknown),
        "started_again": len(started_again), "started_again_tokens": sorted(started_again)[:20],
        "redelivered": sum(1 for r in records if r.get("redelivered")),
        "sent_per_queue": dict(Counter(task["queue"] for task in sent)),
        "ran_per_node": dict(Counter(r["node"] for r in records)),
        "ran_per_release": dict(Counter(r.get("release") for r in records)),
        "max_out_of_service": dict(max_out), "worst_moment": worst,
        "max_out_of_service_with_surge": dict(max_uncovered), "worst_moment_with_surge": worst_uncovered,
        "surged_nodes": sorted(surged),
        "allowed_out_of_service": allowed_out or {},
        "windows": windows,
        "slow_replies": slow_replies,
        "samples": len(samples),
        "throughput": {"steady_per_s": steady, "rolling_per_s": rolling,
                       "rolling_fraction": (rolling / steady) if steady and rolling is not None else None,
                       "per_second": sorted(per_second.items())},
        "marks": marks,
    }
