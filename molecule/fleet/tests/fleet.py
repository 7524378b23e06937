"""Helpers shared by the fleet tests: run Python with the fleet's app on a worker host."""

import base64
import json
import os
from pathlib import Path

import testinfra

PROJECT = Path(os.environ.get("MOLECULE_PROJECT_DIRECTORY", Path(__file__).resolve().parents[3]))
INVENTORY = str(PROJECT / "inventories" / "lab")
VENV_PYTHON = "/opt/celery-fleet/current/venv/bin/python"
ENV_FILE = "/etc/celery-fleet/celery.env"

# What the mission's defaults and the lab inventory ask for.
EXPECTED_NODES = {
    "web-worker@web1": {"group": "web", "queues": {"default", "priority"}, "concurrency": 8},
    "web-worker@web2": {"group": "web", "queues": {"default", "priority"}, "concurrency": 8},
    "batch-worker@batch1": {"group": "batch", "queues": {"batch"}, "concurrency": 4},
    "gpu-worker-1@gpu1": {"group": "gpu", "queues": {"ml"}, "concurrency": 1},
    "gpu-worker-2@gpu1": {"group": "gpu", "queues": {"ml"}, "concurrency": 1},
}


def lab_host(name):
    return testinfra.get_host(f"ansible://{name}", ansible_inventory=INVENTORY)


def run_python(host, code, timeout=60):
    """Run code with the release's Python and the fleet's environment; it prints one JSON value."""
    encoded = base64.b64encode(code.encode()).decode()
    command = (
        f"set -a; . {ENV_FILE}; set +a; "
        f"timeout {timeout} {VENV_PYTHON} -c \"import base64; exec(base64.b64decode('{encoded}'))\""
    )
    result = host.run(command)
    assert result.rc == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def control(host, method, timeout=3):
    """Celery's inspect/ping over the broker, from a worker host: {node: reply}."""
    return run_python(host, f"""
import json
from celery_fleet_runtime import app
if {method!r} == "ping":
    replies = {{}}
    for reply in app.control.ping(timeout={timeout}):
        replies.update(reply)
else:
    replies = getattr(app.control.inspect(timeout={timeout}), {method!r})() or {{}}
print(json.dumps(replies))
""")


def redis_cli(host, *arguments, user="celery-admin", password=None, address=None):
    """redis-cli on `host` as a Redis ACL user (the broker's admin by default), the password on stdin
    (--askpass), never on its command line. Returns the command's result (rc, stdout, stderr)."""
    if password is None:
        secrets = lab_host("broker1").ansible.get_variables()
        password = secrets["vault_celery_broker_admin_password" if user == "celery-admin"
                           else "vault_celery_broker_password"]
    encoded = base64.b64encode(f"{password}\n".encode()).decode()
    target = f"-h {address} " if address else ""
    # A broker with TLS (celery_broker_tls) has no plain port: over TLS, checked against the CA this host holds.
    if lab_host("broker1").run("grep -q '^tls-port ' /etc/redis/redis.conf").rc == 0:
        ca = next(path for path in ("/etc/redis/tls/ca.crt", "/etc/celery-fleet/broker-ca.crt") if host.file(path).exists)
        target += f"--tls --cacert {ca} "
    words = " ".join(f"'{argument}'" for argument in arguments)
    return host.run(f"echo {encoded} | base64 -d | redis-cli --no-auth-warning {target}--user {user} --askpass {words}")

# The monitor host's helpers live with the rolling scenario's in tests/support/fleetlab.py.
from fleetlab import EXPORTER, MONITOR, PROMETHEUS, exporter_samples, monitor_get, promql, wait_for  # noqa: E402,F401
