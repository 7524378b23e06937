#!/usr/bin/env python3
"""The seed's benchmark against the deployed fleet: N `benchmark_task` calls sent, every result awaited.

Not a test: it measures. Runs the seed's `run_benchmark` shape on a lab host (default gpu1, which consumes
none of the queue: the client's CPU is not the workers'), with the host's release and /etc/celery-fleet/celery.env,
so it uses the fleet's own URLs (TLS included when the broker has it) and transport options. Prints each run's
tasks per second and writes a JSON record to benchmarks/results/.

    ./fleet bench-throughput --label tls-on --runs 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
from datetime import datetime, timezone
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]

# Run on the lab host as the celery user, from the release (never the current directory), with the fleet's settings.
CLIENT = r'''
import json, sys, time
from celery_fleet_runtime import app
from celery_fleet_app.tasks import benchmark_task
count, queue = int(sys.argv[1]), sys.argv[2]
start = time.time()
tasks = [benchmark_task.apply_async((i,), queue=queue) for i in range(count)]
sent = time.time()
for task in tasks:
    task.get(timeout=120)
elapsed = time.time() - start
print(json.dumps({"tasks": count, "seconds": elapsed, "send_seconds": sent - start, "tasks_per_second": count / elapsed}))
'''


def run_once(host: str, tasks: int, queue: str) -> dict:
    script = ("cd /opt/celery-fleet/current && set -a && . /etc/celery-fleet/celery.env && set +a && "
              "exec setpriv --reuid=celery --regid=celery --init-groups env PYTHONSAFEPATH=1 "
              f"/opt/celery-fleet/current/venv/bin/python -c \"$CLIENT\" {tasks} {queue}")
    done = subprocess.run(["docker", "exec", "-e", f"CLIENT={CLIENT}", f"celery-fleet-lab-{host}", "bash", "-c", script],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="gpu1", help="lab host the client runs on")
    parser.add_argument("--queue", default="default", help="queue the tasks go to (default: the web group's)")
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--label", default="fleet", help="what this run measures (e.g. tls-on), in the record")
    parser.add_argument("--output", default=str(PROJECT / "benchmarks" / "results"))
    args = parser.parse_args()
    runs = []
    for number in range(1, args.runs + 1):
        result = run_once(args.host, args.tasks, args.queue)
        runs.append(result)
        print(f"{args.label} run {number}: {result['tasks']} tasks in {result['seconds']:.2f} s "
              f"({result['tasks_per_second']:.1f} tasks/s; sent in {result['send_seconds']:.2f} s)", flush=True)
    median = statistics.median(run["tasks_per_second"] for run in runs)
    print(f"{args.label}: median {median:.1f} tasks/s over {len(runs)} runs")
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    output = Path(args.output) / f"throughput-{args.label}-{stamp}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"label": args.label, "host": args.host, "queue": args.queue, "runs": runs,
                                  "median_tasks_per_second": median, "at": stamp}, indent=2) + "\n")
    print(f"record: {output}")


if __name__ == "__main__":
    main()
