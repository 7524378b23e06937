#!/usr/bin/python
"""Talk to a Celery fleet through Celery's control API (broadcast over the broker)."""

from __future__ import annotations

DOCUMENTATION = r"""
module: celery_control
short_description: Ping, inspect and steer Celery workers through the control API
description:
  - "Sends control commands over the broker, so it runs anywhere the broker is reachable and
    celery is importable (on a worker host: set ansible_python_interpreter to the release's venv)."
  - "C(pending) counts each node's reserved and active tasks, reserved first: once a node has stopped
    consuming, a task only moves from reserved to active, so zero and zero means the node is idle."
  - C(ping), C(inspect) and C(pending) never change anything.
  - The consumer actions fail when a node named in I(destination) does not answer, or does not confirm
    the change, within I(timeout). C(cancel_consumer) and C(add_consumer) make the
    destination nodes stop or start consuming a queue; they report changed only when a node's
    consumers actually changed.
options:
  broker_url:
    description: Broker URL, with credentials.
    type: str
    required: true
  action:
    description: What to do.
    type: str
    required: true
    choices: [ping, inspect, pending, cancel_consumer, add_consumer, wait_consuming, wait_answering, wait_drained,
              status, restart_consuming]
  method:
    description: Inspect method, for action=inspect.
    type: str
    choices: [active, reserved, scheduled, active_queues, stats, registered]
    default: active
  destination:
    description: Node names to address; all nodes when empty.
    type: list
    elements: str
    default: []
  queue:
    description: Queue to cancel or add, for the consumer actions (or give several in I(queues)).
    type: str
  queues:
    description:
      - For C(cancel_consumer) and C(add_consumer), the queues to cancel or add in one call (instead of I(queue)).
      - For C(wait_consuming), the queues each node of I(destination) must consume, exactly. The call asks every
        I(poll) seconds (each ask waits at most I(timeout)) until they all do or I(wait) seconds have passed, and
        reports C(consuming) and the seconds it took; it fails only on a broker error.
    type: list
    elements: str
    default: []
  status_queues:
    description: >-
      For C(status): the queues whose depth to read. The call asks every node (or I(destination)) for stats,
      active, reserved and active_queues at once, and reads from Redis each queue's ready messages summed over
      every priority sub-list kombu uses (the transport's own names for them), and the unacknowledged messages
      (kombu's unacked hash) per queue. Returns C(nodes_status) and C(queues_status); never changes anything.
    type: list
    elements: str
    default: []
  wait:
    description: >-
      Seconds C(wait_consuming), C(wait_answering) or C(wait_drained) may wait in all; keep I(deadline) above it.
      C(wait_answering) asks the I(destination) nodes for their queues every I(poll) seconds until each answers,
      and reports C(answering), C(seconds) and the last C(replies), without failing for a node that never does.
      C(wait_drained)
      asks the I(destination) nodes for C(pending) every I(poll) seconds until each has no reserved and no active
      task, and reports C(drained), C(seconds) and the last C(replies).
    type: float
    default: 0
  poll:
    description: Seconds between the asks of C(wait_consuming), C(wait_answering) and C(wait_drained).
    type: float
    default: 0.25
  timeout:
    description: Seconds to wait for replies.
    type: float
    default: 2.0
  transport_options:
    description:
      - "kombu's Redis transport options: the fleet's own (the role's C(_celery_worker_transport_options), as the
        worker env file has them). The visibility timeout matters: any client that polls the broker puts back
        unacknowledged messages older than its own, so a client with kombu's default (3600 s) would hand a
        longer task to a second worker. The socket timeouts bound each broker operation."
    type: dict
    default: {}
  deadline:
    description:
      - Seconds after which the whole call gives up and fails, whatever the broker does (one that accepts
        connections and never answers included). For C(restart_consuming), the bound of its wait.
    type: float
    default: 30.0
  unit:
    description: >-
      For C(restart_consuming): the systemd unit to stop (systemd's own stop: the unit's KillSignal and
      TimeoutStopSec), then, once every I(links) entry points at its target, to start; then the call waits as
      C(wait_consuming) does for I(destination) to consume exactly I(queues). One module run for what were four, so
      that a roll keeps a node out of service for its own stop and start and not for Ansible's tasks. A failure
      names its step in C(step) (stop, start or health check). In check mode it only waits.
    type: str
  guard:
    description:
      - "For C(cancel_consumer): the roll's capacity guard, checked in the same module run before any consumer is
        cancelled (one module start less per drained node). Keys as the filter C(celery_fleet_capacity_guard) takes
        them: C(node), C(group), C(host_nodes), C(batch_hosts), C(min_online). The nodes the guard counts are asked
        for their queues (I(timeout)); when too few are in service the call fails with the guard's refusal and
        C(step) C(capacity guard), nothing cancelled. A broker error while asking fails the same step; one while
        cancelling fails C(step) C(drain)."
      - The guard's arithmetic is the filter's own (plugins/filter/celery_fleet.py, shipped as a module_utils).
    type: dict
  links:
    description: For C(restart_consuming), symbolic links to point (atomically) between the stop and the start.
    type: list
    elements: dict
    default: []
    suboptions:
      path: {type: path, required: true, description: The link.}
      target: {type: path, required: true, description: What it points at.}
author: celery-fleet
"""

