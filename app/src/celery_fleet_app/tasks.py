"""Example tasks, one family per queue, plus helpers the tests and benchmarks use."""

import json
import os
import socket
import sys
import time
from functools import lru_cache
from pathlib import Path

from billiard.process import current_process
from celery.signals import before_task_publish

from celery_fleet_app.celery import app

# The release this process was started from (resolved once: `current` may move while it runs).
RELEASE = Path(sys.prefix).resolve().parent.name


def _where(task) -> dict:
    """Which node ran the task, from which queue, pinned to which GPU."""
    delivery = task.request.delivery_info or {}
    return {
        "node": task.request.hostname,
        "host": socket.gethostname(),
        "queue": delivery.get("routing_key"),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "pid": os.getpid(),
        # The worker's main process (a prefork child's parent): tells one run of a node from the next.
        "worker_pid": os.getpid() if current_process().name == "MainProcess" else os.getppid(),
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


@lru_cache(maxsize=1)
def _ledger_client():
    import redis  # celery[redis] installs it

    # The broker's queue instance: never evicted (a results instance with a memory cap evicts at it).
    return redis.Redis.from_url(app.conf.broker_url, socket_timeout=10, socket_connect_timeout=10)


def _ledger_append(key, value, patience=120.0):
    """RPUSH that waits out a broker restart or a network cut (the ledger is the tests' measuring
    instrument: a record lost to a blip would read as a lost task)."""
    import redis

    deadline = time.monotonic() + patience
    while True:
        try:
            return _ledger_client().rpush(key, value)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, redis.exceptions.BusyLoadingError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@app.task(bind=True, ignore_result=True)
def ledger_task(self, seconds, token, ledger):
    """Sleep, then append one record of this execution to the Redis list `ledger`.

    The load tests and benchmarks count these records: a token with no record is a lost task, a token
    with two is a task that ran twice, and a token started twice was run again after an interruption.
    The record is written before the late acknowledgement, so a worker killed in between shows up as a
    duplicate, as it should.
    """
    started = time.time()
    # Every start is recorded too: a run killed half-way and delivered again shows as two starts.
    _ledger_append(f"{ledger}:started", token)
    time.sleep(float(seconds))
    record = {"token": token, "seconds": seconds, "started": started, "finished": time.time(),
              "release": RELEASE, "redelivered": bool((self.request.delivery_info or {}).get("redelivered")),
              **_where(self)}
    _ledger_append(ledger, json.dumps(record))


BEAT_LEDGER = "beat:ticks"


@before_task_publish.connect(sender="celery_fleet_app.tasks.beat_tick")
def _record_tick_sent(headers=None, **_):
    """In the process that sends the tick (celery beat): one record per send, timed at the send. Two sends
    closer than the period are a tick sent twice; a gap above it, ticks lost to a stop."""
    _ledger_append(f"{BEAT_LEDGER}:sent", json.dumps({"id": (headers or {}).get("id"), "at": time.time(),
                                                      "host": socket.gethostname(), "pid": os.getpid()}))


@app.task(bind=True, ignore_result=True)
def beat_tick(self):
    """The example periodic task: records that it ran (once per send, unless a worker was lost)."""
    _ledger_append(f"{BEAT_LEDGER}:ran", json.dumps({"id": self.request.id, "at": time.time(), **_where(self)}))


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
