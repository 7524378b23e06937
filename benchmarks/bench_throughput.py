#!/usr/bin/env python3
"""The seed's benchmark against the deployed fleet: N `benchmark_task` calls sent, every result awaited.

Not a test: it measures. Runs the seed's `run_benchmark` shape on a lab host (default gpu1, which consumes
none of the queue: the client's CPU is not the workers'), with the host's release and /etc/celery-fleet/celery.env,
so it uses the fleet's own URLs (TLS included when the broker has it) and transport options. Prints each run's
tasks per second and latency percentiles (send to result stored, from each result's date_done), and writes a
JSON record (and with several variants a PNG) to benchmarks/results/.

    ./fleet bench-throughput --label tls-on --runs 3
    ./fleet bench-throughput --variants fleet,bare,bare-args,runtime --runs 3

--variants runs, in each round and in turn, the web group's workers as:
  fleet      the deployed instances (systemd units, the fleet's runtime, arguments and hardening);
  bare       `celery -A <the operator's app> worker -Q default -c <concurrency>` started by hand on the same
             hosts from the same release, with Celery's defaults and only the broker and result URLs;
  bare-args  bare plus the fleet's worker arguments (log level, time limits, prefetch, without mingle/gossip);
  runtime    the fleet's runtime and arguments (its settings: late acks, reject on worker lost, transport
             options, result expiry), outside systemd: what is left between it and fleet is the unit's
             sandbox and journald.
The alternation spreads the lab's noise over every variant; medians and the ratio to bare are printed.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
VARIANTS = ("fleet", "bare", "bare-args", "runtime")
BENCH_NODE = "bench"  # node name of the hand-started workers: bench@<host>

# Run on the lab host as the celery user, from the release (never the current directory), with the fleet's settings.
CLIENT = r'''
import json, sys, time
from datetime import timezone
from celery_fleet_runtime import app
from celery_fleet_app.tasks import benchmark_task
count, queue = int(sys.argv[1]), sys.argv[2]
start = time.time()
tasks, sent_at = [], []
for i in range(count):
    sent_at.append(time.time())
    tasks.append(benchmark_task.apply_async((i,), queue=queue))
sent = time.time()
for task in tasks:
    task.get(timeout=120)
elapsed = time.time() - start
latencies = []
for task, at in zip(tasks, sent_at):
    done = task.date_done
    if isinstance(done, str):
        from datetime import datetime
        done = datetime.fromisoformat(done)
    if done.tzinfo is None:
        done = done.replace(tzinfo=timezone.utc)
    latencies.append(done.timestamp() - at)
latencies.sort()
pick = lambda q: round(latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000, 1)
print(json.dumps({"tasks": count, "seconds": elapsed, "send_seconds": sent - start, "tasks_per_second": count / elapsed,
                  "latency_ms": {"p50": pick(0.50), "p95": pick(0.95), "p99": pick(0.99)}}))
'''


def lab(host: str, script: str, check: bool = True, **options) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", "exec", f"celery-fleet-lab-{host}", "bash", "-c", script], capture_output=True,
                          text=True, check=check, **options)


def run_once(host: str, tasks: int, queue: str) -> dict:
    script = ("cd /opt/celery-fleet/current && set -a && . /etc/celery-fleet/celery.env && set +a && "
              "exec setpriv --reuid=celery --regid=celery --init-groups env PYTHONSAFEPATH=1 "
              f"/opt/celery-fleet/current/venv/bin/python -c \"$CLIENT\" {tasks} {queue}")
    done = subprocess.run(["docker", "exec", "-e", f"CLIENT={CLIENT}", f"celery-fleet-lab-{host}", "bash", "-c", script],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def hand_worker_command(variant: str, host: str, queue: str, instance: str) -> str:
    """The shell command that starts `variant`'s worker on `host` by hand (as the celery user, from the
    release, with the fleet's URLs), in the foreground."""
    env = lab(host, f"set -a && . /etc/celery-fleet/celery.env && . /etc/celery-fleet/instances/{instance}.env && "
                    "set +a && env -0").stdout
    environ = dict(item.split("=", 1) for item in env.split("\0") if "=" in item)
    fleet_args = [arg for arg in shlex.split(environ["CELERY_WORKER_ARGS"])
                  if not arg.startswith(("--hostname=", "--queues="))]
    concurrency = next(arg.split("=", 1)[1] for arg in fleet_args if arg.startswith("--concurrency="))
    node = ["--hostname", f"{BENCH_NODE}@{host}", "--queues", queue]
    urls = {name: environ[name] for name in ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND")}
    if variant == "runtime":
        keep = {name: value for name, value in environ.items()
                if name.startswith(("CELERY", "PYTHONPATH")) and name != "CELERY_WORKER_ARGS"}
        app, args = "celery_fleet_runtime:app", fleet_args
    else:
        keep, app = urls, environ["CELERY_FLEET_APP"]
        args = fleet_args if variant == "bare-args" else ["--concurrency", concurrency]
    assignments = " ".join(f"{name}={shlex.quote(value)}" for name, value in sorted(keep.items()))
    return ("cd /opt/celery-fleet/current && exec setpriv --reuid=celery --regid=celery --init-groups "
            f"env -i PATH=/usr/bin:/bin HOME=/tmp PYTHONSAFEPATH=1 {assignments} "
            f"/opt/celery-fleet/current/venv/bin/celery --app {shlex.quote(app)} worker "
            + " ".join(shlex.quote(arg) for arg in [*node, *args]))


def wait_for(client_host: str, nodes: list[str], timeout: float = 60.0) -> float:
    """Seconds until every node of `nodes` answers ping (through the fleet's celery-fleet command)."""
    started = time.monotonic()
    while True:
        done = lab(client_host, f"celery-fleet inspect ping --timeout 1 --destination {','.join(nodes)} --json",
                   check=False)
        try:
            replies = json.loads(done.stdout.strip().splitlines()[-1]) if done.stdout.strip() else {}
        except json.JSONDecodeError:
            replies = {}
        if set(nodes) <= set(replies):
            return round(time.monotonic() - started, 1)
        if time.monotonic() - started > timeout:
            raise SystemExit(f"{nodes} did not answer within {timeout} s: {done.stdout[-500:]} {done.stderr[-500:]}")
        time.sleep(0.5)


def stop_hand_workers(hosts: list[str]) -> None:
    """SIGTERM (a warm shutdown) to the hand-started workers, SIGKILL after 20 s."""
    # "[b]ench@" matches the workers' command lines and not this shell's own.
    pattern = f"--hostname [{BENCH_NODE[0]}]{BENCH_NODE[1:]}@"
    for host in hosts:
        lab(host, f"pkill -TERM -f -- '{pattern}' ; "
                  f"for i in $(seq 100); do pgrep -f -- '{pattern}' >/dev/null || exit 0; sleep 0.2; done; "
                  f"pkill -KILL -f -- '{pattern}'", check=False)


def plot(path: Path, record: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(record["variants"])
    figure, (throughput, latency) = plt.subplots(1, 2, figsize=(11, 4))
    for index, variant in enumerate(variants):
        runs = record["variants"][variant]["runs"]
        throughput.scatter([index] * len(runs), [run["tasks_per_second"] for run in runs], color="tab:blue")
        throughput.hlines(record["variants"][variant]["median_tasks_per_second"], index - 0.3, index + 0.3,
                          color="tab:red")
        for offset, quantile in zip((-0.2, 0, 0.2), ("p50", "p95", "p99")):
            latency.bar(index + offset, statistics.median(run["latency_ms"][quantile] for run in runs), width=0.2,
                        label=quantile if index == 0 else None, color={"p50": "tab:green", "p95": "tab:orange",
                                                                      "p99": "tab:red"}[quantile])
    for axis, title in ((throughput, "tasks/s (dots: runs, line: median)"), (latency, "send to result, ms (median)")):
        axis.set_xticks(range(len(variants)), variants)
        axis.set_title(title)
    latency.legend()
    figure.suptitle(f"{record['tasks']} benchmark_task on {record['hosts']} ({record['queue']}), client {record['host']}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="gpu1", help="lab host the client runs on")
    parser.add_argument("--queue", default="default", help="queue the tasks go to (default: the web group's)")
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=3, help="rounds (each runs every variant once)")
    parser.add_argument("--label", default="fleet", help="what this run measures (e.g. tls-on), in the record")
    parser.add_argument("--variants", default="fleet", help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--hosts", default="web1,web2", help="the hosts whose workers consume --queue")
    parser.add_argument("--instance", default="web", help="the worker instance on those hosts (its unit's name)")
    parser.add_argument("--output", default=str(PROJECT / "benchmarks" / "results"))
    args = parser.parse_args()
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"--variants: unknown {unknown}; allowed: {', '.join(VARIANTS)}")
    hosts = args.hosts.split(",")
    unit = f"celery-worker@{args.instance}.service"
    results = {variant: [] for variant in variants}
    try:
        for number in range(1, args.runs + 1):
            for variant in variants:
                started = None
                if variant != "fleet":
                    for host in hosts:
                        lab(host, f"systemctl stop {unit}")
                    for host in hosts:
                        command = hand_worker_command(variant, host, args.queue, args.instance)
                        subprocess.run(["docker", "exec", "-d", f"celery-fleet-lab-{host}", "bash", "-c",
                                        f"{command} > /tmp/bench-worker.log 2>&1"], check=True)
                    started = wait_for(args.host, [f"{BENCH_NODE}@{host}" for host in hosts])
                result = run_once(args.host, args.tasks, args.queue)
                if variant != "fleet":
                    stop_hand_workers(hosts)
                    for host in hosts:
                        lab(host, f"systemctl start {unit}")
                    wait_for(args.host, [f"{args.instance}-worker@{host}" for host in hosts])
                results[variant].append({**result, "answered_after_s": started})
                print(f"{variant} run {number}: {result['tasks']} tasks in {result['seconds']:.2f} s "
                      f"({result['tasks_per_second']:.1f} tasks/s; latency p50/p95/p99 "
                      f"{result['latency_ms']['p50']}/{result['latency_ms']['p95']}/{result['latency_ms']['p99']} ms)",
                      flush=True)
    finally:
        if variants != ["fleet"]:
            stop_hand_workers(hosts)
            for host in hosts:
                lab(host, f"systemctl start {unit}", check=False)
    summary = {variant: {"runs": runs, "median_tasks_per_second": statistics.median(r["tasks_per_second"] for r in runs)}
               for variant, runs in results.items()}
    for variant, entry in summary.items():
        ratio = (f"; {entry['median_tasks_per_second'] / summary['bare']['median_tasks_per_second']:.2f}x bare"
                 if "bare" in summary else "")
        print(f"{variant}: median {entry['median_tasks_per_second']:.1f} tasks/s over {len(entry['runs'])} runs{ratio}")
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    if variants == ["fleet"]:
        record = {"label": args.label, "host": args.host, "queue": args.queue, "runs": results["fleet"],
                  "median_tasks_per_second": summary["fleet"]["median_tasks_per_second"], "at": stamp}
        output = out / f"throughput-{args.label}-{stamp}.json"
    else:
        record = {"label": args.label, "host": args.host, "hosts": args.hosts, "queue": args.queue, "tasks": args.tasks,
                  "variants": summary, "at": stamp}
        if "bare" in summary:
            record["ratio_to_bare"] = {variant: round(entry["median_tasks_per_second"]
                                                      / summary["bare"]["median_tasks_per_second"], 3)
                                       for variant, entry in summary.items()}
        output = out / f"compare-{args.label}-{stamp}.json"
        plot(output.with_suffix(".png"), record)
    output.write_text(json.dumps(record, indent=2) + "\n")
    print(f"record: {output.relative_to(PROJECT)}")


if __name__ == "__main__":
    main()
