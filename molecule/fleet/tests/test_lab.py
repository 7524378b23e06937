"""The lab fleet boots as six real systemd hosts, named and grouped as inventories/lab says."""

import json
import subprocess

import pytest

testinfra_hosts = ["ansible://all"]

EXPECTED_GROUPS = {
    "broker1": {"broker"},
    "web1": {"web", "workers"},
    "web2": {"web", "workers"},
    "batch1": {"batch", "workers"},
    "gpu1": {"gpu", "workers"},
    "monitor1": {"monitor"},
}


@pytest.fixture(scope="module")
def lab_inventory(request):
    inventory = request.config.getoption("ansible_inventory")
    listed = subprocess.run(
        ["ansible-inventory", "-i", inventory, "--list"],
        check=True, capture_output=True, text=True,
    )
    return json.loads(listed.stdout)


def test_the_lab_holds_exactly_six_hosts(lab_inventory):
    assert set(lab_inventory["_meta"]["hostvars"]) == set(EXPECTED_GROUPS)


def test_host_is_in_exactly_its_groups(host):
    variables = host.ansible.get_variables()
    assert set(variables["group_names"]) - {"all"} == EXPECTED_GROUPS[variables["inventory_hostname"]]


def test_systemd_is_pid_1(host):
    assert host.file("/proc/1/comm").content_string.strip() == "systemd"


def test_system_is_running_with_no_failed_units(host):
    state = host.run("systemctl is-system-running")
    failed = host.check_output("systemctl --failed --no-legend --plain")
    assert failed == ""
    assert state.stdout.strip() == "running"


def test_hostname_equals_inventory_name(host):
    assert host.check_output("hostname") == host.ansible.get_variables()["inventory_hostname"]


def test_hosts_resolve_each_other_by_name(host):
    for other in EXPECTED_GROUPS:
        assert host.run(f"getent hosts {other}").rc == 0, other
