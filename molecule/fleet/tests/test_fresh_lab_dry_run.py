"""A dry run of the deploy (site.yml --check --diff) on the fresh lab, where nothing is deployed yet: it
fails nowhere, shows what a deploy would change on every host, and changes nothing. test_playbooks.py
checks the same dry run on a deployed lab (it must show no change there). Runs in the fleet scenario's
first verify, before converge (conftest.py)."""

import fleetload
from fleet import INVENTORY, lab_host


def test_a_dry_run_on_the_fresh_lab_shows_changes_fails_nowhere_and_changes_nothing():
    rc, output = fleetload.run_playbook("site.yml", "--check", "--diff", inventory=INVENTORY, timeout=900)
    assert rc == 0, output[-4000:]
    recap = fleetload.recap(output)
    assert set(recap) == {"broker1", "web1", "web2", "batch1", "gpu1", "monitor1"}, recap
    assert all(counts["failed"] == 0 and counts["changed"] > 0 for counts in recap.values()), recap
    # It says what it would do: the broker's package, the worker user, unit and per-instance files.
    tasks = fleetload.task_results(output)
    for task, host in [("celery_broker : Install Redis from Debian's packages", "broker1"),
                       ("celery_worker : Create the worker's unprivileged system user", "web1"),
                       ("celery_worker : Write the environment file, the worker units, the celery-fleet command and "
                        "each instance's options and limits", "gpu1"),
                       ("celery_monitor : Install Prometheus and Redis's exporter from Debian's packages",
                        "monitor1")]:
        assert f"changed: [{host}" in tasks.get(task, ""), (task, tasks.get(task, "(task not run)")[:2000])
    # And does none of it.
    assert not lab_host("broker1").package("redis-server").is_installed
    assert not lab_host("monitor1").package("prometheus").is_installed
    assert not lab_host("monitor1").file("/opt/celery-fleet-monitor").exists
    for name in ("web1", "gpu1"):
        host = lab_host(name)
        assert not host.file("/opt/celery-fleet").exists
        assert not host.file("/etc/systemd/system/celery-worker@.service").exists
        assert not host.user("celery").exists