EXAMPLES = r"""
- name: Which nodes answer
  celery_control:
    broker_url: "{{ celery_worker_broker_url }}"
    action: ping
  register: __pong

- name: Stop web-worker@web1 consuming priority
  celery_control:
    broker_url: "{{ celery_worker_broker_url }}"
    action: cancel_consumer
    queue: priority
    destination: [web-worker@web1]
"""

RETURN = r"""
nodes:
  description: Names of the nodes that replied, sorted.
  type: list
  returned: always
consuming:
  description: For C(wait_consuming), whether every destination node consumed exactly I(queues) at the end.
  type: bool
  returned: when action is wait_consuming
answering:
  description: For C(wait_answering), whether every destination node answered at the end.
  type: bool
  returned: when action is wait_answering
seconds:
  description: >-
    For C(wait_consuming), C(wait_answering) and C(wait_drained), seconds from the call's start to its last
    answer; for
    C(restart_consuming), from the unit's start to the node consuming.
  type: float
  returned: when action is wait_consuming, wait_answering, wait_drained or restart_consuming
stop_seconds:
  description: For C(restart_consuming), how long the unit took to stop.
  type: float
  returned: when action is restart_consuming
start_seconds:
  description: For C(restart_consuming), how long systemd took to start the unit.
  type: float
  returned: when action is restart_consuming
step:
  description: >-
    For a failed C(restart_consuming), the step that failed (stop, start or health check); for a failed
    C(cancel_consumer) with I(guard), capacity guard or drain.
  type: str
  returned: on failure of restart_consuming, and of cancel_consumer with guard
guard:
  description: For C(cancel_consumer) with I(guard), the guard's verdict (counted, in_service, needed, refusal).
  type: dict
  returned: when action is cancel_consumer and guard is given
nodes_status:
  description: >-
    For C(status): per answering node, C(pool), C(concurrency), C(active), C(reserved), C(processed) (tasks
    started running since the node started: Celery's total), C(uptime) (s), C(pid) and C(queues) (consumed now).
  type: dict
  returned: when action is status
queues_status:
  description: >-
    For C(status): per queue, C(ready) (sum over C(by_priority), the depth of each priority sub-list),
    C(unacked) and C(consumers) (nodes consuming it).
  type: dict
  returned: when action is status
drained:
  description: For C(wait_drained), whether every destination node had no reserved and no active task at the end.
  type: bool
  returned: when action is wait_drained
replies:
  description: >-
    Reply of each node (for inspect, the method's result; for active and reserved, a task list; for
    pending, C({reserved: N, active: N, total: N}) for the nodes that answered both questions).
  type: dict
  returned: always
"""

