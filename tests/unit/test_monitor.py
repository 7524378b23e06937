"""The monitor's pure logic: its settings' validation, the fleet it watches, listen addresses, the broker's
monitoring user, and the exporter's samples from one refresh's answers (celery_control.status's shape)."""

import pytest

import celery_fleet as cf
import celery_fleet_exporter as exporter

GOOD = {
    "celery_monitor_exporter_address": "127.0.0.1", "celery_monitor_exporter_port": 9808,
    "celery_monitor_exporter_interval": 10, "celery_monitor_exporter_timeout": 1.5,
    "celery_monitor_exporter_deadline": 8, "celery_monitor_flower": True,
    "celery_monitor_flower_address": "0.0.0.0", "celery_monitor_flower_port": 5555,
    "celery_monitor_flower_user": "admin", "celery_monitor_flower_password": "a-strong/pass%word#1",
    "celery_monitor_flower_max_tasks": 10000, "celery_monitor_prometheus_address": "::1",
    "celery_monitor_prometheus_port": 9090, "celery_monitor_prometheus_scrape_interval": 15,
    "celery_monitor_prometheus_retention": "15d", "celery_monitor_redis_exporter_port": 9121,
    "celery_monitor_alert_minutes": 5, "celery_monitor_alert_queue_ready": 1000,
    "celery_monitor_alert_queue_age": 300, "celery_monitor_alert_failure_ratio": 0.05,
    "celery_monitor_alert_failure_min_runs": 20,
    "celery_monitor_alert_broker_memory_ratio": 0.9,
}


def test_good_settings_pass():
    assert cf.monitor_errors(GOOD) == []
    assert cf.monitor_errors(dict(GOOD, celery_monitor_service_overrides={"PrivateUsers": "no", "MemoryMax": "2G"})) == []
    assert cf.monitor_errors(dict(GOOD, celery_monitor_exporter_port="9808")) == []  # as the inventory may give it


@pytest.mark.parametrize("variable, value, words", [
    ("celery_monitor_exporter_port", 0, "from 1024 to 65535"),
    ("celery_monitor_exporter_port", 70000, "from 1024 to 65535"),
    ("celery_monitor_flower_port", 443, "from 1024 to 65535"),  # unprivileged services, no capability
    ("celery_monitor_exporter_port", True, "got true"),
    ("celery_monitor_exporter_port", "9808; rm -rf /", "from 1024 to 65535"),
    ("celery_monitor_flower_port", 9090, "celery_monitor_prometheus_port and celery_monitor_flower_port must differ"),
    ("celery_monitor_exporter_address", "localhost", "must be an IP address"),
    ("celery_monitor_flower_address", "0.0.0.0 ", "must be an IP address"),  # given to Flower as written
    ("celery_monitor_exporter_interval", 0, "from 1 up to 3600"),
    ("celery_monitor_exporter_deadline", 2, "must be at least 4 x celery_monitor_exporter_timeout + 1 s (7 s)"),
    ("celery_monitor_exporter_deadline", 6.9, "four questions one after the other"),
    ("celery_monitor_exporter_timeout", "nan", "from 0.1 up to 60"),
    ("celery_monitor_prometheus_retention", "15 days", "a Prometheus duration"),
    ("celery_monitor_prometheus_retention", "0d", "a Prometheus duration"),
    ("celery_monitor_alert_failure_ratio", 0, "above 0 up to 1"),
    ("celery_monitor_alert_failure_ratio", 1.5, "above 0 up to 1"),
    ("celery_monitor_alert_broker_memory_ratio", 1, "must be below 1"),
    ("celery_monitor_alert_failure_min_runs", 0, "from 1 to 1000000000"),
    ("celery_monitor_service_overrides", {"PrivateUsers": "no\nExecStartPre=/bin/evil"}, "one-line values"),
    ("celery_monitor_service_overrides", {"Exec Start": "x"}, "directive names"),
    ("celery_monitor_service_overrides", ["PrivateUsers=no"], "must map systemd [Service] directive names"),
    ("celery_monitor_alert_queue_ready", 10**13, "from 1 to 1000000000000"),
    ("celery_monitor_flower_max_tasks", 10**9, "from 100 to 10000000"),
    ("celery_monitor_flower_user", "ad:min", "celery_monitor_flower_user must be a user name"),
    ("celery_monitor_flower_password", "short", "celery_monitor_flower_password must be 16 to 512"),
    ("celery_monitor_flower_password", "a-strong,password-1", "without space or ','"),
    ("celery_monitor_flower_password", "a strong password 1", "without space or ','"),
])
def test_bad_settings_are_named_with_what_is_allowed(variable, value, words):
    errors = cf.monitor_errors(dict(GOOD, **{variable: value}))
    assert len(errors) == 1 and variable in errors[0] and words in errors[0], errors
    assert "a-strong" not in errors[0]  # never the password


