"""Each worker host: its user, files, units and systemd settings."""

import json
import re

import pytest

from fleet import control, run_python

testinfra_hosts = ["ansible://workers"]

INSTANCES = {"web1": ["web"], "web2": ["web"], "batch1": ["batch"], "gpu1": ["gpu-1", "gpu-2"]}
HARD_TIME_LIMIT = {"web1": 360, "web2": 360, "batch1": 1900, "gpu1": 360}


@pytest.fixture
def name(host):
    return host.ansible.get_variables()["inventory_hostname"]


def test_worker_user_is_unprivileged(host):
    user = host.user("celery")
    assert user.shell == "/usr/sbin/nologin"
    assert user.uid < 1000 and user.uid != 0


def test_environment_file_is_not_world_readable(host):
    env = host.file("/etc/celery-fleet/celery.env")
    assert env.user == "root" and env.group == "celery" and env.mode == 0o640
    assert "CELERY_TASK_ACKS_LATE='true'" in env.content_string
    assert "CELERY_TASK_REJECT_ON_WORKER_LOST='true'" in env.content_string


def test_visibility_timeout_exceeds_the_longest_hard_limit(host):
    env = host.file("/etc/celery-fleet/celery.env").content_string
    line = next(ln for ln in env.splitlines() if ln.startswith("CELERY_BROKER_TRANSPORT_OPTIONS="))
    options = json.loads(line.split("=", 1)[1].strip("'"))
    assert options["visibility_timeout"] > max(HARD_TIME_LIMIT.values())
    assert options["socket_timeout"] > 0 and options["socket_connect_timeout"] > 0


def test_the_running_workers_hold_the_fleet_s_settings(host):
    """What each running worker's app really holds (celery inspect conf), not what the files say: the example
    app sets none of these itself, the runtime applies them over it."""
    env = host.file("/etc/celery-fleet/celery.env").content_string
    line = next(ln for ln in env.splitlines() if ln.startswith("CELERY_BROKER_TRANSPORT_OPTIONS="))
    expected = json.loads(line.split("=", 1)[1].strip("'"))
    hostname = host.check_output("hostname")
    confs = {node: conf for node, conf in control(host, "conf").items() if node.endswith(f"@{hostname}")}
    assert confs, f"no node of {hostname} answered inspect conf"
    for node, conf in confs.items():
        assert conf["task_acks_late"] is True, node
        assert conf["task_reject_on_worker_lost"] is True, node
        assert conf["broker_transport_options"] == expected, node
        assert conf["task_default_queue"] == "default", node  # the app's own setting stays


def test_current_points_at_a_release_with_an_offline_venv(host):
    current = host.file("/opt/celery-fleet/current")
    assert current.is_symlink and current.linked_to.startswith("/opt/celery-fleet/releases/")
    assert host.run("/opt/celery-fleet/current/venv/bin/python -c 'import celery_fleet_app, celery'").rc == 0
    version = host.check_output("/opt/celery-fleet/current/venv/bin/python -c 'import celery; print(celery.__version__)'")
    assert tuple(int(part) for part in version.split(".")[:3]) >= (5, 6, 1)


def test_exactly_the_expected_instances_run_active_and_enabled(host, name):
    listed = host.check_output(
        "systemctl list-units --plain --no-legend --all 'celery-worker@*.service' | awk '{print $1}'")
    assert sorted(listed.split()) == sorted(f"celery-worker@{i}.service" for i in INSTANCES[name])
    for instance in INSTANCES[name]:
        service = host.service(f"celery-worker@{instance}.service")
        assert service.is_running and service.is_enabled


def test_units_stop_warmly_and_restart_on_failure(host, name):
    for instance in INSTANCES[name]:
        unit = f"celery-worker@{instance}.service"
        props = dict(
            line.split("=", 1) for line in host.check_output(
                f"systemctl show -p KillSignal -p KillMode -p Restart -p TimeoutStopUSec -p User -p Type {unit}"
            ).splitlines()
        )
        assert props["KillSignal"] == "15"
        assert props["KillMode"] == "mixed"
        assert props["Restart"] == "on-failure"
        assert props["User"] == "celery"
        assert props["Type"] == "exec"
        # Hard time limit plus the 30 s margin.
        assert props["TimeoutStopUSec"] == f"{(HARD_TIME_LIMIT[name] + 30) // 60}min {(HARD_TIME_LIMIT[name] + 30) % 60}s"


def test_worker_runs_celery_worker_directly_as_celery(host, name):
    for instance in INSTANCES[name]:
        pid = host.check_output(f"systemctl show -p MainPID --value celery-worker@{instance}.service")
        argv = host.file(f"/proc/{pid}/cmdline").content_string.split("\0")
        assert argv[1].endswith("/bin/celery") and "worker" in argv and "multi" not in argv
        assert host.check_output(f"ps -o user= -p {pid}") == "celery"


def test_gpu_instances_are_pinned_one_device_each(host, name):
    if name != "gpu1":
        pytest.skip("only gpu1 has GPUs")
    pinned = []
    for instance in INSTANCES[name]:
        pid = host.check_output(f"systemctl show -p MainPID --value celery-worker@{instance}.service")
        environ = host.file(f"/proc/{pid}/environ").content_string.split("\0")
        pinned.append(next(v for v in environ if v.startswith("CUDA_VISIBLE_DEVICES=")))
    assert pinned == ["CUDA_VISIBLE_DEVICES=0", "CUDA_VISIBLE_DEVICES=1"]


def test_hardening_takes_effect(host, name):
    instance = INSTANCES[name][0]
    exposure = host.check_output(
        f"systemd-analyze security celery-worker@{instance}.service --no-pager | tail -1")
    # "Overall exposure level for ...: 2.1 OK"; Debian's unhardened default scores 9.6 UNSAFE.
    score = float(re.search(r":\s*(\d+(?:\.\d+)?)\s", exposure).group(1))
    assert score < 5.0, exposure