import json
import os
import select
import signal
import time

try:
    from ansible.module_utils.basic import AnsibleModule, missing_required_lib
except ImportError:  # pragma: no cover - imported without Ansible: the fleet's exporter on the monitor host
    AnsibleModule = missing_required_lib = None

try:
    from celery import Celery
except ImportError:  # pragma: no cover - reported to the user below
    Celery = None


def _merge(replies):
    """control.broadcast(reply=True) returns [{node: reply}, ...]; make it {node: reply}."""
    merged = {}
    for reply in replies or []:
        merged.update(reply)
    return merged


def _wait_queues(app, destination, done, wait, timeout, poll):
    """Ask the `destination` nodes what they consume until done(replies) or `wait` seconds passed:
    (done, seconds, replies) of the last answer."""
    started = time.monotonic()
    while True:
        replies = app.control.inspect(destination=list(destination), timeout=timeout).active_queues() or {}
        finished = done(replies)
        seconds = round(time.monotonic() - started, 2)
        if finished or seconds + poll >= wait:
            return finished, seconds, replies
        time.sleep(poll)


def wait_consuming(app, destination, queues, wait, timeout=0.5, poll=0.25):
    """Ask the `destination` nodes what they consume until each consumes exactly `queues`, or `wait` seconds
    passed. Returns {"consuming", "seconds", "replies"} (the last answer). A node just started answers within
    a second or two: asking every `poll` s with short timeouts sees it as soon as it consumes, where one long
    ask per Ansible retry would wait out its timeout and the retry's delay."""
    expected = sorted(queues)
    consuming, seconds, replies = _wait_queues(
        app, destination, lambda replies: all(sorted(queue["name"] for queue in replies.get(node) or []) == expected
                                              for node in destination), wait, timeout, poll)
    return {"consuming": consuming, "seconds": seconds, "replies": replies}


def wait_answering(app, destination, wait, timeout=0.5, poll=0.25):
    """Ask the `destination` nodes what they consume until each answers (whatever it consumes, nothing
    included), or `wait` seconds passed. Returns {"answering", "seconds", "replies"} (the last answer): a node
    that never answers is in no reply, and the call does not fail for it."""
    answering, seconds, replies = _wait_queues(
        app, destination, lambda replies: all(node in replies for node in destination), wait, timeout, poll)
    return {"answering": answering, "seconds": seconds, "replies": replies}


def wait_drained(app, destination, wait, timeout=1.0, poll=0.25):
    """Ask the `destination` nodes for their pending tasks (run's "pending": reserved, then active) until each
    has none, or `wait` seconds passed. Returns {"drained", "seconds", "replies"} (the last answer). A drain
    ends within a poll of the node's last task finishing, where one ask per Ansible retry waited a second
    plus the module's start each time."""
    started = time.monotonic()
    while True:
        # A broker error on one ask is tried again until the wait ends (as the Ansible retries did); the last
        # one is raised if no ask ever got through.
        try:
            replies, error = run(app, "pending", destination=destination, timeout=timeout)[1], None
        except Exception as failure:  # noqa: BLE001 - reported if the wait ends on it
            replies, error = {}, failure
        drained = error is None and all((replies.get(node) or {}).get("total") == 0 for node in destination)
        seconds = round(time.monotonic() - started, 2)
        if drained or seconds + poll >= wait:
            if error is not None:
                raise error
            return {"drained": drained, "seconds": seconds, "replies": replies}
        time.sleep(poll)


