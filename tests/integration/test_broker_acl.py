"""The broker's ACL (celery_fleet_redis_acl) on a real Redis: a real prefork worker with events on, a client and
the control API do everything the fleet does as the clients' user, with a password that needs encoding in a
URL; Redis denies them nothing (its ACL LOG stays empty) and every dangerous command is refused.

What the workload ran (INFO commandstats, reset first) is printed: that is how REDIS_CLIENT_COMMANDS was found,
and a kombu or Celery upgrade that needs a new command fails here first.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
from celery import Celery, chord, group

import celery_fleet as cf
import localredis

ROOT = Path(__file__).resolve().parents[2]
RUNTIME = ROOT / "roles" / "celery_worker" / "files"
APP = ROOT / "app" / "src"
# Every character class an operator's generated password may hold, those that break URLs and configs first.
PASSWORD = "a/b%c#d'e\"f:g@h?i&j=k+l;m\\n`o$p"
ADMIN_PASSWORD = "admin-only-" + "x" * 20
NODE = "acl-worker@localhost"
TRANSPORT = {"visibility_timeout": 5, "socket_timeout": 10, "socket_connect_timeout": 10}


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("acl")
    aclfile = workdir / "users.acl"
    aclfile.write_text("\n".join(cf.redis_acl("celery", PASSWORD, "celery-admin", ADMIN_PASSWORD)) + "\n")
    with localredis.redis_server(workdir, "--aclfile", str(aclfile)) as url:
        port = url.split(":")[2].split("/")[0]
        admin = redis.Redis(port=int(port), username="celery-admin", password=ADMIN_PASSWORD)
        yield port, admin


def client_url(port, database=0):
    return f"redis://{cf.url_secret('celery')}:{cf.url_secret(PASSWORD)}@127.0.0.1:{port}/{database}"


def start_worker(port):
    env = dict(os.environ, PYTHONPATH=f"{RUNTIME}{os.pathsep}{APP}", CELERY_FLEET_APP="celery_fleet_app.celery:app",
               CELERY_BROKER_TRANSPORT_OPTIONS=json.dumps(TRANSPORT), CELERY_TASK_ACKS_LATE="true",
               CELERY_TASK_REJECT_ON_WORKER_LOST="true", CELERY_RESULT_EXPIRES="600",
               CELERY_BROKER_URL=client_url(port), CELERY_RESULT_BACKEND=client_url(port, 1))
    return subprocess.Popen(
        [sys.executable, "-P", "-m", "celery", "--app", "celery_fleet_runtime:app", "worker", "--pool=prefork",
         "--concurrency=2", f"--hostname={NODE}", "--queues=default,priority,batch", "--without-mingle",
         "--without-gossip", "--task-events", "--loglevel=WARNING"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for(client, worker):
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert worker.poll() is None, worker.stderr.read()
        if client.control.ping(destination=[NODE], timeout=0.5):
            return
    pytest.fail(f"{NODE} never answered ping")


def test_the_fleet_s_clients_need_nothing_the_acl_denies(broker):
    port, admin = broker
    admin.config_resetstat()
    admin.acl_log_reset()
    worker = start_worker(port)
    client = Celery("acl-client", broker=client_url(port), backend=client_url(port, 1),
                    broker_transport_options=TRANSPORT, set_as_current=False)
    client.conf.task_send_sent_event = True
    try:
        wait_for(client, worker)
        assert client.send_task("celery_fleet_app.tasks.whoami", queue="default").get(timeout=20)["node"] == NODE
        assert client.send_task("celery_fleet_app.tasks.priority_echo", args=[1], queue="priority",
                                priority=9).get(timeout=20)["value"] == 1
        assert group(client.signature("celery_fleet_app.tasks.benchmark_task", args=[i], queue="default")
                     for i in range(3))().get(timeout=20) == [0, 2, 4]
        assert chord([client.signature("celery_fleet_app.tasks.benchmark_task", args=[i], queue="default")
                      for i in range(3)])(client.signature("celery_fleet_app.tasks.batch_sum",
                                                           queue="batch")).get(timeout=30)["sum"] == 6
        # Task.add_to_chord's counter (redis-py's incr sends INCRBY).
        client.backend.add_to_chord("acl-chord", client.AsyncResult("acl-chord-part"))
        inspect = client.control.inspect(destination=[NODE], timeout=2)
        for method in ("active", "reserved", "active_queues", "conf", "stats", "registered", "scheduled"):
            assert NODE in (getattr(inspect, method)() or {}), method
        assert client.control.cancel_consumer("batch", destination=[NODE], reply=True, timeout=2)
        assert client.control.add_consumer("batch", destination=[NODE], reply=True, timeout=2)
        events = []
        with client.connection_for_read() as connection:
            receiver = client.events.Receiver(connection, handlers={"*": events.append})
            client.send_task("celery_fleet_app.tasks.whoami", queue="default")
            receiver.capture(limit=3, timeout=10)
        assert {event["type"] for event in events} & {"task-sent", "task-received", "task-started",
                                                       "worker-heartbeat"}, events
        # Unacknowledged tasks of a worker killed with SIGKILL come back after the visibility timeout (5 s):
        # the restore takes kombu's mutex (redis-py Lock) and the unacked hash and index.
        results = [client.send_task("celery_fleet_app.tasks.sleep_task", args=[3], queue="default") for _ in range(4)]
        time.sleep(1.5)
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(10)
        time.sleep(TRANSPORT["visibility_timeout"] + 1)
        worker = start_worker(port)
        assert [result.get(timeout=60)["slept"] for result in results] == [3] * 4
        client.control.purge()
    finally:
        worker.terminate()
        worker.wait(30)
        client.close()
    denied = admin.acl_log()
    assert denied == [], denied
    used = sorted(name.removeprefix("cmdstat_") for name in admin.info("commandstats"))
    print(f"\ncommands the workload ran: {' '.join(used)}")
    # The admin's own calls in this test (CONFIG RESETSTAT, ACL LOG, INFO) are the only ones outside the list.
    assert set(used) - set(cf.REDIS_CLIENT_COMMANDS) <= {"config|resetstat", "acl|log", "info", "auth"}, used


@pytest.mark.parametrize("command", [("FLUSHALL",), ("FLUSHDB",), ("CONFIG", "GET", "*"), ("CONFIG", "SET", "dir", "/tmp"),
                                     ("REPLICAOF", "127.0.0.1", "1"), ("MONITOR",), ("SAVE",),
                                     ("SHUTDOWN",), ("ACL", "LIST"), ("KEYS", "*"), ("BGSAVE",), ("MODULE", "LIST")])
def test_the_clients_user_is_refused_every_dangerous_command(broker, command):
    port, _ = broker
    client = redis.Redis(port=int(port), username="celery", password=PASSWORD)
    with pytest.raises(redis.exceptions.NoPermissionError):
        client.execute_command(*command)
    assert command[0].lower() in cf.REDIS_FORBIDDEN and command[0].lower() not in cf.REDIS_CLIENT_COMMANDS


def test_the_default_user_cannot_log_in(broker):
    port, _ = broker
    with pytest.raises((redis.exceptions.AuthenticationError, redis.exceptions.ResponseError)):
        redis.Redis(port=int(port)).ping()
    with pytest.raises((redis.exceptions.AuthenticationError, redis.exceptions.ResponseError)):
        redis.Redis(port=int(port), password=PASSWORD).ping()
    # The default user holds the clients' commands (for the AOF's replay): a connection that did not log in
    # still may run none of them. (A raw socket: redis-py's handshake would fail before the command is sent.)
    with socket.create_connection(("127.0.0.1", int(port)), timeout=5) as sock:
        sock.sendall(b"*3\r\n$5\r\nLPUSH\r\n$7\r\ndefault\r\n$1\r\nx\r\n")
        assert sock.recv(256).startswith(b"-NOAUTH")
    with pytest.raises((redis.exceptions.AuthenticationError, redis.exceptions.ResponseError)):
        redis.Redis(port=int(port), username="default", password="").ping()


def test_transactions_come_back_from_the_aof_after_a_kill(tmp_path):
    """Redis 7.0 replays the AOF as the default user and skips each command of a MULTI/EXEC that user may not
    run (redis/redis#14541): with a default user of -@all, the unacked entries kombu writes in transactions were
    gone after any restart, and without PEXPIREAT (the AOF's form of PEXPIRE) keys came back without their
    expiry. Written as the clients' user, then SIGKILL and a start from the AOF: all back."""
    aclfile = tmp_path / "users.acl"
    aclfile.write_text("\n".join(cf.redis_acl("celery", PASSWORD, "celery-admin", ADMIN_PASSWORD)) + "\n")
    port = localredis.free_port()
    command = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(tmp_path),
               "--appendonly", "yes", "--appendfsync", "always", "--aclfile", str(aclfile)]

    def start():
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        admin = redis.Redis(port=port, username="celery-admin", password=ADMIN_PASSWORD)
        deadline = time.monotonic() + 10
        while True:
            try:
                admin.ping()
                return process, admin
            except redis.exceptions.ConnectionError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.1)

    process, _ = start()
    client = redis.Redis.from_url(client_url(port))
    # As kombu's QoS.append writes a delivered message (a transaction), as a producer publishes (no transaction),
    # and as kombu's _put fills a reply queue with x-expires: PEXPIRE reaches the AOF as PEXPIREAT.
    client.pipeline().zadd("unacked_index", {"tag-1": 1.0}).hset("unacked", "tag-1", "message").execute()
    client.lpush("default", "message-2")
    client.pipeline().lpush("reply.celery.pidbox", "reply").pexpire("reply.celery.pidbox", 300_000).execute()
    process.kill()
    process.wait(10)
    process, admin = start()
    try:
        assert admin.hget("unacked", "tag-1") == b"message" and admin.zscore("unacked_index", "tag-1") == 1.0
        assert admin.lrange("default", 0, -1) == [b"message-2"]
        assert admin.lrange("reply.celery.pidbox", 0, -1) == [b"reply"] and 0 < admin.pttl("reply.celery.pidbox") <= 300_000
    finally:
        process.terminate()
        log = process.communicate(timeout=10)[0]
    assert "NOPERM" not in log and "AOF-loading-client" not in log, log[-2000:]


def test_the_monitoring_user_s_rotated_password_replaces_the_old_one_at_once(broker):
    """What the broker role sends a running Redis (ACL SETUSER with the users file's monitoring line): after a
    rotation only the new password logs in, and the user may read INFO but no key."""
    port, admin = broker
    for password in ("monitor-old-password", "monitor-new-password"):
        rule = cf.redis_acl("celery", PASSWORD, "celery-admin", ADMIN_PASSWORD, False, "celery-monitor", password)[-1]
        assert admin.execute_command("ACL", "SETUSER", *rule.split()[1:]) in (b"OK", "OK")
    assert redis.Redis(port=int(port), username="celery-monitor", password="monitor-new-password").info("memory")
    with pytest.raises((redis.exceptions.AuthenticationError, redis.exceptions.ResponseError)):
        redis.Redis(port=int(port), username="celery-monitor", password="monitor-old-password").ping()
    with pytest.raises(redis.exceptions.NoPermissionError):
        redis.Redis(port=int(port), username="celery-monitor", password="monitor-new-password").llen("default")