def test_flower_off_skips_its_settings():
    assert cf.monitor_errors(dict(GOOD, celery_monitor_flower=False, celery_monitor_flower_password="",
                                  celery_monitor_flower_port=9090)) == []


def test_the_fleet_the_monitor_watches_comes_from_every_worker_host_s_facts():
    hostvars = [{"_celery_worker_layered": {"profile": "web"}, "_celery_worker_node_queues": {
                    "web-worker@web1": ["priority", "default"]}},
                {"_celery_worker_layered": {"profile": "gpu"}, "_celery_worker_node_queues": {
                    "gpu-worker-1@gpu1": ["ml"], "gpu-worker-2@gpu1": ["ml"]}}]
    assert cf.monitor_fleet_hosts(hostvars, ["web1", "gpu1"]) == {
        "web1": {"group": "web", "nodes": {"web-worker@web1": ["default", "priority"]}},
        "gpu1": {"group": "gpu", "nodes": {"gpu-worker-1@gpu1": ["ml"], "gpu-worker-2@gpu1": ["ml"]}}}
    with pytest.raises(ValueError, match="no worker facts for batch1: .*--limit"):
        cf.monitor_fleet_hosts(hostvars + [{}], ["web1", "gpu1", "batch1"])


@pytest.mark.parametrize("address, local, expected", [
    ("127.0.0.1", False, "127.0.0.1:9"), ("0.0.0.0", True, "127.0.0.1:9"), ("0.0.0.0", False, "0.0.0.0:9"),
    ("::", True, "[::1]:9"), ("fe80::1", False, "[fe80::1]:9"), ("10.0.0.5", True, "10.0.0.5:9"),
])
def test_listen_and_scrape_addresses(address, local, expected):
    assert cf.host_port(address, 9, local=local) == expected


def test_the_monitoring_user_reads_server_facts_and_no_key():
    lines = cf.redis_acl("celery", "c" * 20, "celery-admin", "a" * 20, False, "celery-monitor", "m" * 20)
    monitor = lines[-1].split()
    # resetpass before the hash: ACL SETUSER on a running Redis replaces a rotated password instead of adding one.
    assert monitor[:5] == ["user", "celery-monitor", "on", "resetpass", "#" + cf._sha256("m" * 20)]
    assert "resetkeys" in monitor and "resetchannels" in monitor and "-@all" in monitor
    assert not any(word.startswith(("~", "&", "%")) for word in monitor), "the monitoring user may touch no key"
    granted = {word[1:] for word in monitor if word.startswith("+")}
    assert {"info", "ping", "config|get"} <= granted and not granted & {"keys", "get", "llen", "publish", "config|set"}
    assert len(cf.redis_acl("celery", "c" * 20, "celery-admin", "a" * 20)) == 3  # none without a password


NODE = "web-worker@web1"
HOSTS = {"web1": {"group": "web", "nodes": {NODE: ["default", "priority"]}},
         "web2": {"group": "web", "nodes": {"web-worker@web2": ["default", "priority"]}}}