def status(app, queues, destination=None, timeout=1.0):
    """The fleet as its nodes and its broker see it: inspect calls (stats, then active, reserved and
    active_queues) and direct reads of Redis through the transport's own channel (its priority sub-list names,
    its unacked hash), never KEYS and never a shell.

    One broadcast at a time: stats to every node (or the destination), waiting its whole timeout for nodes the
    caller does not know of; the others only to the nodes that answered it, each ending as soon as all of them
    have. (Four broadcasts from threads of one process at once lost replies now and then: a node answered
    stats but was missing from active.)"""

    def ask(method, nodes):
        inspector = app.control.inspect(destination=list(nodes or []) or None, timeout=timeout,
                                        limit=len(nodes) if nodes else None)
        return getattr(inspector, method)() or {}

    def ask_all(method, nodes):
        # kombu's collect counts every message on the reply queue against the limit, a late reply to an earlier
        # broadcast too (kombu/pidbox.py, Mailbox._collect): a node that answered stats after its timeout could
        # take a real reply's place. The nodes missing from the answer are asked once more.
        replies = ask(method, nodes)
        missing = [node for node in nodes if node not in replies]
        return replies | (ask(method, missing) if missing else {})

    stats = ask("stats", destination)
    answered = sorted(stats)
    if answered:
        # Reserved before active, as the pending action asks: a task moves from reserved to active, never back.
        reserved, active, consuming = (ask_all(method, answered)
                                       for method in ("reserved", "active", "active_queues"))
    else:
        active, reserved, consuming = {}, {}, {}
    nodes = {}
    for node in sorted(set(stats) | set(consuming)):
        node_stats = stats.get(node) or {}
        pool = node_stats.get("pool") or {}
        # The fleet runtime's bootstep adds the node's release and unit memory to its stats reply.
        node_info = node_stats.get("fleet") or {}
        nodes[node] = {
            "release": node_info.get("release"),
            "memory": node_info.get("memory"),
            "memory_max": node_info.get("memory_max"),
            # "celery.concurrency.prefork:TaskPool" -> "prefork"
            "pool": str(pool.get("implementation", "")).split(":", 1)[0].rsplit(".", 1)[-1] or None,
            "concurrency": pool.get("max-concurrency"),
            "active": len(active[node]) if node in active else None,
            "reserved": len(reserved[node]) if node in reserved else None,
            "processed": sum((node_stats.get("total") or {}).values()) if node in stats else None,
            "uptime": node_stats.get("uptime"),
            "pid": node_stats.get("pid"),
            "queues": sorted(queue["name"] for queue in consuming.get(node) or []),
        }
    with app.connection_for_read() as connection:
        channel = connection.default_channel
        with channel.conn_or_acquire() as client:
            return _status_from_redis(channel, client, queues, nodes)


def _status_from_redis(channel, client, queues, nodes):
    """status()'s Redis half: ready messages per priority sub-list, unacknowledged per queue."""
    by_queue = {queue: {} for queue in queues}
    oldest = {queue: {} for queue in queues}
    for queue in queues:
        for priority in channel.priority_steps:
            name = channel._q_for_pri(queue, priority)
            by_queue[queue][str(priority)] = client.llen(name)
            # kombu pushes on the left and consumes from the right: the right end is the next one out. Its
            # delivery tag lets a caller that asks again see how long it has waited (messages carry no time).
            oldest[queue][str(priority)] = _oldest_tag(client, name) if by_queue[queue][str(priority)] else None
    unacked = dict.fromkeys(queues, 0)
    try:
        for _tag, payload in client.hscan_iter(channel.unacked_key, count=1000):
            try:
                routing_key = json.loads(payload)[2]
            except (ValueError, IndexError, TypeError):
                continue
            key = routing_key.decode() if isinstance(routing_key, bytes) else routing_key
            unacked[key] = unacked.get(key, 0) + 1
    except Exception as error:  # noqa: BLE001 - NOPERM: a broker still running an ACL from before status
        if not _refused_by_acl(error):
            raise
        unacked = None  # unknown: the broker's users file is applied at its next restart
    queues_status = {
        queue: {"ready": sum(by_queue.get(queue, {}).values()), "by_priority": by_queue.get(queue, {}),
                "oldest_by_priority": oldest.get(queue, {}),
                "unacked": None if unacked is None else unacked.get(queue, 0),
                "consumers": sorted(node for node, info in nodes.items() if queue in info["queues"])}
        for queue in sorted(set(queues) | set(unacked or {}))
    }
    return {"nodes_status": nodes, "queues_status": queues_status}


