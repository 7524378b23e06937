"""Bad input stops site.yml before any host changes, with a message naming the variable and what is
allowed. Every per-setting case is a fast unit test (tests/unit/test_settings.py); these run end to end
one case of each kind of check: a per-setting error (the settings filter), a type the argument spec
refuses, each fleet-wide check (node names, GPUs), the profile a host takes, the release id (a path, a
space), GPU ids, the extra environment, the broker's memory caps and passwords (the lab's public ones outside
the lab), the monitor's ports and retention, and changed sources under a deployed release id. The runs go four
at a time, between two snapshots of the fleet: no run may change anything."""

import concurrent.futures
import json
import shutil

import pytest

import fleetload
from fleet import INVENTORY, PROJECT, lab_host

WATCHED = ["/etc/celery-fleet/celery.env", "/etc/celery-fleet/instances/web.env",
           "/etc/systemd/system/celery-worker@.service"]

CASES = {
    "concurrency-zero": (
        {"celery_worker_host_settings": {"concurrency": 0}},
        ["celery_worker_host_settings.concurrency must be an integer >= 1 and <= 10000 (a positive integer); "
         "got 0."]),
    "not-a-boolean": (
        {"celery_worker_task_acks_late": "perhaps"},
        ["celery_worker_task_acks_late", "perhaps", "bool"]),
    "unknown-setting": (
        {"celery_worker_group_settings": {"concurency": 8}},
        ["concurency", "celery_worker_group_settings"]),
    "duplicate-node-names": (
        {"celery_worker_host_settings": {"node_name": "worker@shared-host"}},
        ["Node names must be unique", "worker@shared-host"]),
    "more-gpu-instances-than-gpus": (
        {"celery_worker_host_settings": {"instances": 3}},
        ["celery_worker_host_settings.instances", "3 GPU instance(s)", "2 GPU(s)", "Allowed: 1 to 2"]),
    "unsupported-broker-scheme": (
        {"celery_worker_broker_url": "amqp://guest:guest@broker1:5672//"},
        ["celery_worker_broker_url", "'redis', 'rediss'", "got 'amqp://...'"]),
    "memory-cap-on-the-queue-instance": (
        {"celery_broker_maxmemory": "2gb"},
        ["celery_broker_maxmemory must be \"0\" (no cap) on the queue instance; got \"2gb\"",
         "refuses the write that records it as unacknowledged"]),
    "release-id-with-a-path": (
        {"celery_worker_release": "../../etc"},
        ["celery_worker_release must start with a letter or digit", "got \"../../etc\""]),
    "release-id-with-a-space": (
        {"celery_worker_release": "1.0 final"},
        ["celery_worker_release must start with a letter or digit", "got \"1.0 final\""]),
    "duplicate-gpu-ids": (
        {"celery_worker_gpu_devices": ["0", "0"]},
        ["celery_worker_gpu_devices must list distinct device ids", "got [\"0\", \"0\"]"]),
    "extra-environment-injection": (
        {"celery_worker_extra_environment": {"GREETING": "hi\"\nCELERY_BROKER_URL=redis://evil"}},
        ["celery_worker_extra_environment['GREETING'] may not hold a newline"]),
    "app-module-that-is-not-a-python-name": (
        {"celery_worker_app_module": "../acme tasks"},
        ["celery_worker_app_module must name the Celery app as module or module:attribute",
         "got \"../acme tasks\""]),
    # The lab's vault and passwords are public: an inventory that is not the lab may not use them.
    "not-the-lab-with-the-lab-s-passwords": (
        {"celery_fleet_lab": False},
        ["celery_broker_password is one of the lab's public passwords (inventories/lab)",
         "celery_broker_admin_password is one of the lab's public passwords",
         "the vault password file is the lab's public one"]),
    "broker-password-with-a-newline": (
        {"celery_broker_password": "sixteen-chars-at-least\nrequirepass x"},
        ["celery_broker_password must be 16 to 512 printable ASCII characters"]),
    "monitor-ports-that-collide": (
        {"celery_monitor_flower_port": 9090, "celery_monitor_prometheus_retention": "forever"},
        ["celery_monitor_prometheus_port and celery_monitor_flower_port must differ (all on the monitor host)",
         "celery_monitor_prometheus_retention must be a Prometheus duration such as 15d, 12h or 2w; got", "forever"]),
    "results-cap-too-small": (
        {"celery_broker_results_maxmemory": "1mb"},
        ["celery_broker_results_maxmemory must be \"0\" (results in the queue instance, no cap) or at least 32mb",
         "got \"1mb\""]),
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
    state["opt"] = lab_host("web1").check_output("ls /opt /opt/celery-fleet/releases")
    state["monitor"] = lab_host("monitor1").check_output(
        "sha256sum /etc/celery-fleet-monitor/monitor.json /etc/prometheus/prometheus.yml; "
        "systemctl show -p MainPID --value celery-fleet-exporter prometheus")
    return state


def changed_sources(directory):
    """A copy of the example app with a change shipped under the release id the hosts already run."""
    source = shutil.copytree(PROJECT / "app", directory / "app",
                             ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    tasks = source / "src" / "celery_fleet_app" / "tasks.py"
    tasks.write_text(tasks.read_text() + "\n# a change shipped without a new release id\n")
    return source


# Each run reaches only the hosts its check needs (the broker's facts are every worker's): the refusal is the
# same, the validation play a third of the work. Cases not named here run on every host.
LIMITS = {
    "concurrency-zero": "broker1:web1", "not-a-boolean": "broker1:web1", "unknown-setting": "broker1:web1",
    "duplicate-node-names": "broker1:web1:web2", "more-gpu-instances-than-gpus": "broker1:gpu1",
    "unsupported-broker-scheme": "broker1:web1", "memory-cap-on-the-queue-instance": "broker1",
    "release-id-with-a-path": "broker1:web1", "release-id-with-a-space": "broker1:web1",
    "duplicate-gpu-ids": "broker1:gpu1", "extra-environment-injection": "broker1:web1",
    "app-module-that-is-not-a-python-name": "broker1:web1", "broker-password-with-a-newline": "broker1",
    "results-cap-too-small": "broker1", "host-in-two-profiled-groups": "broker1:web1",
    "second-beat-host": "broker1:web1:batch1", "changed-sources-under-a-deployed-release-id": "broker1:web1",
}


def run_arguments(directory):
    """{case: site.yml's arguments} for every case: CASES, and three that need files."""
    arguments = {case: ("--extra-vars", json.dumps(extra_vars)) for case, (extra_vars, _) in CASES.items()}
    # web1 also in gpu: which settings it takes would depend on group names' order, so it is refused.
    web1_in_gpu = directory / "web1-in-gpu.yml"
    web1_in_gpu.write_text(json.dumps({"all": {"children": {"gpu": {"hosts": {"web1": {}}}}}}))
    arguments["host-in-two-profiled-groups"] = ("--inventory", str(web1_in_gpu))
    # batch1 runs beat (inventories/lab); web1 as well would send every periodic task twice.
    two_beats = directory / "two-beats.yml"
    two_beats.write_text(json.dumps({"all": {"hosts": {"web1": {"celery_worker_beat": True}}}}))
    arguments["second-beat-host"] = ("--inventory", str(two_beats))
    # Release ids are immutable: new code under the id the hosts already run is an error, not a no-op.
    arguments["changed-sources-under-a-deployed-release-id"] = (
        "--extra-vars", json.dumps({"celery_worker_app_source": str(changed_sources(directory))}))
    return {case: (*args, "--limit", LIMITS[case]) if case in LIMITS else args for case, args in arguments.items()}


EXPECTED = {case: phrases for case, (_, phrases) in CASES.items()} | {
    "host-in-two-profiled-groups": [
        "The host is in 2 groups that have a worker profile (gpu and web)",
        "Set celery_worker_profile (host_vars) to one of them"],
    "second-beat-host": [
        "celery_worker_beat must be true on one worker host at most", "it is set on web1, batch1"],
    "changed-sources-under-a-deployed-release-id": [
        "celery_worker_release 1.0.0 is already installed on web1, built from other sources",
        "Release ids are immutable: give the changed application or lock a new celery_worker_release"],
}


def test_every_limited_run_is_a_case():
    assert set(LIMITS) <= set(EXPECTED), set(LIMITS) - set(EXPECTED)


@pytest.fixture(scope="module")
def refused_runs(tmp_path_factory):
    """Every case's site.yml, four at a time (each is refused in the validation play; together they take the
    time of a few), between two snapshots of the fleet: {case: (rc, output)}, state before, state after."""
    arguments = run_arguments(tmp_path_factory.mktemp("bad-input"))
    before = fleet_state()
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        futures = {case: pool.submit(fleetload.run_playbook, "site.yml", *args, inventory=INVENTORY, timeout=600)
                   for case, args in arguments.items()}
        runs = {case: future.result() for case, future in futures.items()}
    return runs, before, fleet_state()


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_bad_input_is_rejected_before_any_change(refused_runs, case):
    runs, before, after = refused_runs
    rc, output = runs[case]
    assert rc != 0, output
    message = " ".join(output.split())
    for phrase in EXPECTED[case]:
        assert phrase in message, f"{phrase!r} missing from:\n{output[-3000:]}"
    # It stopped in the validation play: the deploy plays never started and no host changed.
    assert "PLAY [Deploy the Redis broker]" not in output
    assert "PLAY [Deploy the Celery workers]" not in output
    recap = fleetload.recap(output)
    assert recap and all(counts["changed"] == 0 for counts in recap.values()), recap
    assert after == before
