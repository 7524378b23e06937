"""The Celery app. Every setting comes from the environment file the celery_worker role writes."""

import json
import os

from celery import Celery


def _flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None:
        return default
    return value.strip().lower() in ("1", "true", "yes", "on")


app = Celery("celery_fleet_app", include=["celery_fleet_app.tasks"])

# kombu's Redis transport options the fleet computes for every client: the visibility timeout (above the
# longest hard time limit of the fleet) and the socket timeouts (a publish or an ack to a hung broker fails).
transport_options = json.loads(os.environ.get("CELERY_BROKER_TRANSPORT_OPTIONS") or "{}")

app.conf.update(
    broker_url=os.environ.get("CELERY_BROKER_URL", "redis://localhost:6379/0"),
    result_backend=os.environ.get("CELERY_RESULT_BACKEND") or None,
    # A task is acknowledged after it ran, and a task whose worker died goes back to the queue.
    task_acks_late=_flag("CELERY_TASK_ACKS_LATE", True),
    task_reject_on_worker_lost=_flag("CELERY_TASK_REJECT_ON_WORKER_LOST", True),
    # Redis re-delivers unacknowledged tasks after visibility_timeout seconds: it must exceed the longest task.
    broker_transport_options=transport_options,
    redis_socket_timeout=transport_options.get("socket_timeout"),
    redis_socket_connect_timeout=transport_options.get("socket_connect_timeout"),
    result_expires=int(os.environ.get("CELERY_RESULT_EXPIRES", "86400")),
    result_extended=True,
    task_default_queue="default",
    task_routes={
        "celery_fleet_app.tasks.benchmark_task": {"queue": "default"},
        "celery_fleet_app.tasks.priority_*": {"queue": "priority"},
        "celery_fleet_app.tasks.batch_*": {"queue": "batch"},
        "celery_fleet_app.tasks.ml_*": {"queue": "ml"},
    },
    worker_send_task_events=_flag("CELERY_WORKER_SEND_TASK_EVENTS", False),
    broker_connection_retry_on_startup=True,
)
