#!/usr/bin/env python3
"""How long a `site.yml` with nothing to change takes on the deployed lab, and where the time goes.

Not a test: it measures. Runs site.yml --runs times against the lab inventory (plus any --inventory given, e.g. the
rolling scenario's), checks that nothing changed, and records per run the wall time, the controller's CPU time,
the forks, each host's task counts and the slowest tasks (ansible.posix.profile_tasks). With --strategy mitogen
it runs the same with Mitogen's strategy (pip install mitogen first; a third-party strategy plugin, deprecated by
ansible-core, measured as an option only). Writes a JSON record to benchmarks/results/.

    ./fleet bench-converge --runs 2
    ./fleet bench-converge --runs 2 --strategy mitogen --label mitogen
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
RECAP = re.compile(r"^(\S+)\s+: ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)\s+skipped=(\d+)", re.M)
PROFILE = re.compile(r"^(.+?) -+ (\d+\.\d+)s$", re.M)


def mitogen_strategy_dir() -> str:
    try:
        import ansible_mitogen  # noqa: PLC0415 - optional, only for --strategy mitogen
    except ImportError:
        sys.exit("--strategy mitogen needs Mitogen in the controller's virtualenv: pip install mitogen==0.3.54")
    return str(Path(ansible_mitogen.__file__).parent / "plugins" / "strategy")


def run_once(inventories: list[str], strategy: str, forks: int | None, playbook: str = "site.yml",
             environment: dict | None = None, profile: bool = True) -> dict:
    """One ansible-playbook run of `playbook` against the lab (exits on failure): its wall and controller CPU
    seconds, each host's recap and, with `profile`, the slowest tasks (profile_tasks, which costs time itself)."""
    env = dict(os.environ, ANSIBLE_CONFIG=str(PROJECT / "ansible.cfg"), **(environment or {}))
    if profile:
        env.update(ANSIBLE_CALLBACKS_ENABLED="ansible.posix.profile_tasks", PROFILE_TASKS_TASK_OUTPUT_LIMIT="15")
    env.setdefault("ANSIBLE_VAULT_PASSWORD_FILE", str(PROJECT / "inventories" / "lab" / "lab-vault-password.txt"))
    if strategy == "mitogen":
        env.update(ANSIBLE_STRATEGY_PLUGINS=mitogen_strategy_dir(), ANSIBLE_STRATEGY="mitogen_linear")
    command = [str(Path(sys.executable).parent / "ansible-playbook")]
    for inventory in inventories:
        command += ["-i", inventory]
    if forks:
        command += ["--forks", str(forks)]
    command.append(str(PROJECT / "playbooks" / playbook))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    done = subprocess.run(command, cwd=PROJECT, env=env, capture_output=True, text=True)
    wall = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        sys.exit(f"{playbook} failed (rc {done.returncode}):\n{done.stdout[-4000:]}{done.stderr[-2000:]}")
    hosts = {host: dict(zip(("ok", "changed", "unreachable", "failed", "skipped"), map(int, counts)))
             for host, *counts in RECAP.findall(done.stdout)}
    slowest = [{"task": name.strip(), "seconds": float(seconds)}
               for name, seconds in PROFILE.findall(done.stdout.split("TASKS RECAP")[-1])]
    return {"wall_seconds": round(wall, 1),
            "controller_cpu_seconds": round((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), 1),
            "hosts": hosts, "changed": sum(counts["changed"] for counts in hosts.values()), "slowest": slowest}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inventory", action="append", default=[],
                        help="inventory added after the lab's (e.g. molecule/rolling/inventory)")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--forks", type=int, help="ansible-playbook --forks (default: ansible.cfg's)")
    parser.add_argument("--strategy", choices=["linear", "mitogen"], default="linear")
    parser.add_argument("--label", default="plain")
    parser.add_argument("--output", default=str(PROJECT / "benchmarks" / "results"))
    args = parser.parse_args()
    inventories = [str(PROJECT / "inventories" / "lab")] + args.inventory
    runs = []
    # Timed as an operator runs it (no profiling callback), then once more with profile_tasks for where the time
    # goes (that run is kept apart: the callback's own cost is not in the median).
    for number in range(1, args.runs + 1):
        result = run_once(inventories, args.strategy, args.forks, profile=False)
        runs.append(result)
        print(f"run {number}: {result['wall_seconds']} s wall, controller {result['controller_cpu_seconds']} s CPU, "
              f"changed={result['changed']}, tasks ok per host "
              f"{ {host: counts['ok'] for host, counts in result['hosts'].items()} }")
        if result["changed"]:
            print(f"  not a no-op: {result['changed']} change(s); the first run may apply what the lab lacked")
    profiled = run_once(inventories, args.strategy, args.forks)
    print(f"profiled run (profile_tasks on, not in the median): {profiled['wall_seconds']} s wall; slowest tasks: "
          + "; ".join(f"{task['task']} {task['seconds']} s" for task in profiled["slowest"][:5]))
    record = {"label": args.label, "strategy": args.strategy, "forks": args.forks, "inventories": inventories,
              "cores": os.cpu_count(), "runs": runs, "profiled_run": profiled,
              "median_wall_seconds": statistics.median(run["wall_seconds"] for run in runs),
              "at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    out = Path(args.output) / f"converge-{args.label}-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"median {record['median_wall_seconds']} s over {len(runs)} run(s); record: {out.relative_to(PROJECT)}")


if __name__ == "__main__":
    main()
