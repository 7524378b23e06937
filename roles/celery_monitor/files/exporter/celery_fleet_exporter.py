"""celery-fleet's fleet exporter: the whole fleet's state as Prometheus metrics, from one place.

Every ``--interval`` seconds it asks the fleet once, in a child process killed at ``--deadline`` (the control
module's ``status``: one round of inspect broadcasts, every node answering in parallel, and direct reads of
Redis: every priority sub-list of every queue, the unacked hash), joins the answers with what the inventory
expects (the role's filter ``fleet_status``: the same states and guard minimum as ``celery-fleet status``) and
keeps the result. A scrape only renders the last result: it never broadcasts and never waits on the broker.
When the broker does not answer within the deadline, the scrape says so (``celery_fleet_broker_up 0``) and
drops the fleet's figures rather than serving stale ones as current.

The fleet's logic is not copied here: ``celery_control`` (the Ansible module that talks to the workers and the
broker) and ``celery_fleet`` (the role's filters) are installed beside this module by the celery_monitor role.

Configuration: a JSON file (``--config``), written by the role (it holds the broker's password: no
environment file, no command line):
``{"broker_url", "transport_options", "queues", "hosts": {host: {"group", "nodes": {node: [queues]}}},
"min_online", "interval", "timeout", "deadline", "listen", "port", "flower": {...}}``.

``python -m celery_fleet_exporter flower --config FILE`` runs Flower with the same file: the fleet's broker and
transport options (a client with a shorter visibility timeout would put back tasks that are still running),
basic auth, address, port and max_tasks handed to Flower through its FLOWER_* environment, never argv.
"""

import argparse
import json
import logging
import threading
import time

log = logging.getLogger("celery_fleet_exporter")

# {name: (type, help)}: every metric this exporter serves (the README lists them from here).
METRICS = {
    "celery_fleet_broker_up": ("gauge", "1 when the last refresh got the fleet's answers through the broker in time"),
    "celery_fleet_refresh_duration_seconds": ("gauge", "How long the last refresh took"),
    "celery_fleet_refresh_age_seconds": ("gauge", "Seconds since the last refresh that got through"),
    "celery_fleet_refresh_failures_total": ("counter", "Refreshes that did not get through (broker down or frozen)"),
    "celery_fleet_queue_ready_messages": ("gauge", "Messages waiting in the queue, every priority sub-list summed"),
    "celery_fleet_queue_ready_messages_by_priority": ("gauge", "Messages waiting in one priority sub-list"),
    "celery_fleet_queue_unacked_messages": ("gauge", "Messages delivered and not acknowledged (kombu's unacked "
                                                     "hash: reserved and running tasks)"),
    "celery_fleet_queue_consumers": ("gauge", "Nodes consuming the queue"),
    "celery_fleet_queue_oldest_message_age_seconds": (
        "gauge", "How long the next message out of the queue has been the next one out, at least (messages carry "
                 "no time: the exporter counts from the refresh that first saw it there)"),
    "celery_fleet_group_nodes": ("gauge", "Nodes the inventory gives the group"),
    "celery_fleet_group_nodes_in_service": ("gauge", "Nodes of the group that answer and consume all their queues"),
    "celery_fleet_group_min_in_service": ("gauge", "The capacity guard's minimum of nodes in service for the group"),
    "celery_fleet_node_up": ("gauge", "1 when the node answered the last refresh"),
    "celery_fleet_node_in_service": ("gauge", "1 when the node answers and consumes all its queues"),
    "celery_fleet_node_active_tasks": ("gauge", "Tasks the node is running"),
    "celery_fleet_node_reserved_tasks": ("gauge", "Tasks the node holds prefetched, not yet running"),
    "celery_fleet_node_concurrency": ("gauge", "The node's pool size"),
    "celery_fleet_node_utilisation": ("gauge", "Active tasks / concurrency"),
    "celery_fleet_node_processed_tasks_total": ("counter", "Tasks the node has started since it started"),
    "celery_fleet_node_resident_memory_bytes": ("gauge", "Memory of the node's unit: the node and its children"),
    "celery_fleet_node_memory_max_bytes": ("gauge", "The node unit's memory cap (MemoryMax)"),
    "celery_fleet_node_uptime_seconds": ("gauge", "Seconds since the node started"),
    "celery_fleet_node_info": ("gauge", "1 per node, with its release and pool as labels"),
}


