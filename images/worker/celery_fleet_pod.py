"""The worker pod's hooks: ``python -m celery_fleet_pod drain|ready|alive``.

The same control code the roles run (celery_control, the Ansible module's functions), asked about this pod's
own node: CELERY_FLEET_NODE_NAME (the group's node name, %h expanded as Celery expands it for --hostname, so
to the pod's name), CELERY_FLEET_QUEUES (what it consumes), CELERY_BROKER_URL and
CELERY_BROKER_TRANSPORT_OPTIONS (the fleet's, from the pod's ConfigMap and Secret).

drain: the preStop hook. Cancels the node's consumers (confirmed by the node), then waits until it holds no
reserved and no active task, at most CELERY_FLEET_DRAIN_SECONDS (the systemd roll's drain deadline); the
kubelet's SIGTERM then makes Celery's warm shutdown quick. Whatever is still running then finishes within the
grace period (sized for it); reserved tasks of a drain that ran out go back to the queue on the warm shutdown.
ready: the node answers and consumes every queue of its group (a drained node is not ready).
alive: the node answers ping. When the ping fails or the broker does not answer, the probe cannot tell, and says
alive: restarting every worker of a fleet whose broker is down or full would not bring it back.
Exit status 0 is success; every outcome is one JSON line on stdout.
"""

import json
import os
import sys
import time

import celery_control
from celery.utils.nodenames import host_format

# A control call that gets no answer from the broker in this long ends the hook (the probes' timeouts are above).
CALL_TIMEOUT = 2.0
CALL_DEADLINE = 8.0


def node_name(environ):
    return host_format(environ["CELERY_FLEET_NODE_NAME"])


def queues_of(environ):
    """The queues the pod's node consumes, sorted (CELERY_FLEET_QUEUES: as --queues has them)."""
    return sorted(queue for queue in environ.get("CELERY_FLEET_QUEUES", "").split(",") if queue)


def _app(environ):
    return celery_control.client_app(environ["CELERY_BROKER_URL"],
                                      json.loads(environ.get("CELERY_BROKER_TRANSPORT_OPTIONS") or "{}"))


def drain(app, environ):
    node = node_name(environ)
    queues = queues_of(environ)
    wait = float(environ.get("CELERY_FLEET_DRAIN_SECONDS") or 0)
    started = time.monotonic()
    celery_control.within(CALL_DEADLINE, celery_control.run, app, "cancel_consumer", "active", [node], queues,
                          CALL_TIMEOUT)
    left = max(wait - (time.monotonic() - started), 1.0)
    outcome = celery_control.within(left + CALL_DEADLINE, celery_control.wait_drained, app, [node], left, 1.0, 0.5)
    return {"node": node, "cancelled": queues, "drained": outcome["drained"],
            "seconds": round(time.monotonic() - started, 2), "pending": outcome["replies"].get(node)}


def ready(app, environ):
    node = node_name(environ)
    queues = queues_of(environ)
    outcome = celery_control.within(CALL_DEADLINE, celery_control.wait_consuming, app, [node], queues, 0,
                                    CALL_TIMEOUT)
    return {"node": node, "ready": outcome["consuming"],
            "consuming": sorted(queue["name"] for queue in outcome["replies"].get(node) or [])}


def alive(app, environ):
    node = node_name(environ)
    try:
        replies = celery_control.within(CALL_DEADLINE, celery_control.run, app, "ping", "active", [node], None,
                                        CALL_TIMEOUT)[1]
        if node in replies:
            return {"node": node, "alive": True, "broker": "answers"}
        # No reply: dead only if the broker itself answers (a broker that refuses writes, a full one, fails
        # the ping for every pod alike, and restarting them all would not help).
        celery_control.within(CALL_DEADLINE, _broker_answers, app)
    except Exception as error:  # noqa: BLE001 - any broker failure means "cannot tell"
        return {"node": node, "alive": True, "broker": f"cannot tell: {error}"}
    return {"node": node, "alive": False, "broker": "answers"}


def _broker_answers(app):
    with app.connection_for_write() as connection:
        connection.ensure_connection(max_retries=1)
        connection.default_channel.client.ping()
    return True


COMMANDS = {"drain": (drain, "drained"), "ready": (ready, "ready"), "alive": (alive, "alive")}


def main(argv, environ=os.environ):
    if len(argv) != 2 or argv[1] not in COMMANDS:
        sys.exit(f"usage: python -m celery_fleet_pod {{{'|'.join(COMMANDS)}}}")
    function, verdict = COMMANDS[argv[1]]
    app = _app(environ)
    try:
        outcome = function(app, environ)
    except Exception as error:  # noqa: BLE001 - reported, and a failed hook or probe
        print(json.dumps({"command": argv[1], "error": str(error)}), flush=True)
        return 1
    finally:
        app.close()
    print(json.dumps(outcome, default=str), flush=True)
    return 0 if outcome.get(verdict) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
