#!/usr/bin/env python3
"""Benchmark a rolling restart (or upgrade) of the fleet under load; write a JSON record and a PNG timeline.

Not a test: it measures. Needs a deployed fleet (`./fleet lab` for the lab) and the controller's venv:

    ./fleet bench                      # saturating load, lab inventory
    ./fleet bench --mode rate          # the rolling test's open-loop rates

Load modes:
  backlog  keeps every queue's Redis list topped up (default 2 tasks per slot of the group): the fleet
           runs at capacity, so throughput during the roll measures the capacity the roll costs;
  rate     sends at fixed rates per queue (the Molecule rolling scenario's), below capacity.

Reports: total roll duration; for each node and host, its out-of-service window (drained until it
consumes again), the part of it spent finishing tasks already running or reserved (drain), and the
rest (overhead: stop, start, health check); throughput during the roll over steady-state throughput.
Per node also what the roll itself measured (its health check's report): the stop, the start and the time
from the start to consuming, and the window's budget (drain + stop + start to consuming + 0.5 s); the
roll's budget is the sum of the windows + 10 s.

rolling_mode surge (pass it in --extra-vars, e.g. celery_worker_group_settings with rolling_mode: surge):
the groups' nodes out of service with no surge process serving in their stead (target 0), and the nodes
whose surge process served.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

import fleetload  # tests/support, on PYTHONPATH (./fleet bench)

PROJECT = fleetload.PROJECT
RATES = {"default": 1.5, "priority": 1.0, "batch": 0.6, "ml": 0.3}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inventory", action="append", default=None,
                        help="an inventory source, repeatable, in order (default: inventories/lab; the rolling "
                             "scenario's TLS lab: inventories/lab, then molecule/rolling/inventory)")
    parser.add_argument("--broker-url", help="broker URL reachable from here (default: the lab's broker)")
    parser.add_argument("--result-url", help="result backend URL the ledger tasks write to (default: the lab's)")
    parser.add_argument("--transport-options", default=None,
                        help="JSON: the fleet's CELERY_BROKER_TRANSPORT_OPTIONS, required with --broker-url (a client "
                             "with kombu's default visibility timeout would hand long tasks to a second worker)")
    parser.add_argument("--playbook", default="rolling_restart.yml")
    parser.add_argument("--extra-vars", action="append", default=[], help="passed to ansible-playbook")
    parser.add_argument("--limit", default=None, help="passed to ansible-playbook (e.g. web,batch)")
    parser.add_argument("--serial", default=None,
                        help="JSON: the roll's celery_worker_rolling_serial (default: the role's), for the capacity "
                             "check; pass the same in --extra-vars to roll with it")
    parser.add_argument("--mode", choices=["backlog", "rate"], default="backlog")
    parser.add_argument("--backlog-per-slot", type=float, default=2.0)
    parser.add_argument("--steady", type=float, default=40.0, help="seconds of load before the roll")
    parser.add_argument("--tail", type=float, default=10.0, help="seconds of load after the roll")
    parser.add_argument("--output", default=str(PROJECT / "benchmarks" / "results"))
    parser.add_argument("--seed", type=int, default=4)
    parser.add_argument("--playbook-log", default=None,
                        help="also write the roll's ansible-playbook output here (e.g. with "
                             "ANSIBLE_CALLBACKS_ENABLED=profile_tasks in the environment: where the roll's time goes)")
    parser.add_argument("--surge", action="store_true",
                        help="the roll runs in rolling_mode surge (set it in --extra-vars): the monitor waits for every "
                             "node's reply, surge processes included")
    args = parser.parse_args()
    args.inventory = args.inventory or [str(PROJECT / "inventories" / "lab")]
    if args.broker_url and not args.transport_options:
        parser.error("--broker-url needs --transport-options (the fleet's, from a worker's celery.env)")
    return args


def slots_per_queue(client, nodes: dict) -> dict:
    """{queue: pool slots consuming it} from each node's stats."""
    app = client.app("bench-stats")
    try:
        stats = app.control.inspect(timeout=2.0, limit=len(nodes)).stats() or {}
    finally:
        app.close()
    slots = defaultdict(int)
    for node, queues in nodes.items():
        for queue in queues:
            slots[queue] += stats.get(node, {}).get("pool", {}).get("max-concurrency", 1)
    return dict(slots)


# The roll's own report of each instance it restarted (rolling_consuming_check.yml's success message).
RESTARTED = re.compile(r"(\S+@\S+) stopped in ([0-9.]+) s, started in ([0-9.]+) s and consumed exactly its queues "
                       r"([0-9.]+) s into the health check")


def restart_timings(output: str) -> dict:
    """{node: {"stop_s", "start_s", "consuming_s"}} from a roll's output (the last report of each node)."""
    timings = {}
    for node, stop, start, consuming in RESTARTED.findall(" ".join(output.split())):
        timings[node] = {"stop_s": float(stop), "start_s": float(start), "consuming_s": float(consuming)}
    return timings


