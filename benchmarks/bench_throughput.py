#!/usr/bin/env python3
"""The seed's benchmark against the deployed fleet: N `benchmark_task` calls sent, every result awaited.

Not a test: it measures. Runs the seed's `run_benchmark` shape on a lab host (default gpu1, which consumes
none of the queue: the client's CPU is not the workers'), with the host's release and /etc/celery-fleet/celery.env,
so it uses the fleet's own URLs (TLS included when the broker has it) and transport options. Prints each run's
tasks per second and writes a JSON record to benchmarks/results/.

    ./fleet bench-throughput --label tls-on --runs 3
    ./fleet bench-throughput --label vs-bare --runs 3 --compare-bare

With --compare-bare each round runs the fleet, then bare workers (Celery's defaults, started by hand from the same
release on the same hosts), and the record gives the ratio of the medians and a PNG beside the JSON. Each run also
records latency percentiles, send to result.

With --breakdown each round also runs the fleet's own worker started by hand (its command line and environment,
outside the unit: no sandbox, no cgroup limits) and that same worker with one fleet setting put back to Celery's
default at a time, so the record says what each setting costs:

    ./fleet bench-throughput --label breakdown --runs 3 --breakdown

It also runs the fleet's unit with its seccomp filter off, and with its whole sandbox off (UNIT_VARIANTS: a runtime
drop-in, removed after the run), against the unit as deployed.

With --sweep the fleet's worker by hand runs with each pool and concurrency of SWEEP_POOLS (prefork 2/4/8, threads,
gevent where the release has it) against each task size of SWEEP_SIZES (trivial, 10 ms, 100 ms of sleep_task), so the
README's tuning advice rests on this project's numbers:

    ./fleet bench-throughput --label sweep --runs 1 --sweep
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]

# A command line's start on a lab host: as the celery user, from the release (never the current directory), with the
# fleet's environment (celery.env).
AS_WORKER = ("cd /opt/celery-fleet/current && set -a && . /etc/celery-fleet/celery.env && set +a && "
             "exec setpriv --reuid=celery --regid=celery --init-groups env PYTHONSAFEPATH=1 ")

# The client, run with AS_WORKER and the fleet's settings.
CLIENT = r'''
import json, sys, time
from celery.result import ResultSet
from celery_fleet_runtime import app
from celery_fleet_app.tasks import benchmark_task, sleep_task
count, queue, seconds = int(sys.argv[1]), sys.argv[2], float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
sent_at, done_at, tasks = {}, {}, []
start = time.time()
for i in range(count):
    before = time.time()
    task = (sleep_task.apply_async((seconds,), queue=queue) if seconds
            else benchmark_task.apply_async((i,), queue=queue))
    sent_at[task.id] = before
    tasks.append(task)
sent = time.time()
# Results as they arrive (the Redis backend's native join), each stamped: latency is send to result.
ResultSet(tasks).join_native(timeout=300, callback=lambda task_id, value: done_at.__setitem__(task_id, time.time()))
elapsed = time.time() - start
latency = sorted(done_at[task_id] - sent_at[task_id] for task_id in sent_at)
def pct(q):
    return latency[min(len(latency) - 1, int(q * len(latency)))]
print(json.dumps({"tasks": count, "seconds": elapsed, "send_seconds": sent - start, "tasks_per_second": count / elapsed,
                  "latency_p50": pct(0.50), "latency_p95": pct(0.95), "latency_p99": pct(0.99)}))
'''

# A bare worker: Celery's defaults, the operator's app module itself (not the fleet's runtime), the same release venv and
# the same broker and result URLs (celery.env's CELERY_BROKER_URL and CELERY_RESULT_BACKEND, which Celery reads
# itself), started by hand as the worker user: no unit, no hardening, no fleet setting.
BARE = (AS_WORKER + "/opt/celery-fleet/current/venv/bin/celery --app celery_fleet_app worker "
        "-Q {queue} -c {concurrency} -n bare@{host} --loglevel=WARNING > /tmp/celery-fleet-bare.log 2>&1")


def run_once(host: str, tasks: int, queue: str, seconds: float = 0.0) -> dict:
    script = f"{AS_WORKER}/opt/celery-fleet/current/venv/bin/python -c \"$CLIENT\" {tasks} {queue} {seconds}"
    done = subprocess.run(["docker", "exec", "-e", f"CLIENT={CLIENT}", f"celery-fleet-lab-{host}", "bash", "-c", script],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def lab(host: str, *command: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", "exec", *(["-i"] if input is not None else []), f"celery-fleet-lab-{host}",
                           *command], capture_output=True, text=True, check=check, input=input)


def answering(client_host: str, nodes: list[str], timeout: float = 60.0) -> None:
    """Wait until every node answers ping (asked from the client host with the fleet's app)."""
    deadline = time.monotonic() + timeout
    script = (f"{AS_WORKER}/opt/celery-fleet/current/venv/bin/celery --app celery_fleet_runtime:app inspect ping "
              f"-d {','.join(nodes)} --timeout 2 --json")
    while time.monotonic() < deadline:
        done = lab(client_host, "bash", "-c", script, check=False)
        if done.returncode == 0 and all(node in done.stdout for node in nodes):
            return
        time.sleep(1)
    sys.exit(f"{nodes} did not answer ping within {timeout:.0f} s")


# The fleet's worker by hand: the instance's own options and environment (celery.env, instances/<name>.env), under
# another node name, with one setting changed per variant: {variant: (environment overrides, options changed)}.
VARIANTS = {
    "by-hand": ({}, {}),
    "no-acks-late": ({"CELERY_TASK_ACKS_LATE": "false", "CELERY_TASK_REJECT_ON_WORKER_LOST": "false"}, {}),
    "no-task-events": ({"CELERY_FLEET_TASK_EVENTS": "false"}, {}),
    "prefetch-4": ({}, {"--prefetch-multiplier": "4"}),
    "mingle-gossip": ({}, {"--without-mingle": None, "--without-gossip": None}),
    "loglevel-warning": ({}, {"--loglevel": "WARNING"}),
}
# The fleet's unit itself with part of its sandbox taken off: a runtime drop-in (/run, gone at the next boot and
# removed after the run) on every instance, the instances restarted warm. {variant: the drop-in's [Service] lines}.
UNIT_VARIANTS = {
    # Everything systemd enforces with a seccomp filter (hardening.conf; ProtectClock, ProtectKernelModules and
    # ProtectKernelLogs install one too): the filter runs on every system call. (The 2026-11-29 record's run of this
    # variant left those three on; its unit-no-sandbox had none.)
    "unit-no-seccomp": ["SystemCallFilter=", "SystemCallArchitectures=", "RestrictAddressFamilies=",
                        "RestrictNamespaces=no", "RestrictRealtime=no", "RestrictSUIDSGID=no", "LockPersonality=no",
                        "ProtectClock=no", "ProtectKernelModules=no", "ProtectKernelLogs=no"],
    # And the rest of the sandbox (namespaces, read-only file system, private /tmp and /dev).
    "unit-no-sandbox": ["SystemCallFilter=", "SystemCallArchitectures=", "RestrictAddressFamilies=",
                        "RestrictNamespaces=no", "RestrictRealtime=no", "RestrictSUIDSGID=no", "LockPersonality=no",
                        "NoNewPrivileges=no", "ProtectSystem=no", "ProtectHome=no", "PrivateTmp=no",
                        "PrivateDevices=no", "ProtectKernelTunables=no", "ProtectKernelModules=no",
                        "ProtectKernelLogs=no", "ProtectControlGroups=no", "ProtectClock=no", "ProtectHostname=no"],
}
UNIT_DROP_IN = "/run/systemd/system/celery-worker@.service.d/zz-celery-fleet-bench.conf"
# --sweep: pools and concurrencies, each against each task size ({label: seconds of sleep_task, 0: benchmark_task}).
SWEEP_POOLS = {
    "prefork-2": {"--pool": "prefork", "--concurrency": "2"},
    "prefork-4": {"--pool": "prefork", "--concurrency": "4"},
    "prefork-8": {"--pool": "prefork", "--concurrency": "8"},
    "threads-8": {"--pool": "threads", "--concurrency": "8"},
    "gevent-64": {"--pool": "gevent", "--concurrency": "64"},
}
SWEEP_SIZES = {"trivial": 0.0, "10ms": 0.01, "100ms": 0.1}
BY_HAND = ("cd /opt/celery-fleet/current && set -a && . /etc/celery-fleet/celery.env && "
           ". /etc/celery-fleet/instances/{instance}.env && set +a && "
           "exec setpriv --reuid=celery --regid=celery --init-groups env PYTHONSAFEPATH=1 {environment} "
           "/opt/celery-fleet/current/venv/bin/celery --app celery_fleet_runtime:app worker {options} "
           "> /tmp/celery-fleet-bare.log 2>&1")


def variant_options(arguments: str, changes: dict, node: str) -> str:
    """The instance's CELERY_WORKER_ARGS with the variant's changes (None drops an option) and another node name."""
    options = {}
    for argument in arguments.split():
        name, _, value = argument.partition("=")
        options[name] = value or None
    options.update(changes | {"--hostname": node})
    return " ".join(name if value is None else f"{name}={value}" for name, value in options.items()
                    if not (name in changes and changes[name] is None))


def instance_arguments(host: str, instance: str) -> str:
    text = lab(host, "cat", f"/etc/celery-fleet/instances/{instance}.env").stdout
    return next(line.split("=", 1)[1].strip().strip('"') for line in text.splitlines()
                if line.startswith("CELERY_WORKER_ARGS="))


def to_bare(hosts: list[str], client_host: str, queue: str, concurrency: int, variant: str = "bare",
            instance: str = "web") -> None:
    """Stop the fleet's instances on `hosts` (a warm stop) and start a bare worker (or a by-hand variant) on each."""
    for host in hosts:
        if variant == "bare":
            command = BARE.format(queue=queue, concurrency=concurrency, host=host)
        else:
            environment, changes = VARIANTS[variant] if variant in VARIANTS else ({}, SWEEP_POOLS[variant])
            command = BY_HAND.format(instance=instance, environment=" ".join(f"{k}={v}" for k, v in environment.items()),
                                     options=variant_options(instance_arguments(host, instance), changes,
                                                             f"bare@{host}"))
        lab(host, "systemctl", "stop", "celery-workers.target")
        subprocess.run(["docker", "exec", "-d", f"celery-fleet-lab-{host}", "bash", "-c", command], check=True)
    answering(client_host, [f"bare@{host}" for host in hosts])


def unit_variant(hosts: list[str], client_host: str, nodes: list[str], variant: str | None) -> None:
    """Put the runtime drop-in of UNIT_VARIANTS[variant] on the fleet's instances (None: take it off), restart them."""
    for host in hosts:
        if variant:
            text = "\n".join(["[Service]", *UNIT_VARIANTS[variant]]) + "\n"
            lab(host, "bash", "-c", f"mkdir -p {Path(UNIT_DROP_IN).parent} && cat > {UNIT_DROP_IN}", input=text)
        else:
            lab(host, "rm", "-f", UNIT_DROP_IN)
        lab(host, "systemctl", "daemon-reload")
        lab(host, "systemctl", "restart", "celery-workers.target")
    answering(client_host, nodes)


def to_fleet(hosts: list[str], client_host: str, nodes: list[str]) -> None:
    """Stop the bare workers (SIGTERM, waited for) and start the fleet's instances again."""
    for host in hosts:
        # ([w]: the pattern must not match this shell's own command line.)
        lab(host, "bash", "-c", "pkill -TERM -f '[w]orker.*bare@' ; "
                                "while pgrep -f '[w]orker.*bare@' > /dev/null; do sleep 0.2; done",
            check=False)
        lab(host, "systemctl", "start", "celery-workers.target")
    answering(client_host, nodes)


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib  # noqa: PLC0415 - only when a picture is asked for

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    modes = list(dict.fromkeys(run["mode"] for run in runs))
    width = 0.8 / len(modes)
    for index, mode in enumerate(modes):
        colour = f"C{index}"
        mine = [run for run in runs if run["mode"] == mode]
        left.plot([run["round"] for run in mine], [run["tasks_per_second"] for run in mine], "o-", color=colour,
                  label=mode)
        for offset, key in enumerate(("latency_p50", "latency_p95", "latency_p99")):
            right.bar([run["round"] - 0.4 + index * width + offset * width / 3 for run in mine],
                      [run[key] for run in mine], width=width / 3, color=colour, alpha=0.4 + 0.2 * offset)
    left.set(xlabel="round", ylabel="tasks/s", title="throughput")
    left.legend()
    right.set(xlabel="round (modes left to right as in the legend; p50/p95/p99)", ylabel="s, send to result",
              title="latency")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def sweep_tasks(total: int, seconds: float, slots: int) -> int:
    """Tasks for one sweep run: `total` trivial ones, else about 10 s of work for the slots, at least 4 per slot."""
    return total if not seconds else max(4 * slots, min(total, int(10 * slots / seconds)))


def sweep(args, hosts: list[str]) -> None:
    fleet_nodes = [f"web-worker@{host}" for host in hosts]
    runs, skipped = [], {}
    try:
        for number in range(1, args.runs + 1):
            for pool, options in SWEEP_POOLS.items():
                if options["--pool"] in ("gevent", "eventlet") and lab(
                        hosts[0], "/opt/celery-fleet/current/venv/bin/python", "-c", f"import {options['--pool']}",
                        check=False).returncode:
                    skipped[pool] = (f"{options['--pool']} is not in the release (a group with pool "
                                     f"{options['--pool']} installs it)")
                    continue
                to_bare(hosts, args.host, args.queue, args.concurrency, pool, args.instance)
                try:
                    for size, seconds in SWEEP_SIZES.items():
                        slots = int(options["--concurrency"]) * len(hosts)
                        count = sweep_tasks(args.tasks, seconds, slots)
                        result = run_once(args.host, count, args.queue, seconds) | {
                            "mode": f"{pool} {size}", "pool": pool, "size": size, "round": number}
                        result["ideal_tasks_per_second"] = round(slots / seconds, 1) if seconds else None
                        runs.append(result)
                        print(f"{args.label} {pool} {size} run {number}: {count} tasks, "
                              f"{result['tasks_per_second']:.1f} tasks/s"
                              + (f" (ideal {result['ideal_tasks_per_second']})" if seconds else "")
                              + f"; p50/p95/p99 {result['latency_p50']:.3f}/{result['latency_p95']:.3f}/"
                                f"{result['latency_p99']:.3f} s", flush=True)
                finally:
                    to_fleet(hosts, args.host, fleet_nodes)
    finally:
        to_fleet(hosts, args.host, fleet_nodes)
    table = {}
    for run in runs:
        table.setdefault(run["pool"], {}).setdefault(run["size"], []).append(run["tasks_per_second"])
    medians = {pool: {size: round(statistics.median(values), 1) for size, values in sizes.items()}
               for pool, sizes in table.items()}
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    record = {"label": args.label, "benchmark": "sweep", "host": args.host, "queue": args.queue, "worker_hosts": hosts,
              "pools": SWEEP_POOLS, "sizes": SWEEP_SIZES, "runs": runs, "median_tasks_per_second": medians,
              "skipped": skipped, "at": stamp}
    print(f"{args.label}: median tasks/s per pool and task size {json.dumps(medians)}"
          + (f"; skipped {json.dumps(skipped)}" if skipped else ""))
    output = Path(args.output) / f"throughput-{args.label}-{stamp}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(record, indent=2) + "\n")
    plot_sweep(medians, output.with_suffix(".png"))
    print(f"record: {output}")


def plot_sweep(medians: dict, path: Path) -> None:
    import matplotlib  # noqa: PLC0415 - only when a picture is asked for

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(1, len(SWEEP_SIZES), figsize=(4 * len(SWEEP_SIZES), 4))
    for ax, size in zip(axes, SWEEP_SIZES):
        pools = [pool for pool in medians if size in medians[pool]]
        ax.bar(pools, [medians[pool][size] for pool in pools], color=[f"C{i}" for i in range(len(pools))])
        ax.set(title=f"task: {size}", ylabel="tasks/s")
        ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="gpu1", help="lab host the client runs on")
    parser.add_argument("--queue", default="default", help="queue the tasks go to (default: the web group's)")
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=3, help="runs (with --compare-bare: rounds of one run each)")
    parser.add_argument("--label", default="fleet", help="what this run measures (e.g. tls-on), in the record")
    parser.add_argument("--compare-bare", action="store_true",
                        help="alternate with bare workers (Celery's defaults) on the --worker-hosts, same release")
    parser.add_argument("--worker-hosts", default="web1,web2", help="hosts whose fleet nodes consume --queue")
    parser.add_argument("--concurrency", type=int, default=8, help="the bare workers' concurrency (the fleet's)")
    parser.add_argument("--breakdown", action="store_true",
                        help="also the fleet's worker by hand, and with each setting at Celery's default (VARIANTS)")
    parser.add_argument("--modes", help="with --breakdown: only these of fleet, bare, VARIANTS and UNIT_VARIANTS "
                                        "(comma-separated; default all)")
    parser.add_argument("--instance", default="web", help="the worker hosts' instance the by-hand variants copy")
    parser.add_argument("--sweep", action="store_true",
                        help="the fleet's worker by hand with each pool of SWEEP_POOLS, against each task size")
    parser.add_argument("--output", default=str(PROJECT / "benchmarks" / "results"))
    args = parser.parse_args()
    # A SIGTERM (a timeout, a CI's kill) raises SystemExit as Ctrl-C raises KeyboardInterrupt: the finally clauses below
    # put the fleet's own instances back instead of leaving the lab on bare workers, or none.
    signal.signal(signal.SIGTERM, lambda number, frame: sys.exit(128 + number))
    hosts = args.worker_hosts.split(",")
    if args.sweep:
        return sweep(args, hosts)
    fleet_nodes = [f"web-worker@{host}" for host in hosts]
    modes = ["fleet"] + (["bare"] if args.compare_bare or args.breakdown else []) + (
        list(VARIANTS) + list(UNIT_VARIANTS) if args.breakdown else [])
    if args.modes:
        unknown = set(args.modes.split(",")) - set(modes)
        if unknown or "fleet" not in args.modes.split(","):
            sys.exit(f"--modes: {sorted(unknown)} unknown, or fleet missing; choose from {modes}")
        modes = [mode for mode in modes if mode in args.modes.split(",")]
    runs = []
    try:
        for number in range(1, args.runs + 1):
            for mode in modes:
                if mode in UNIT_VARIANTS:
                    unit_variant(hosts, args.host, fleet_nodes, mode)
                elif mode != "fleet":
                    to_bare(hosts, args.host, args.queue, args.concurrency, mode, args.instance)
                result = run_once(args.host, args.tasks, args.queue) | {"mode": mode, "round": number}
                if mode in UNIT_VARIANTS:
                    unit_variant(hosts, args.host, fleet_nodes, None)
                elif mode != "fleet":
                    to_fleet(hosts, args.host, fleet_nodes)
                runs.append(result)
                print(f"{args.label} {mode} run {number}: {result['tasks']} tasks in {result['seconds']:.2f} s "
                      f"({result['tasks_per_second']:.1f} tasks/s; sent in {result['send_seconds']:.2f} s; "
                      f"p50/p95/p99 {result['latency_p50']:.3f}/{result['latency_p95']:.3f}/"
                      f"{result['latency_p99']:.3f} s)", flush=True)
    finally:
        if len(modes) > 1:  # never leave the lab on bare workers, or on a unit variant
            to_fleet(hosts, args.host, fleet_nodes)
            if any(mode in UNIT_VARIANTS for mode in modes):
                # (Restarted, not just started: an instance still running under a variant's drop-in keeps it.)
                unit_variant(hosts, args.host, fleet_nodes, None)
    medians = {mode: statistics.median(run["tasks_per_second"] for run in runs if run["mode"] == mode)
               for mode in modes}
    record = {"label": args.label, "host": args.host, "queue": args.queue, "runs": runs,
              "median_tasks_per_second": medians["fleet"], "medians": medians,
              "variants": {name: {"environment": environment, "options": options}
                           for name, (environment, options) in VARIANTS.items() if name in modes}
              | {name: {"unit_drop_in": lines} for name, lines in UNIT_VARIANTS.items() if name in modes}}
    if "bare" in medians:
        record["ratio_fleet_to_bare"] = round(medians["fleet"] / medians["bare"], 3)
    if args.breakdown:
        # What each setting costs: the by-hand worker against itself with that one setting at Celery's default;
        # the unit's sandbox: the fleet's unit against itself with part of it off.
        if "by-hand" in medians:
            record["ratio_to_by_hand"] = {mode: round(medians[mode] / medians["by-hand"], 3) for mode in modes}
        record["ratio_to_fleet"] = {mode: round(medians[mode] / medians["fleet"], 3) for mode in modes}
    print(f"{args.label}: median tasks/s {json.dumps(medians)}"
          + (f", fleet/bare {record['ratio_fleet_to_bare']}" if "bare" in medians else "")
          + (f", each against by-hand {json.dumps(record.get('ratio_to_by_hand'))}, against the fleet's unit "
             f"{json.dumps(record['ratio_to_fleet'])}" if args.breakdown else ""))
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    record["at"] = stamp
    output = Path(args.output) / f"throughput-{args.label}-{stamp}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(record, indent=2) + "\n")
    if len(modes) > 1:
        plot(runs, output.with_suffix(".png"))
    print(f"record: {output}")


if __name__ == "__main__":
    main()