def load_config(path):
    with open(path, encoding="utf-8") as handle:
        config = json.load(handle)
    for key in ("broker_url", "queues", "hosts"):
        if key not in config:
            raise SystemExit(f"{path}: {key} is missing")
    config.setdefault("transport_options", {})
    config.setdefault("min_online", None)
    config.setdefault("interval", 10.0)
    config.setdefault("timeout", 1.5)
    config.setdefault("deadline", 8.0)
    config.setdefault("listen", "127.0.0.1")
    config.setdefault("port", 9808)
    return config


def ask_fleet(config):
    """The control module's status, in a child process with a hard deadline (celery_control.within)."""
    import celery_control

    def call():
        app = celery_control.client_app(config["broker_url"], config["transport_options"])
        try:
            return celery_control.status(app, config["queues"], None, config["timeout"])
        finally:
            app.close()

    return celery_control.within(config["deadline"], call)


class FleetState:
    """The last refresh's samples, and what must survive between refreshes (first sight of each queue's next
    message, the failure count)."""

    def __init__(self, config, clock=time.time):
        self.config = config
        self.clock = clock
        self.lock = threading.Lock()
        self.samples = []
        self.failures = 0
        self.last_success = None
        self.last_duration = 0.0
        self.broker_up = 0
        self.first_seen = {}  # (queue, priority) -> (delivery tag, first seen)

    def refresh(self, ask=ask_fleet):
        started = self.clock()
        try:
            observed = ask(self.config)
        except Exception as error:  # noqa: BLE001 - a broker down or frozen is what this reports
            log.warning("refresh failed: %s", error)
            with self.lock:
                self.failures += 1
                self.broker_up = 0
                self.samples = []
                self.last_duration = self.clock() - started
            return False
        samples = self.samples_from(observed, self.clock())
        with self.lock:
            self.samples = samples
            self.broker_up = 1
            self.last_success = self.clock()
            self.last_duration = self.last_success - started
        return True

    def samples_from(self, observed, now):
        """[(metric, labels, value)] for one refresh's answers."""
        from celery_fleet import fleet_status

        config = self.config
        hosts = {host: {"group": info.get("group"), "nodes": info.get("nodes") or {}}
                 for host, info in config["hosts"].items()}
        view = fleet_status(hosts, observed, config.get("min_online"))
        answered = observed.get("nodes_status") or {}
        samples = []
        for queue in view["queues"]:
            name = queue["queue"]
            samples.append(("celery_fleet_queue_ready_messages", {"queue": name}, queue["ready"]))
            for priority, count in sorted(queue["by_priority"].items(), key=lambda item: int(item[0])):
                samples.append(("celery_fleet_queue_ready_messages_by_priority",
                                {"queue": name, "priority": priority}, count))
            if queue.get("unacked") is not None:
                samples.append(("celery_fleet_queue_unacked_messages", {"queue": name}, queue["unacked"]))
            samples.append(("celery_fleet_queue_consumers", {"queue": name}, len(queue["consumers"])))
            samples.append(("celery_fleet_queue_oldest_message_age_seconds", {"queue": name},
                            self._oldest_age(name, queue.get("oldest_by_priority") or {}, now)))
        for group in view["groups"]:
            labels = {"group": group["group"]}
            samples += [("celery_fleet_group_nodes", labels, group["nodes"]),
                        ("celery_fleet_group_nodes_in_service", labels, group["in_service"]),
                        ("celery_fleet_group_min_in_service", labels, group["guard_minimum"])]
        for node in view["nodes"]:
            labels = {"node": node["node"], "group": node["group"] or "", "host": node["host"] or ""}
            seen = answered.get(node["node"])
            samples.append(("celery_fleet_node_up", labels, int(seen is not None)))
            samples.append(("celery_fleet_node_in_service", labels, int(node["state"] == "in service")))
            if seen is None:
                continue
            for metric, value in (("celery_fleet_node_active_tasks", node["active"]),
                                  ("celery_fleet_node_reserved_tasks", node["reserved"]),
                                  ("celery_fleet_node_concurrency", node["concurrency"]),
                                  ("celery_fleet_node_utilisation", node["utilisation"]),
                                  ("celery_fleet_node_processed_tasks_total", node["processed"]),
                                  ("celery_fleet_node_uptime_seconds", node["uptime"]),
                                  ("celery_fleet_node_resident_memory_bytes", seen.get("memory")),
                                  ("celery_fleet_node_memory_max_bytes", seen.get("memory_max"))):
                if value is not None:
                    samples.append((metric, labels, value))
            samples.append(("celery_fleet_node_info",
                            {**labels, "release": seen.get("release") or "", "pool": seen.get("pool") or ""}, 1))
        return samples

    def _oldest_age(self, queue, oldest_by_priority, now):
        """Seconds since the next message out of any priority sub-list was first seen there (0 when empty)."""
        ages = []
        for priority, tag in oldest_by_priority.items():
            key = (queue, priority)
            if tag is None:
                self.first_seen.pop(key, None)
                continue
            seen_tag, since = self.first_seen.get(key, (None, now))
            if seen_tag != tag:
                since = now
            self.first_seen[key] = (tag, since)
            ages.append(now - since)
        return round(max(ages, default=0.0), 3)

    def families(self):
        """prometheus_client metric families of the last refresh (a scrape's whole work)."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        with self.lock:
            samples, failures, broker_up = list(self.samples), self.failures, self.broker_up
            last_success, duration = self.last_success, self.last_duration
        now = self.clock()
        fixed = [("celery_fleet_broker_up", {}, broker_up), ("celery_fleet_refresh_duration_seconds", {}, duration),
                 ("celery_fleet_refresh_failures_total", {}, failures)]
        if last_success is not None:
            fixed.append(("celery_fleet_refresh_age_seconds", {}, now - last_success))
        by_metric = {}
        for metric, labels, value in fixed + samples:
            by_metric.setdefault(metric, []).append((labels, value))
        for metric, entries in by_metric.items():
            kind, documentation = METRICS[metric]
            label_names = sorted(entries[0][0])
            if kind == "counter":
                family = CounterMetricFamily(metric.removesuffix("_total"), documentation, labels=label_names)
            else:
                family = GaugeMetricFamily(metric, documentation, labels=label_names)
            for labels, value in entries:
                family.add_metric([str(labels[name]) for name in label_names], float(value))
            yield family


class Collector:
    def __init__(self, state):
        self.state = state

    def collect(self):
        return self.state.families()


CONFIG_VARIABLE = "CELERY_FLEET_MONITOR_CONFIG"


def __getattr__(name):
    """``celery_fleet_exporter:flower_app``: the Celery app Flower runs with, from the monitor's configuration."""
    if name == "flower_app":
        import os

        from celery import Celery

        config = load_config(os.environ[CONFIG_VARIABLE])
        app = globals()["flower_app"] = Celery("celery_fleet_flower", broker=config["broker_url"],
                                               set_as_current=True)
        app.conf.broker_transport_options = dict(config["transport_options"])
        app.conf.broker_connection_retry_on_startup = True
        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def flower(config_path):
    """Flower with the monitor's configuration: its options through FLOWER_* (Flower's own environment
    options), the app through celery_fleet_exporter:flower_app."""
    import os
    import sys

    from celery.bin.celery import main as celery_main

    config = load_config(config_path)
    options = config.get("flower") or {}
    os.environ[CONFIG_VARIABLE] = os.path.abspath(config_path)
    os.environ["FLOWER_BASIC_AUTH"] = f"{options['user']}:{options['password']}"
    os.environ["FLOWER_ADDRESS"] = str(options.get("address", "127.0.0.1"))
    os.environ["FLOWER_PORT"] = str(options.get("port", 5555))
    os.environ["FLOWER_MAX_TASKS"] = str(options.get("max_tasks", 10000))
    os.environ["FLOWER_READ_ONLY"] = str(bool(options.get("read_only", True))).lower()
    # Workers that went away leave no metrics behind for ever (Flower's gauges per worker).
    os.environ["FLOWER_PURGE_OFFLINE_WORKERS"] = str(options.get("purge_offline_workers", 600))
    sys.argv = ["celery", "--app", "celery_fleet_exporter:flower_app", "flower"]
    return celery_main()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("command", nargs="?", default="exporter", choices=["exporter", "flower"])
    parser.add_argument("--config", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if args.command == "flower":
        return flower(args.config)
    config = load_config(args.config)

    from prometheus_client import start_http_server
    from prometheus_client.core import REGISTRY

    state = FleetState(config)
    REGISTRY.register(Collector(state))
    start_http_server(int(config["port"]), addr=config["listen"])
    log.info("serving on %s:%s, refreshing every %s s", config["listen"], config["port"], config["interval"])
    while True:
        started = time.monotonic()
        state.refresh()
        time.sleep(max(0.0, float(config["interval"]) - (time.monotonic() - started)))


if __name__ == "__main__":
    main()
