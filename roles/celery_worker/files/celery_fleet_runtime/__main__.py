"""``python -m celery_fleet_runtime check``: what the operator's app does with the fleet's guarantees.

Reads ``{"app": "module:attribute", "environment": {...}}`` as JSON on stdin (the environment the workers
get; passed on stdin so that no value lands on a command line), imports the app through the runtime exactly
as a worker does, imports its task modules and prints one JSON report on stdout: the app's own visibility
timeout and whether it was finalized before the fleet's settings, and for each task the delivery options it
runs with and the queue it is routed to.
Judging the report (what breaks a guarantee, what is only odd) is the role's filter's job
(celery_fleet_app_findings), not this one's: this only looks.
"""

import json
import os
import sys

import celery_fleet_runtime


def _queue_name(options):
    queue = options.get("queue")
    return getattr(queue, "name", queue)


def report(app):
    """The facts the role judges, for an app the runtime loaded."""
    found = celery_fleet_runtime.APPLIED[id(app)]
    app.loader.import_default_modules()  # include, imports and Django's autodiscover_tasks
    router = app.amqp.router
    tasks = {}
    for name, task in sorted(app.tasks.items()):  # finalizes the app: tasks bind their options here
        if name.startswith("celery."):
            continue
        entry = {option: getattr(task, option, None) for option in celery_fleet_runtime.GUARANTEED_TASK_OPTIONS}
        try:
            own = {"queue": task.queue} if getattr(task, "queue", None) else {}
            entry["queue"] = _queue_name(router.route(own, name, (), {}, task))
        except Exception as error:  # a router that needs real arguments: say so, do not guess
            entry["queue"] = None
            entry["route_error"] = f"{type(error).__name__}: {error}"
        tasks[name] = entry
    return {
        "main": app.main,
        "finalized_before_fleet_settings": found["finalized_before_fleet_settings"],
        "app_visibility_timeout": found["app_transport_options"].get("visibility_timeout"),
        "visibility_timeout": (app.conf.broker_transport_options or {}).get("visibility_timeout"),
        "default_queue": app.conf.task_default_queue,
        "beat_schedule": sorted(app.conf.beat_schedule or {}),
        "tasks": tasks,
    }


def main(argv):
    if argv[1:] != ["check"]:
        sys.exit("usage: python -m celery_fleet_runtime check < request.json")
    request = json.load(sys.stdin)
    os.environ.update({str(name): str(value) for name, value in (request.get("environment") or {}).items()})
    # Whatever the app prints while it loads goes to stderr: stdout carries the report only.
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    app = celery_fleet_runtime.load(request["app"])
    json.dump(report(app), out, sort_keys=True, default=str)
    out.write("\n")
    out.flush()


if __name__ == "__main__":
    main(sys.argv)