def observed(default_ready=5, oldest="tag-1", consuming=("default", "priority")):
    return {
        "nodes_status": {NODE: {"pool": "prefork", "concurrency": 8, "active": 2, "reserved": 1, "processed": 40,
                                "uptime": 100, "pid": 7, "queues": sorted(consuming), "release": "1.2.0",
                                "memory": 200 * 2**20, "memory_max": 2**30}},
        "queues_status": {
            "default": {"ready": default_ready, "by_priority": {"0": default_ready - 1, "3": 0, "6": 0, "9": 1},
                        "oldest_by_priority": {"0": oldest, "3": None, "6": None, "9": "tag-9"}, "unacked": 3,
                        "consumers": [NODE] if "default" in consuming else []},
            "priority": {"ready": 0, "by_priority": {"0": 0, "3": 0, "6": 0, "9": 0},
                         "oldest_by_priority": {"0": None, "3": None, "6": None, "9": None}, "unacked": 0,
                         "consumers": [NODE]}},
    }


def sample(samples, metric, **labels):
    found = [value for name, found_labels, value in samples if name == metric and found_labels == labels]
    assert len(found) == 1, (metric, labels, found)
    return found[0]


def test_one_refresh_becomes_samples_per_queue_group_and_node():
    state = exporter.FleetState({"hosts": HOSTS, "min_online": None}, clock=lambda: 0)
    samples = state.samples_from(observed(), now=1000.0)
    assert sample(samples, "celery_fleet_queue_ready_messages", queue="default") == 5
    assert sample(samples, "celery_fleet_queue_ready_messages_by_priority", queue="default", priority="9") == 1
    assert sample(samples, "celery_fleet_queue_unacked_messages", queue="default") == 3
    assert sample(samples, "celery_fleet_group_nodes", group="web") == 2
    assert sample(samples, "celery_fleet_group_nodes_in_service", group="web") == 1
    assert sample(samples, "celery_fleet_group_min_in_service", group="web") == 1
    node = {"node": NODE, "group": "web", "host": "web1"}
    assert sample(samples, "celery_fleet_node_utilisation", **node) == 0.25
    assert sample(samples, "celery_fleet_node_resident_memory_bytes", **node) == 200 * 2**20
    assert sample(samples, "celery_fleet_node_info", **node, release="1.2.0", pool="prefork") == 1
    gone = {"node": "web-worker@web2", "group": "web", "host": "web2"}
    assert sample(samples, "celery_fleet_node_up", **gone) == 0
    assert not [s for s in samples if s[0] == "celery_fleet_node_active_tasks" and s[1] == gone]


def test_the_next_message_s_age_counts_from_its_first_sight_and_restarts_with_another():
    state = exporter.FleetState({"hosts": HOSTS, "min_online": None})
    ages = []
    for now, oldest in ((1000.0, "tag-1"), (1010.0, "tag-1"), (1030.0, "tag-1"), (1040.0, "tag-2")):
        samples = state.samples_from(observed(oldest=oldest), now)
        ages.append(sample(samples, "celery_fleet_queue_oldest_message_age_seconds", queue="default"))
    # tag-9 (priority 9) stays the next one of its sub-list all along: the queue's age is the older of the two.
    assert ages == [0.0, 10.0, 30.0, 40.0]
    empty = state.samples_from(observed(default_ready=1, oldest=None), 1050.0)
    assert sample(empty, "celery_fleet_queue_oldest_message_age_seconds", queue="priority") == 0


def test_a_failed_refresh_drops_the_fleet_s_figures_and_counts_the_failure():
    clock = [100.0]
    state = exporter.FleetState({"hosts": HOSTS, "min_online": None}, clock=lambda: clock[0])
    assert state.refresh(ask=lambda config: observed()) is True
    clock[0] = 130.0

    def frozen(config):
        raise RuntimeError("no result within the deadline of 8 s (broker unresponsive?)")
    assert state.refresh(ask=frozen) is False
    families = {family.name: family for family in state.families()}
    assert families["celery_fleet_broker_up"].samples[0].value == 0
    assert families["celery_fleet_refresh_failures"].samples[0].value == 1
    assert families["celery_fleet_refresh_age_seconds"].samples[0].value == 30
    assert "celery_fleet_queue_ready_messages" not in families



