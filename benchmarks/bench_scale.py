#!/usr/bin/env python3
"""How the cost of a deploy, a no-op deploy and a rolling restart grows with the number of worker hosts.

Not a test: it measures. For each size (worker hosts: web1..webN plus batch1 and gpu1, the web hosts beyond two from
inventories/lab-scale, one slot each), it boots a fresh lab of that size, times the first site.yml (the controller's
wheelhouse cache as it is: cold only for the first size after --cold-cache), --noop-runs no-op site.yml runs
(changed=0 required) and one rolling_restart.yml, each with its wall time and the controller's CPU time, at the
given --forks. Writes a JSON record and a PNG (wall time against worker hosts) to benchmarks/results/, and leaves
the lab at the last size (./fleet down, or ./fleet lab for the usual five hosts).

    ./fleet bench-scale --sizes 5,10,20
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path

from bench_converge import PROJECT, run_once

BASE_WORKER_HOSTS = 4  # web1, web2, batch1, gpu1
FIXED_WORKER_HOSTS = 2  # batch1, gpu1: every other worker host is a web host
INVENTORIES = [str(PROJECT / "inventories" / "lab"), str(PROJECT / "inventories" / "lab-scale")]


def lab(playbook: str, environment: dict) -> None:
    run_once(INVENTORIES, "linear", None, playbook, environment)


INOTIFY_INSTANCES = Path("/proc/sys/fs/inotify/max_user_instances")
# Each container's systemd watches paths with inotify instances of the host's root user: 22 containers outgrow
# the kernel's default 128 (their .path units fail at boot: systemd "degraded").
INOTIFY_NEEDED = 1024


def raise_inotify_limit() -> None:
    if int(INOTIFY_INSTANCES.read_text()) < INOTIFY_NEEDED:
        try:
            INOTIFY_INSTANCES.write_text(f"{INOTIFY_NEEDED}\n")
        except OSError as error:
            sys.exit(f"fs.inotify.max_user_instances must be at least {INOTIFY_NEEDED} for a bigger lab "
                     f"(sysctl -w fs.inotify.max_user_instances={INOTIFY_NEEDED}): {error}")
        print(f"fs.inotify.max_user_instances raised to {INOTIFY_NEEDED} (each container's systemd uses some)")


def measure(size: int, forks: int | None, noop_runs: int) -> dict:
    environment = {"CELERY_FLEET_LAB_WEB_HOSTS": str(size - FIXED_WORKER_HOSTS)}
    lab("lab_down.yml", environment)
    lab("lab_up.yml", environment)
    phases = {"first_deploy": run_once(INVENTORIES, "linear", forks, "site.yml", environment)}
    noops = [run_once(INVENTORIES, "linear", forks, "site.yml", environment) for _ in range(noop_runs)]
    changed = [run["changed"] for run in noops]
    if any(changed):
        sys.exit(f"{size} worker hosts: a no-op site.yml changed something ({changed})")
    phases["noop_converge"] = min(noops, key=lambda run: run["wall_seconds"]) | {
        "runs_wall_seconds": [run["wall_seconds"] for run in noops]}
    phases["rolling_restart"] = run_once(INVENTORIES, "linear", forks, "rolling_restart.yml", environment)
    for run in phases.values():
        run.pop("hosts", None)
    return {"worker_hosts": size, "forks": forks, "phases": phases}


def plot(record: dict, path: Path) -> None:
    import matplotlib  # noqa: PLC0415 - only for the picture

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axis = plt.subplots(figsize=(7, 4.5))
    sizes = [entry["worker_hosts"] for entry in record["sizes"]]
    for phase, label in (("first_deploy", "first deploy"), ("noop_converge", "no-op site.yml"),
                         ("rolling_restart", "rolling restart")):
        axis.plot(sizes, [entry["phases"][phase]["wall_seconds"] for entry in record["sizes"]], "o-", label=label)
        axis.plot(sizes, [entry["phases"][phase]["controller_cpu_seconds"] for entry in record["sizes"]], ":",
                  color=axis.lines[-1].get_color(), alpha=0.6)
    axis.set(xlabel="worker hosts", ylabel="s (solid: wall; dotted: controller CPU)",
             title=f"celery-fleet lab, {record['cores']} controller cores, forks {record['forks'] or 'ansible.cfg'}")
    axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="5,10,20", help="worker host counts, each at least 4")
    parser.add_argument("--forks", type=int, help="ansible-playbook --forks (default: ansible.cfg's, 25)")
    parser.add_argument("--noop-runs", type=int, default=2)
    parser.add_argument("--cold-cache", action="store_true",
                        help="empty the controller's wheelhouse cache first (the first size's deploy builds it)")
    parser.add_argument("--label", default="scale")
    parser.add_argument("--output", default=str(PROJECT / "benchmarks" / "results"))
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    if any(size < BASE_WORKER_HOSTS for size in sizes):
        sys.exit(f"--sizes: each at least {BASE_WORKER_HOSTS} worker hosts (web1, web2, batch1, gpu1)")
    if args.cold_cache:
        shutil.rmtree(PROJECT / ".cache" / "wheelhouse", ignore_errors=True)
    record = {"label": args.label, "forks": args.forks, "cores": len(os.sched_getaffinity(0)),
              "sizes": [], "at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    raise_inotify_limit()
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    output = Path(args.output) / f"scale-{args.label}-{stamp}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    for size in sizes:
        entry = measure(size, args.forks, args.noop_runs)
        record["sizes"].append(entry)
        print(f"{size} worker hosts: " + ", ".join(
            f"{phase} {run['wall_seconds']} s (controller CPU {run['controller_cpu_seconds']} s)"
            for phase, run in entry["phases"].items()), flush=True)
        # Written after each size: a later size that fails leaves the earlier ones on record.
        output.write_text(json.dumps(record, indent=2) + "\n")
    if len(sizes) > 1:
        first, last = record["sizes"][0], record["sizes"][-1]
        record["noop_seconds_per_added_worker_host"] = round(
            (last["phases"]["noop_converge"]["wall_seconds"] - first["phases"]["noop_converge"]["wall_seconds"])
            / (last["worker_hosts"] - first["worker_hosts"]), 2)
        print(f"no-op site.yml grows by {record['noop_seconds_per_added_worker_host']} s per added worker host")
    output.write_text(json.dumps(record, indent=2) + "\n")
    plot(record, output.with_suffix(".png"))
    print(f"record: {output}")


if __name__ == "__main__":
    main()