def _oldest_tag(client, name):
    """The delivery tag of the next message out of list `name`, or None where the broker's ACL predates LINDEX
    (a running Redis applies its users file at its next restart): depth is still known, the age is not."""
    try:
        return _delivery_tag(client.lindex(name, -1))
    except Exception as error:  # noqa: BLE001 - NOPERM only; anything else is the broker's failure
        if not _refused_by_acl(error):
            raise
        return None


def _refused_by_acl(error):
    """Whether a Redis error is NOPERM: the command is not in the user's ACL (redis-py: "... has no permissions
    to run ..."). The module imports no redis exception class, so the message decides."""
    return "permission" in str(error).lower()


def _delivery_tag(payload):
    """The delivery tag of a message as kombu stores it in a list (JSON, properties.delivery_tag), or None."""
    if payload is None:
        return None
    try:
        return str(json.loads(payload)["properties"]["delivery_tag"])
    except (ValueError, KeyError, TypeError):
        return None


def run(app, action, method="active", destination=None, queue=None, timeout=2.0, check_mode=False):
    """The module's logic, callable without Ansible. Returns (changed, replies)."""
    destination = list(destination or []) or None
    control = app.control
    if action == "ping":
        return False, _merge(control.ping(destination=destination, timeout=timeout))
    if action == "inspect":
        inspector = control.inspect(destination=destination, timeout=timeout)
        return False, getattr(inspector, method)() or {}
    if action == "pending":
        # Reserved first: a task moves from reserved to active, never back, and a node that has
        # cancelled its consumers reserves nothing new. Asked the other way round, a task could
        # move between the two questions and be counted in neither.
        reserved = control.inspect(destination=destination, timeout=timeout).reserved() or {}
        active = control.inspect(destination=destination, timeout=timeout).active() or {}
        return False, {
            node: {"reserved": len(reserved[node]), "active": len(active[node]),
                   "total": len(reserved[node]) + len(active[node])}
            for node in sorted(set(reserved) & set(active))
        }
    queues = [queue] if isinstance(queue, str) else list(queue or [])
    if not queues:
        raise ValueError(f"queue is required for action {action}")
    # Know who consumes what first, so changed is true only when a consumer really moves.
    before = control.inspect(destination=destination, timeout=timeout).active_queues() or {}
    consuming = {node: {q["name"] for q in found} for node, found in before.items()}
    # A named node that does not answer is an error, never "nothing to change": a drain that silently
    # cancelled nothing would stop a node that is still consuming.
    silent = sorted(set(destination or []) - set(consuming))
    if silent:
        raise RuntimeError(f"no answer from {', '.join(silent)} within {timeout} s")
    # One call for several queues: each queue's command goes to the nodes it changes, each confirmed.
    moves = {name: sorted(node for node, names in consuming.items() if (name in names) == (action == "cancel_consumer"))
             for name in queues}
    if not any(moves.values()) or check_mode:
        return any(moves.values()), {node: {"ok": "would change" if check_mode else "no change"} for node in consuming}
    command = control.cancel_consumer if action == "cancel_consumer" else control.add_consumer
    replies = {}
    for name, targets in moves.items():
        if not targets:
            continue
        confirmed = _merge(command(name, destination=targets, reply=True, timeout=timeout))
        unconfirmed = sorted(set(targets) - set(confirmed))
        if unconfirmed:
            raise RuntimeError(f"{action} {name}: no confirmation from {', '.join(unconfirmed)} within {timeout} s")
        for node, reply in confirmed.items():
            replies[node] = ({"ok": f"{replies[node]['ok']}; {reply.get('ok', reply)}"} if node in replies
                             else reply)
    return True, replies