def summarise(report: dict, node_groups: dict, timings: dict | None = None) -> dict:
    timings = timings or {}
    marks = report["marks"]
    nodes, hosts = {}, defaultdict(lambda: {"out_of_service_s": 0.0, "drain_s": 0.0, "overhead_s": 0.0})
    for node, windows in sorted(report["windows"].items()):
        closed = [w for w in windows if w["end"] is not None]
        nodes[node] = {
            "group": node_groups[node],
            "windows": len(windows),
            "out_of_service_s": round(sum(w["seconds"] for w in closed), 2),
            "drain_s": round(sum(w["drain_seconds"] for w in closed), 2),
            "overhead_s": round(sum(w["overhead_seconds"] for w in closed), 2),
        }
        if node in timings:
            measured = timings[node]
            nodes[node].update(measured)
            # Target: the window is at most the node's own drain, stop, and start to consuming, plus 0.5 s.
            budget = nodes[node]["drain_s"] + measured["stop_s"] + measured["start_s"] + measured["consuming_s"] + 0.5
            nodes[node]["window_budget_s"] = round(budget, 2)
            nodes[node]["window_over_budget_s"] = round(nodes[node]["out_of_service_s"] - budget, 2)
        host = hosts[fleetload.node_host(node)]
        for key in ("out_of_service_s", "drain_s", "overhead_s"):
            host[key] = round(host[key] + nodes[node][key], 2)
    throughput = report["throughput"]
    windows_s = round(sum(node["out_of_service_s"] for node in nodes.values()), 2)
    return {
        "roll_seconds": round(marks["roll_end"] - marks["roll_start"], 2),
        # Target (stop-then-start): the roll at most the sum of its nodes' windows + 10 s.
        "windows_s": windows_s, "roll_budget_s": round(windows_s + 10, 2),
        "max_out_of_service_with_surge": report["max_out_of_service_with_surge"],
        "surged_nodes": report["surged_nodes"],
        "surge_timings": {node: value for node, value in timings.items() if node not in node_groups},
        "sent": report["sent"], "lost": report["lost"], "duplicates": report["duplicates"],
        "started_again": report["started_again"],
        "max_out_of_service": report["max_out_of_service"],
        "allowed_out_of_service": report["allowed_out_of_service"],
        "steady_tasks_per_s": round(throughput["steady_per_s"] or 0, 3),
        "rolling_tasks_per_s": round(throughput["rolling_per_s"] or 0, 3),
        "rolling_over_steady": round(throughput["rolling_fraction"] or 0, 3),
        "nodes": nodes, "hosts": dict(hosts),
    }


