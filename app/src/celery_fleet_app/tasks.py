"""Example tasks, one family per queue, plus helpers the tests and benchmarks use."""

import os
import socket
import time

from celery_fleet_app.celery import app


def _where(task) -> dict:
    """Which node ran the task, from which queue, pinned to which GPU."""
    delivery = task.request.delivery_info or {}
    return {
        "node": task.request.hostname,
        "host": socket.gethostname(),
        "queue": delivery.get("routing_key"),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "pid": os.getpid(),
    }


@app.task
def benchmark_task(x):
    """The mission's benchmark task."""
    return x * 2


@app.task(bind=True)
def whoami(self):
    """Report where this ran; send it to any queue with apply_async(queue=...)."""
    return _where(self)


@app.task(bind=True)
def sleep_task(self, seconds, token=None):
    """Sleep, then report. Used by drain and rolling-restart tests; route with queue=..."""
    time.sleep(float(seconds))
    return {"token": token, "slept": seconds, **_where(self)}


@app.task(bind=True)
def priority_echo(self, value):
    return {"value": value, **_where(self)}


@app.task(bind=True)
def batch_sum(self, numbers):
    return {"sum": sum(numbers), **_where(self)}


@app.task(bind=True)
def ml_infer(self, values):
    """Stand-in for GPU inference: reports the device the worker process is pinned to."""
    return {"mean": sum(values) / len(values) if values else 0.0, **_where(self)}