FLEET = {"nodes": [
    {"node": "web-worker@web1", "group": "web", "host": "web1", "concurrency": 8, "queues": ["default", "priority"]},
    {"node": "web-worker@web2", "group": "web", "host": "web2", "concurrency": 8, "queues": ["default", "priority"]},
    {"node": "gpu-worker-1@gpu1", "group": "gpu", "host": "gpu1", "concurrency": 1, "queues": ["ml"]},
    {"node": "gpu-worker-2@gpu1", "group": "gpu", "host": "gpu1", "concurrency": 1, "queues": ["ml"]},
    {"node": "batch-worker@batch1", "group": "batch", "host": "batch1", "concurrency": 4, "queues": ["batch"]},
]}


def test_capacity_is_the_seed_s_sizing_rule_per_group():
    # web: 30 tasks/s (18000 in 600 s) of 0.8 s = 24 slots; 8 per host -> 3 hosts (the inventory has 2).
    # gpu: 0.1 task/s of 30 s = 3 slots; 2 per host (two instances of 1) -> 2 hosts. batch: nothing finished.
    measured = {"received": {"web-worker@web1": 9000, "web-worker@web2": 9000, "gpu-worker-1@gpu1": 60},
                "runtime_sum": {"web-worker@web1": 7200, "web-worker@web2": 7200, "gpu-worker-1@gpu1": 1800},
                "runtime_count": {"web-worker@web1": 9000, "web-worker@web2": 9000, "gpu-worker-1@gpu1": 60}}
    rows = {row["group"]: row for row in cf.fleet_capacity(FLEET, measured, 600)}
    assert rows["web"] == {"group": "web", "queues": ["default", "priority"], "arrival_per_second": 30.0,
                           "mean_seconds": 0.8, "slots_needed": 24.0, "slots": 16, "hosts": 2, "slots_per_host": 8.0,
                           "hosts_needed": 3}
    assert (rows["gpu"]["slots_needed"], rows["gpu"]["slots_per_host"], rows["gpu"]["hosts_needed"]) == (3.0, 2.0, 2)
    assert rows["batch"]["mean_seconds"] is None and rows["batch"]["hosts_needed"] is None
    assert rows["batch"]["arrival_per_second"] == 0.0
    with pytest.raises(ValueError, match="window must be above 0"):
        cf.fleet_capacity(FLEET, measured, 0)


def test_capacity_counts_slots_per_host_from_the_hosts_that_answered():
    # web2 offline (no concurrency): web1's 8 slots are one host's, so 24 slots need 3 hosts, not 6.
    fleet = {"nodes": [dict(node, concurrency=None) if node["host"] == "web2" else node for node in FLEET["nodes"]]}
    measured = {"received": {"web-worker@web1": 18000}, "runtime_sum": {"web-worker@web1": 14400},
                "runtime_count": {"web-worker@web1": 18000}}
    web = {row["group"]: row for row in cf.fleet_capacity(fleet, measured, 600)}["web"]
    assert (web["slots"], web["hosts"], web["slots_per_host"], web["hosts_needed"]) == (8, 2, 8.0, 3), web


def test_capacity_reads_prometheus_s_vectors_as_they_come():
    vector = [{"metric": {"worker": "batch-worker@batch1"}, "value": [1700000000.0, "120"]}]
    rows = {row["group"]: row for row in cf.fleet_capacity(FLEET, {"received": vector, "runtime_sum": [
        {"metric": {"worker": "batch-worker@batch1"}, "value": [1700000000.0, "600"]}], "runtime_count": vector}, 60)}
    assert (rows["batch"]["arrival_per_second"], rows["batch"]["mean_seconds"], rows["batch"]["slots_needed"],
            rows["batch"]["hosts_needed"]) == (2.0, 5.0, 10.0, 3)
