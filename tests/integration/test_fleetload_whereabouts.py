"""The load harness's account of a lost task (fleetload.whereabouts) against a real Redis and kombu's own
transport: waiting in a priority sub-list, delivered and unacknowledged, started, or gone from the broker."""

import shutil
from collections import Counter

import pytest

import fleetload
import localredis

assert shutil.which("redis-server"), "redis-server is needed: run ./fleet setup"

LEDGER = "celery-fleet:ledger:test"


@pytest.fixture()
def client(tmp_path):
    with localredis.redis_server(tmp_path) as url:
        yield fleetload.FleetClient(broker_url=url, result_url=url, transport_options={"visibility_timeout": 3600},
                                    admin=("default", "unused"))


def send(app, token, queue, priority=0):
    app.send_task(fleetload.LEDGER_TASK, args=[0.1, token, LEDGER], queue=queue, priority=priority)


def test_each_lost_task_is_found_where_it_is(client):
    app = client.app("whereabouts-test")
    try:
        send(app, "queued-low", "default", priority=0)
        send(app, "queued-high", "batch", priority=9)
        send(app, "popped", "priority")
        send(app, "delivered", "ml")
        send(app, "started", "ml")
        broker = client.redis()
        # "popped": taken off its list as BRPOP takes it, never written to the unacked hash (a consumer that
        # died in between).
        assert b"popped" in broker.rpop("priority")
        # "delivered": taken by kombu's consumer path with acknowledgement pending (the unacked hash).
        with app.connection_for_read() as connection:
            channel = connection.default_channel
            message = channel.basic_get("ml", no_ack=False)
            assert "delivered" in str(message.decode())
            # "started" was taken and its unacked entry removed as a finished task's ack would do, but the
            # ledger only has its start: the record of its end never came.
            finished = channel.basic_get("ml", no_ack=False)
            finished.ack()
            lost = ["queued-low", "queued-high", "popped", "delivered", "started"]
            places = fleetload.whereabouts(client, LEDGER, lost, ["default", "priority", "batch", "ml"],
                                           Counter(started=1))
    finally:
        app.close()
    assert places["queued-low"] == "queued:default"
    # kombu's sub-list for priority 9 (the ledger names it with the separator escaped).
    assert places["queued-high"].startswith("queued:batch\\x06\\x16") and places["queued-high"].endswith("9")
    assert places["popped"] == "nowhere"
    assert places["delivered"] == "unacked"
    assert places["started"] == "started 1 times"