def _fleet_filters():
    """The fleet's filter plugin, for its capacity guard (one definition): shipped to the host as a module_utils
    (plugins/module_utils/celery_fleet.py links to it); imported without Ansible, the file beside this one."""
    try:
        from ansible.module_utils import celery_fleet
    except ImportError:
        import celery_fleet
    return celery_fleet


def capacity_guard(app, guard, timeout=2.0):
    """The roll's capacity guard for draining guard["node"]: ask the nodes it counts for their queues (the call
    ends once they all replied, else at `timeout`) and judge with the filter's celery_fleet_capacity_guard.
    Returns its verdict ({"counted", "in_service", "needed", "unknown_hosts", "refusal"})."""
    fleet = _fleet_filters()
    node, host_nodes, batch_hosts = guard["node"], guard.get("host_nodes") or {}, guard.get("batch_hosts") or []
    counted = fleet.capacity_guard_nodes(node, host_nodes, batch_hosts)
    replies = (app.control.inspect(destination=counted, timeout=timeout).active_queues() or {}) if counted else {}
    return fleet.capacity_guard(node, guard.get("group"), host_nodes, batch_hosts, guard.get("min_online"), replies)


class StepFailed(Exception):
    """A step of restart_consuming failed; `step` names it (stop, start, health check)."""

    def __init__(self, step, message):
        super().__init__(message)
        self.step = step


def point(path, target):
    """Make `path` a symbolic link to `target` in one rename (never missing in between)."""
    # Hidden, as the roles' own temporaries: never taken for a release or an instance by a listing.
    temporary = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.celery-fleet-{os.getpid()}")
    if os.path.lexists(temporary):
        os.unlink(temporary)
    os.symlink(target, temporary)
    try:
        os.replace(temporary, path)
    except OSError:
        os.unlink(temporary)
        raise


def restart(unit, links, run_command, systemctl="systemctl"):
    """Stop `unit`, point `links` ([{"path", "target"}]), start it: {"stop_seconds", "start_seconds"}.
    run_command(argv) -> (rc, stdout, stderr). Raises StepFailed naming the step. A stop that systemd ended
    otherwise than warmly (its Result: killed at TimeoutStopSec, a signal) fails the stop: systemctl itself exits 0
    once the unit is down, however it went down."""
    started = time.monotonic()
    # A unit that was not running (a surge process between rolls; one that failed before) has nothing to stop,
    # and its Result is that of its last run.
    rc, state, _err = run_command([systemctl, "show", "-p", "ActiveState", "--value", "--", unit])
    running = rc != 0 or state.strip() not in ("inactive", "failed")
    rc, _out, err = run_command([systemctl, "stop", "--", unit])
    if rc != 0:
        raise StepFailed("stop", f"systemctl stop {unit} failed (exit {rc}): {err.strip()[-500:]}")
    stopped = time.monotonic()
    rc, result, _err = run_command([systemctl, "show", "-p", "Result", "--value", "--", unit])
    if running and rc == 0 and result.strip() not in ("", "success"):
        raise StepFailed("stop", f"{unit} did not stop warmly (systemd's result: {result.strip()}); see journalctl "
                                 f"-u {unit}")
    for link in links or []:
        try:
            point(link["path"], link["target"])
        except OSError as error:
            raise StepFailed("start", f"pointing {link['path']} at {link['target']} failed: {error}") from error
    rc, _out, err = run_command([systemctl, "start", "--", unit])
    if rc != 0:
        raise StepFailed("start", f"systemctl start {unit} failed (exit {rc}): {err.strip()[-500:]}")
    return {"stop_seconds": round(stopped - started, 2), "start_seconds": round(time.monotonic() - stopped, 2)}


