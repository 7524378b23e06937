"""The example Celery app: a plain app, as an operator would write one.

It sets only what an application owns (task modules, routes, the default queue). The broker, the result
backend and every delivery guarantee (late acknowledgement, requeue on a lost worker, the visibility
timeout, socket timeouts, result expiry) come from the fleet: workers and clients load it through
celery_fleet_runtime, which applies the fleet's settings on top of these.
"""

from celery import Celery

app = Celery("celery_fleet_app", include=["celery_fleet_app.tasks"])

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
