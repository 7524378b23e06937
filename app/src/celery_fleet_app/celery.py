"""The example Celery app: a plain app, as an operator would write one.

It sets only what an application owns (task modules, routes, the default queue). The broker, the result
backend and every delivery guarantee (late acknowledgement, requeue on a lost worker, the visibility
timeout, socket timeouts, result expiry) come from the fleet: workers and clients load it through
celery_fleet_runtime, which applies the fleet's settings on top of these.
"""

import os

from celery import Celery

app = Celery("celery_fleet_app", include=["celery_fleet_app.tasks"])

# One periodic task, when the deployment asks for it (celery_worker_extra_environment): every N seconds,
# beat_tick on the priority queue. celery beat runs on the one host with celery_worker_beat.
TICK_SECONDS = float(os.environ.get("CELERY_FLEET_APP_TICK_SECONDS") or 0)
if TICK_SECONDS > 0:
    app.conf.beat_schedule = {
        "tick": {"task": "celery_fleet_app.tasks.beat_tick", "schedule": TICK_SECONDS,
                 "options": {"queue": "priority"}},
    }

app.conf.update(
    result_extended=True,
    task_default_queue="default",
    task_routes={
        "celery_fleet_app.tasks.benchmark_task": {"queue": "default"},
        "celery_fleet_app.tasks.priority_*": {"queue": "priority"},
        "celery_fleet_app.tasks.batch_*": {"queue": "batch"},
        "celery_fleet_app.tasks.ml_*": {"queue": "ml"},
    },
)
