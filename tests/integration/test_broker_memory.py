"""Why the queue instance takes no memory cap (celery_broker preflight refuses one): against a real Redis
on loopback, kombu's Redis transport pops a task (BRPOP) and then records it as unacknowledged in a
MULTI (HSET unacked + ZADD unacked_index). At maxmemory with noeviction Redis allows the pop and refuses
the MULTI's writes: the task is then in neither the queue nor the unacked hash. Lost."""

import shutil
import socket
import subprocess
import time

import pytest
import redis
from kombu import Connection

assert shutil.which("redis-server"), "redis-server is needed: run ./fleet setup"


@pytest.fixture
def capped_redis(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(tmp_path), "--maxmemory", "8mb", "--maxmemory-policy", "noeviction"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            client.ping()
            break
        except redis.exceptions.ConnectionError:
            time.sleep(0.1)
    yield f"redis://127.0.0.1:{port}/0", client
    server.terminate()
    server.wait(10)


def fill(client):
    """Write small values until Redis refuses a write: it is at maxmemory. (Large values would be refused
    for their own query buffer while memory stays below the cap.)"""
    for index in range(100000):
        try:
            client.set(f"filler:{index}", b"x" * 1000)
        except redis.exceptions.OutOfMemoryError:
            return
    pytest.fail("Redis never reached its maxmemory")


def test_a_task_consumed_at_maxmemory_with_noeviction_is_stored_nowhere(capped_redis):
    url, client = capped_redis
    with Connection(url) as connection:
        queue = connection.SimpleQueue("tasks")
        queue.put({"task": "celery-fleet.example", "n": 1})
        assert client.llen("tasks") == 1
        fill(client)
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            queue.get(timeout=2)
        # The pop happened, the bookkeeping did not: the message is nowhere.
        assert client.llen("tasks") == 0
        assert client.hlen("unacked") == 0
        queue.close()


def test_below_the_cap_the_same_task_is_recorded_as_unacknowledged(capped_redis):
    url, client = capped_redis
    with Connection(url) as connection:
        queue = connection.SimpleQueue("tasks")
        queue.put({"task": "celery-fleet.example", "n": 2})
        message = queue.get(timeout=2)
        assert message.payload["n"] == 2
        assert (client.llen("tasks"), client.hlen("unacked")) == (0, 1)
        message.ack()
        queue.close()