class DeadlineExceeded(Exception):
    pass


def within(seconds, function, *args, **kwargs):
    """function(*args, **kwargs), run in a child process that is killed after `seconds`: a hard bound.

    (An alarm in this process is not one: kombu's clean-up after an interrupted call talks to the same
    frozen broker and waits out its socket timeouts again.) The result travels back as JSON; an exception
    in the child is raised here as RuntimeError with its message."""
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child's coverage is its result
        # The child never returns into the caller's code, whatever happens (a parent gone, a pipe closed).
        try:
            os.close(reader)
            try:
                outcome = {"result": function(*args, **kwargs)}
            except BaseException as error:  # noqa: BLE001 - every failure is reported to the parent
                outcome = {"error": f"{type(error).__name__}: {error}" if not str(error) else str(error)}
            with os.fdopen(writer, "w") as pipe:
                json.dump(outcome, pipe, default=repr)
        finally:
            os._exit(0)
    os.close(writer)
    deadline = time.monotonic() + seconds
    chunks = []
    with os.fdopen(reader, "rb") as pipe:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([pipe], [], [], left)[0]:
                os.kill(child, signal.SIGKILL)
                os.waitpid(child, 0)
                raise DeadlineExceeded(f"no result within the deadline of {seconds} s (broker unresponsive?)")
            chunk = os.read(pipe.fileno(), 65536)
            if not chunk:
                break
            chunks.append(chunk)
    os.waitpid(child, 0)
    outcome = json.loads(b"".join(chunks) or b'{"error": "the call ended without a result"}')
    if "error" in outcome:
        raise RuntimeError(outcome["error"])
    return outcome["result"]


def client_app(broker_url, transport_options):
    """A Celery app that talks to the fleet's broker with the fleet's transport options, connecting at
    most twice (kombu's failover options read max_retries from the transport options): a broker that is
    down fails the call in about two seconds, and the caller (a task's retries, a roll's deadline) decides
    whether to try again."""
    options = dict(transport_options or {})
    options.setdefault("max_retries", 1)
    return Celery("celery_fleet_control", broker=broker_url, set_as_current=False,
                  broker_transport_options=options)


