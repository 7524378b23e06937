"""Bad input is rejected before any host changes, with a message naming the variable and what is allowed."""

import json
import os
import re
import shutil
import subprocess

import pytest

from fleet import INVENTORY, PROJECT, lab_host

WATCHED = ["/etc/celery-fleet/celery.env", "/etc/celery-fleet/instances/web.env",
           "/etc/systemd/system/celery-worker@.service"]

CASES = {
    "concurrency-zero": (
        {"celery_worker_host_settings": {"concurrency": 0}},
        ["celery_worker_host_settings.concurrency", "positive integer", "got 0"]),
    "concurrency-not-an-integer": (
        {"celery_worker_host_settings": {"concurrency": "eight"}},
        ["concurrency", "celery_worker_host_settings", "int"]),
    "unknown-pool": (
        {"celery_worker_host_settings": {"pool": "fork"}},
        ["pool", "celery_worker_host_settings", "prefork, threads, solo, eventlet, gevent", "fork"]),
    "empty-queues": (
        {"celery_worker_host_settings": {"queues": []}},
        ["celery_worker_host_settings.queues", "non-empty list"]),
    "malformed-queue": (
        {"celery_worker_host_settings": {"queues": ["default", "bad queue"]}},
        ["celery_worker_host_settings.queues", "bad queue", "letters, digits"]),
    "soft-not-below-hard": (
        {"celery_worker_host_settings": {"soft_time_limit": 400, "time_limit": 300}},
        ["celery_worker_host_settings.soft_time_limit (400)", "must be below",
         "celery_worker_host_settings.time_limit (300)"]),
    "negative-prefetch": (
        {"celery_worker_host_settings": {"prefetch_multiplier": -1}},
        ["celery_worker_host_settings.prefetch_multiplier", "integer >= 1", "got -1"]),
    "duplicate-node-names": (
        {"celery_worker_host_settings": {"node_name": "worker@shared-host"}},
        ["Node names must be unique", "worker@shared-host"]),
    "more-gpu-instances-than-gpus": (
        {"celery_worker_host_settings": {"instances": 3}},
        ["celery_worker_host_settings.instances", "3 GPU instance(s)", "2 GPU(s)", "Allowed: 1 to 2"]),
    "unsupported-broker-scheme": (
        {"celery_worker_broker_url": "amqp://guest:guest@broker1:5672//"},
        ["celery_worker_broker_url", "'redis', 'rediss'", "got 'amqp://...'"]),
    "unknown-setting": (
        {"celery_worker_group_settings": {"concurency": 8}},
        ["concurency", "celery_worker_group_settings"]),
}


def fleet_state():
    """Checksums of the deployed files and the worker PIDs: what a half-applied run would change."""
    state = {}
    for name in ("web1", "gpu1"):
        host = lab_host(name)
        for path in WATCHED:
            if host.file(path).exists:
                state[f"{name}:{path}"] = host.file(path).sha256sum
        state[f"{name}:pids"] = host.check_output(
            "systemctl show -p MainPID --value 'celery-worker@*.service' | sort")
    return state


def assert_refused_before_any_change(extra_vars, expected_phrases):
    before = fleet_state()
    env = dict(os.environ, ANSIBLE_CONFIG=str(PROJECT / "ansible.cfg"), ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0",
               ANSIBLE_VAULT_PASSWORD_FILE=str(PROJECT / "inventories" / "lab" / "lab-vault-password.txt"))
    run = subprocess.run(
        ["ansible-playbook", "-i", INVENTORY, str(PROJECT / "playbooks" / "site.yml"),
         "--extra-vars", json.dumps(extra_vars)],
        capture_output=True, text=True, env=env, cwd=PROJECT, timeout=300,
    )
    # Molecule forces colour on; strip any escape codes so the recap can be parsed.
    output = re.sub(r"\x1b\[[0-9;]*m", "", run.stdout + run.stderr)
    assert run.returncode != 0, output
    message = " ".join(output.split())
    for phrase in expected_phrases:
        assert phrase in message, f"{phrase!r} missing from:\n{output[-3000:]}"
    # It stopped in the validation play: the deploy plays never started and no host changed.
    assert "PLAY [Deploy the Redis broker]" not in output
    assert "PLAY [Deploy the Celery workers]" not in output
    recap = re.findall(r"^(\S+)\s+: ok=\d+\s+changed=(\d+)", output, re.MULTILINE)
    assert recap and all(changed == "0" for _, changed in recap), recap
    assert fleet_state() == before


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_rejected_before_any_change(case):
    extra_vars, expected_phrases = CASES[case]
    assert_refused_before_any_change(extra_vars, expected_phrases)


def test_changed_sources_under_a_deployed_release_id_are_refused(tmp_path):
    """Release ids are immutable: new code under the id the hosts already run is an error, not a no-op."""
    source = shutil.copytree(PROJECT / "app", tmp_path / "app",
                             ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    tasks = source / "src" / "celery_fleet_app" / "tasks.py"
    tasks.write_text(tasks.read_text() + "\n# a change shipped without a new release id\n")
    assert_refused_before_any_change(
        {"celery_worker_app_source": str(source)},
        ["celery_worker_release 1.0.0 is already installed on web1, built from other sources",
         "Release ids are immutable: give the changed application or lock a new celery_worker_release"])
