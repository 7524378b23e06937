"""site.yml as operators run it besides a plain deploy, on the deployed lab: a dry run (--check --diff)
shows no change and fails nowhere, and each phase's tag runs on its own (the facts every phase needs are
computed under every tag), changing nothing on a converged fleet."""

import pytest

import fleetload
from fleet import INVENTORY, lab_host, redis_cli

def worker_pids():
    return {name: lab_host(name).check_output("systemctl show -p MainPID --value 'celery-worker@*.service' | sort")
            for name in ("web1", "web2", "batch1", "gpu1")}


def assert_no_change(*args):
    before = worker_pids()
    rc, output = fleetload.run_playbook("site.yml", *args, inventory=INVENTORY, timeout=600)
    assert rc == 0, output[-4000:]
    recap = fleetload.recap(output)
    assert set(recap) == {"broker1", "web1", "web2", "batch1", "gpu1", "monitor1"}, recap
    assert all((counts["changed"], counts["unreachable"], counts["failed"]) == (0, 0, 0)
               for counts in recap.values()), recap
    assert worker_pids() == before
    return output


def test_a_dry_run_on_the_deployed_fleet_shows_no_change_and_fails_nowhere():
    output = assert_no_change("--check", "--diff")
    # It really asked the broker and the nodes (read-only), not skipped them.
    assert "Wait until each instance answers PING" in output
    assert "5 node(s) online" in output


@pytest.mark.parametrize("tag", ["celery_worker_configure", "celery_worker_run"])
def test_one_phase_runs_on_its_own(tag):
    output = assert_no_change("--tags", tag)
    # The phase ran, validated like a full run, and the others did not.
    assert "Assert the host's worker settings are valid" in output
    phase_task = {"celery_worker_configure": "Write the environment file, the worker units, the celery-fleet command",
                  "celery_worker_run": "Start and enable every worker instance"}[tag]
    assert phase_task in output
    assert "Install the application into the release virtualenv" not in output


def redis_state():
    broker = lab_host("broker1")
    fsync = redis_cli(broker, "config", "get", "appendfsync").stdout
    return broker.check_output("systemctl show -p MainPID --value redis-server"), fsync.split()[-1]


def test_a_broker_configuration_change_never_restarts_redis_unasked():
    """A restart drops every worker's connection: a changed redis.conf is written, Redis keeps running with
    the old one, and the run says so. (Last in this file: it leaves the file as it found it.)"""
    pid, fsync = redis_state()
    assert fsync == "everysec"
    try:
        rc, output = fleetload.run_playbook("site.yml", "--tags", "celery_broker_configure", "--extra-vars",
                                            "celery_broker_appendfsync=always", inventory=INVENTORY, timeout=300)
        assert rc == 0, output[-4000:]
        message = " ".join(output.split())
        assert ("The configuration of queues on broker1 changed; a running instance keeps its old one until it "
                "is restarted") in message, output[-4000:]
        # Only the queue instance's file changed: the results instance was not even a candidate for a restart.
        handler = output.split("RUNNING HANDLER [celery_broker : Restart the broker instances whose configuration "
                               "changed]")[1].split("RUNNING HANDLER")[0]
        assert "(item=redis-server.service)" in handler and "redis-server@results" not in handler, handler
        assert "appendfsync always" in lab_host("broker1").file("/etc/redis/redis.conf").content_string
        assert redis_state() == (pid, "everysec")
    finally:
        rc, output = fleetload.run_playbook("site.yml", "--tags", "celery_broker_configure", inventory=INVENTORY,
                                            timeout=300)
    assert rc == 0, output[-4000:]
    assert redis_state() == (pid, "everysec")
