#!/usr/bin/env python3
"""A bigger lab, added after inventories/lab: web3 .. webN for CELERY_FLEET_LAB_WEB_HOSTS=N (N > 2; unset or 2: none).

    CELERY_FLEET_LAB_WEB_HOSTS=18 ansible-playbook -i inventories/lab -i inventories/lab-scale playbooks/lab_up.yml

The added hosts run one worker slot each with small limits (concurrency 1, MemoryMax 256M), so that 20 worker hosts
fit on this 2-core, 24 GiB machine; they consume the web group's queues like web1 and web2. benchmarks/bench_scale.py
grows the lab with it; the rolling scenario's bigger-batch case adds web3 and web4.
"""

import json
import os
import sys

MAX_WEB_HOSTS = 60


def inventory(count: int) -> dict:
    hosts = [f"web{number}" for number in range(3, count + 1)]
    return {
        "web": {"hosts": hosts},
        "workers": {"children": ["web"]},
        "_meta": {"hostvars": {
            host: {"ansible_host": f"celery-fleet-lab-{host}",
                   "celery_worker_host_settings": {"concurrency": 1, "memory_max": "256M"}}
            for host in hosts}},
    }


def main() -> None:
    value = os.environ.get("CELERY_FLEET_LAB_WEB_HOSTS", "2").strip() or "2"
    if not value.isdigit() or not 2 <= int(value) <= MAX_WEB_HOSTS:
        sys.exit(f"CELERY_FLEET_LAB_WEB_HOSTS must be a whole number from 2 to {MAX_WEB_HOSTS}, got {value!r}")
    if "--host" in sys.argv:
        print("{}")
        return
    print(json.dumps(inventory(int(value))))


if __name__ == "__main__":
    main()