def plot(path: Path, report: dict, samples: list[dict], node_groups: dict, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    marks = report["marks"]
    zero = marks["roll_start"]
    fig, (ax_rate, ax_nodes, ax_windows) = plt.subplots(3, 1, figsize=(12, 9), sharex=True,
                                                       gridspec_kw={"height_ratios": [2, 1.3, 1.6]})
    seconds = [t - zero for t, _ in report["throughput"]["per_second"]]
    counts = [n for _, n in report["throughput"]["per_second"]]
    ax_rate.bar(seconds, counts, width=1.0, align="edge", color="#9ecae1", label="tasks finished per second")
    window = 5
    smooth = [sum(counts[max(0, i - window + 1):i + 1]) / min(window, i + 1) for i in range(len(counts))]
    ax_rate.plot([s + 0.5 for s in seconds], smooth, color="#08519c", label="5 s moving average")
    if report["throughput"]["steady_per_s"]:
        ax_rate.axhline(report["throughput"]["steady_per_s"], color="grey", ls="--", lw=1,
                        label=f"steady state {report['throughput']['steady_per_s']:.2f}/s")
    depth_ax = ax_rate.twinx()
    for queue in sorted(samples[0]["depth"]) if samples else []:
        depth_ax.plot([s["t"] - zero for s in samples], [s["depth"][queue] for s in samples], lw=0.8, alpha=0.6,
                      label=f"queue {queue}")
    depth_ax.set_ylabel("messages waiting")
    depth_ax.legend(loc="upper right", fontsize=7)
    ax_rate.set_ylabel("tasks/s")
    ax_rate.legend(loc="upper left", fontsize=7)
    ax_rate.set_title(title)

    groups = sorted(set(node_groups.values()))
    for group in groups:
        members = [n for n in node_groups if node_groups[n] == group]
        ax_nodes.step([s["t"] - zero for s in samples],
                      [sum(bool(s["in_service"][n]) for n in members) for s in samples], where="post",
                      label=f"{group} ({len(members)} nodes)")
        if any(s["surge_in_service"].get(n) for s in samples for n in members):
            ax_nodes.step([s["t"] - zero for s in samples],
                          [sum(bool(s["in_service"][n] or s["surge_in_service"][n]) for n in members) for s in samples],
                          where="post", ls="--", label=f"{group}, surge processes counted")
    ax_nodes.set_ylabel("nodes in service")
    ax_nodes.legend(loc="lower left", fontsize=7)

    names = sorted(node_groups, key=lambda n: (groups.index(node_groups[n]), n))
    for row, node in enumerate(names):
        for window_ in report["windows"][node]:
            end = window_["end"] or marks["complete"]
            drain = window_["drain_seconds"]
            ax_windows.broken_barh([(window_["start"] - zero, drain)], (row - 0.35, 0.7), color="#fdae6b")
            ax_windows.broken_barh([(window_["start"] - zero + drain, end - window_["start"] - drain)],
                                   (row - 0.35, 0.7), color="#e6550d")
    ax_windows.set_yticks(range(len(names)), names, fontsize=8)
    ax_windows.set_xlabel("seconds since the roll started (roll ends at the dotted line)")
    ax_windows.set_ylabel("out of service")
    ax_windows.legend(handles=[plt.Rectangle((0, 0), 1, 1, color="#fdae6b"),
                               plt.Rectangle((0, 0), 1, 1, color="#e6550d")],
                      labels=["finishing its tasks (drain)", "stop, start, health check"], loc="lower right",
                      fontsize=7)
    for ax in (ax_rate, ax_nodes, ax_windows):
        ax.axvline(0, color="black", ls=":", lw=1)
        ax.axvline(marks["roll_end"] - zero, color="black", ls=":", lw=1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    args = parse_args()
    if args.broker_url:
        client = fleetload.FleetClient(args.broker_url, args.result_url or args.broker_url,
                                       json.loads(args.transport_options))
    else:
        client = fleetload.lab_client(args.inventory, PROJECT)
    host_groups = fleetload.worker_groups(args.inventory, PROJECT)
    nodes = fleetload.discover_nodes(client, hosts=host_groups)
    expected = len(nodes)
    node_groups = {node: host_groups[fleetload.node_host(node)] for node in nodes}
    serial = json.loads(args.serial) if args.serial else fleetload.ROLE_DEFAULTS["celery_worker_rolling_serial"]
    allowed = fleetload.allowed_out_of_service(host_groups, serial=serial)
    slots = slots_per_queue(client, nodes)
    if args.mode == "backlog":
        load_kwargs = {"backlog": {q: max(1, round(n * args.backlog_per_slot)) for q, n in slots.items()}}
    else:
        load_kwargs = {"rates": RATES}
    print(f"{expected} nodes, slots per queue {slots}, load {load_kwargs}", flush=True)

    load = fleetload.Load(client, nodes, seed=args.seed, surge=args.surge, **load_kwargs)
    load.start()
    time.sleep(min(10.0, args.steady / 3))
    load.mark("steady_start")
    time.sleep(args.steady - min(10.0, args.steady / 3))
    load.mark("roll_start")
    extra = [arg for value in args.extra_vars for arg in ("--extra-vars", value)] + (
        ["--limit", args.limit] if args.limit else [])
    rc, output = fleetload.run_playbook(args.playbook, *extra, inventory=args.inventory, project=PROJECT)
    load.mark("roll_end")
    if args.playbook_log:
        Path(args.playbook_log).write_text(output)
    time.sleep(args.tail)
    records = load.finish()
    report = fleetload.analyse(load.producer.sent, records, load.monitor.samples, node_groups, load.marks, allowed,
                               load.starts)
    summary = summarise(report, node_groups, restart_timings(output))
    # The samples as analyse() counted them: a short silence of a running process (a slow reply) in service.
    samples, _ = fleetload.resolve_silences(load.monitor.samples, records)

    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    name = f"{Path(args.playbook).stem}-{args.mode}-{stamp}"
    record = {
        "benchmark": "rolling", "playbook": args.playbook, "extra_vars": args.extra_vars, "limit": args.limit,
        "surge": args.surge, "mode": args.mode,
        "load": load_kwargs, "slots_per_queue": slots, "serial": serial, "inventory": args.inventory,
        "playbook_rc": rc, "summary": summary,
        "producer_errors": load.producer.errors, "monitor_errors": load.monitor.errors,
        "report": report,
        "samples": [{"t": s["t"], "in_service": s["in_service"], "surge_in_service": s["surge_in_service"],
                     "depth": s["depth"]} for s in samples],
    }
    (out / f"{name}.json").write_text(json.dumps(record, indent=1, sort_keys=True))
    plot(out / f"{name}.png", report, samples, node_groups,
         f"{args.playbook} under {args.mode} load: {summary['roll_seconds']} s, throughput during roll "
         f"{summary['rolling_over_steady']:.0%} of steady state")
    print(json.dumps(summary, indent=1, sort_keys=True))
    print(f"wrote {out / name}.json and .png")
    if rc != 0:
        print(output[-5000:], file=sys.stderr)
        return 1
    return 0 if summary["lost"] == summary["duplicates"] == summary["started_again"] == 0 else 2


if __name__ == "__main__":
    sys.exit(main())