def main():
    module = AnsibleModule(
        argument_spec={
            "broker_url": {"type": "str", "required": True, "no_log": True},
            "action": {"type": "str", "required": True,
                       "choices": ["ping", "inspect", "pending", "cancel_consumer", "add_consumer",
                                   "wait_consuming", "wait_answering", "wait_drained", "status",
                                   "restart_consuming"]},
            "method": {"type": "str", "default": "active",
                       "choices": ["active", "reserved", "scheduled", "active_queues", "stats", "registered"]},
            "destination": {"type": "list", "elements": "str", "default": []},
            "queue": {"type": "str"},
            "queues": {"type": "list", "elements": "str", "default": []},
            "status_queues": {"type": "list", "elements": "str", "default": []},
            "wait": {"type": "float", "default": 0},
            "poll": {"type": "float", "default": 0.25},
            "timeout": {"type": "float", "default": 2.0},
            "transport_options": {"type": "dict", "default": {}},
            "deadline": {"type": "float", "default": 30.0},
            "unit": {"type": "str"},
            "guard": {"type": "dict"},
            "links": {"type": "list", "elements": "dict", "default": [], "options": {
                "path": {"type": "path", "required": True}, "target": {"type": "path", "required": True}}},
        },
        mutually_exclusive=[("queue", "queues")],
        required_if=[("action", "cancel_consumer", ["queue", "queues"], True),
                     ("action", "add_consumer", ["queue", "queues"], True),
                     ("action", "wait_consuming", ["destination", "queues"]),
                     ("action", "wait_answering", ["destination"]),
                     ("action", "restart_consuming", ["destination", "queues", "unit"]),
                     ("action", "wait_drained", ["destination"])],
        supports_check_mode=True,
    )
    if Celery is None:
        module.fail_json(msg=missing_required_lib("celery") + " (run it with the release venv's python)")
    params = module.params
    app = client_app(params["broker_url"], params["transport_options"])
    reported = {}
    # The capacity guard first, in its own bounded call: a refusal or a failed ask touched nothing (step "capacity
    # guard"); a failure of the cancel itself is the drain's.
    guarded = params["action"] == "cancel_consumer" and bool(params["guard"])
    if guarded:
        # The guard's arithmetic travels as a module_utils: a controller whose ansible.cfg lacks the project's
        # module_utils path sends the module without it (an optional import to Ansible), said here, not as a broker error.
        try:
            _fleet_filters()
        except Exception as error:  # noqa: BLE001 - ImportError, or a file that is not the filter (a broken link)
            app.close()
            module.fail_json(msg=f"Capacity guard: the fleet's filter plugin did not come with the module ({error}): "
                                 "run from the project directory, whose ansible.cfg sets module_utils = "
                                 "plugins/module_utils", step="capacity guard")
        try:
            reported["guard"] = within(params["deadline"], capacity_guard, app, params["guard"], params["timeout"])
        except Exception as error:  # noqa: BLE001 - any broker error is reported to the operator
            app.close()
            module.fail_json(msg=f"Capacity guard: asking the group's nodes for their queues failed: {error}",
                             step="capacity guard")
        if reported["guard"]["refusal"]:
            app.close()
            module.fail_json(msg=reported["guard"]["refusal"], step="capacity guard", **reported)
    if params["action"] == "restart_consuming" and not module.check_mode:
        try:
            reported = restart(params["unit"], params["links"], module.run_command,
                              module.get_bin_path("systemctl", required=True))
        except StepFailed as failure:
            app.close()
            module.fail_json(msg=str(failure), step=failure.step)
    # One bounded call for every action; the waits report their outcome, the others (changed, replies).
    if params["action"] in ("wait_consuming", "restart_consuming"):
        call = (wait_consuming, app, params["destination"], params["queues"], params["wait"], params["timeout"],
                params["poll"])
    elif params["action"] == "wait_answering":
        call = (wait_answering, app, params["destination"], params["wait"], params["timeout"], params["poll"])
    elif params["action"] == "status":
        call = (status, app, params["status_queues"], params["destination"], params["timeout"])
    elif params["action"] == "wait_drained":
        call = (wait_drained, app, params["destination"], params["wait"], params["timeout"], params["poll"])
    else:
        call = (run, app, params["action"], params["method"], params["destination"],
                params["queues"] if params["action"] in ("cancel_consumer", "add_consumer") and params["queues"]
                else params["queue"], params["timeout"], module.check_mode)
    try:
        outcome = within(params["deadline"], *call)
    except Exception as error:  # noqa: BLE001 - any broker error is reported to the operator
        module.fail_json(msg=f"celery control {params['action']} failed: {error}", **reported,
                         **({"step": "health check"} if params["action"] == "restart_consuming"
                            else {"step": "drain"} if guarded else {}))
    finally:
        app.close()
    if params["action"] == "restart_consuming":
        # (A dry run too says the instance would restart, as the unit and link tasks it replaces did.)
        module.exit_json(changed=True, nodes=sorted(outcome["replies"]), **outcome, **reported)
    if params["action"] in ("wait_consuming", "wait_answering", "wait_drained"):
        module.exit_json(changed=False, nodes=sorted(outcome["replies"]), **outcome)
    if params["action"] == "status":
        module.exit_json(changed=False, nodes=sorted(outcome["nodes_status"]), replies={}, **outcome)
    changed, replies = outcome
    module.exit_json(changed=changed, nodes=sorted(replies), replies=replies, **reported)

if __name__ == "__main__":
    main()
