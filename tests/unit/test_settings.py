"""Settings layering and validation (celery_fleet.worker_settings), and the roll's arithmetic
(rolling_plan, capacity_guard, drain_timeout): the pure logic behind preflight and the rolling tasks.

The bad-input cases the fleet scenario ran end to end are here as fast tests; a few stay end to end
(molecule/fleet/tests/test_bad_input.py) to prove a refusal stops site.yml before any change."""

from pathlib import Path

import pytest
import yaml

import celery_fleet as cf

ROLE = Path(__file__).resolve().parents[2] / "roles" / "celery_worker"
DEFAULTS = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())
SPEC = yaml.safe_load((ROLE / "meta" / "argument_specs.yml").read_text())["argument_specs"]["main"]["options"]
SETTING_SPEC = SPEC["celery_worker_defaults"]["options"]


def layered(group_names=("web", "workers"), group=None, host=None, profile="", profiles=None):
    return cf.worker_settings(DEFAULTS["celery_worker_defaults"],
                              DEFAULTS["celery_worker_profiles"] if profiles is None else profiles,
                              profile, list(group_names), group or {}, host or {}, SETTING_SPEC)


def errors_of(**kwargs):
    return " ".join(layered(**kwargs)["errors"])


def test_the_mission_defaults_are_valid_for_every_group():
    for group in ("web", "batch", "gpu"):
        result = layered(group_names=[group, "workers"])
        assert result["errors"] == [], (group, result["errors"])
        assert result["profile"] == group
    web = layered()["settings"]
    assert (web["queues"], web["concurrency"], web["prefetch_multiplier"]) == (["default", "priority"], 8, 4)
    batch = layered(group_names=["batch"])["settings"]
    assert (batch["queues"], batch["concurrency"], batch["max_tasks_per_child"]) == (["batch"], 4, 1000)


def test_layers_combine_in_order_and_origins_name_the_last_layer():
    result = layered(group={"concurrency": 6, "loglevel": "DEBUG"}, host={"concurrency": 2})
    assert result["settings"]["concurrency"] == 2
    assert result["settings"]["loglevel"] == "DEBUG"
    assert result["settings"]["prefetch_multiplier"] == 4
    assert result["settings"]["pool"] == "prefork"
    assert result["origins"]["concurrency"] == "celery_worker_host_settings.concurrency"
    assert result["origins"]["loglevel"] == "celery_worker_group_settings.loglevel"
    assert result["origins"]["prefetch_multiplier"] == "celery_worker_profiles.web.prefetch_multiplier"
    assert result["origins"]["pool"] == "celery_worker_defaults.pool"


def test_a_host_in_two_profiled_groups_is_refused_naming_both_and_the_way_out():
    result = layered(group_names=["gpu", "web", "workers"])
    message = " ".join(result["errors"])
    assert "gpu and web" in message and "celery_worker_profile" in message, message
    assert result["profile"] == ""
    # Naming the profile settles it.
    chosen = layered(group_names=["gpu", "web", "workers"], profile="web")
    assert chosen["errors"] == [] and chosen["profile"] == "web"
    assert chosen["settings"]["node_name"] == "web-worker@%h"


def test_a_host_in_no_profiled_group_or_an_unknown_profile_is_refused():
    assert "celery_worker_profile must be one of ['batch', 'gpu', 'web']" in errors_of(group_names=["workers"])
    assert "got 'mystery'" in errors_of(profile="mystery")


# The bad-input cases of the fleet scenario, and more that no test listed before.
CASES = {
    "concurrency-zero": (
        {"host": {"concurrency": 0}},
        ["celery_worker_host_settings.concurrency must be an integer >= 1 and <= 10000 (a positive integer); "
         "got 0."]),
    "concurrency-in-the-millions": ({"host": {"concurrency": 10**9}}, ["<= 10000", "got 1000000000"]),
    "instances-in-the-millions": ({"host": {"instances": 10**9}}, ["instances must be a positive integer up to 256"]),
    "time-limit-of-a-year": ({"group": {"time_limit": 31536000}}, ["time_limit must be an integer >= 1 and <= 604800"]),
    "concurrency-not-an-integer": (
        {"host": {"concurrency": "eight"}}, ["celery_worker_host_settings.concurrency", "got 'eight'"]),
    "concurrency-a-boolean": ({"host": {"concurrency": True}}, ["concurrency", "got true"]),
    "concurrency-a-float": ({"group": {"concurrency": 2.5}}, ["celery_worker_group_settings.concurrency", "2.5"]),
    "unknown-pool": (
        {"host": {"pool": "fork"}},
        ["celery_worker_host_settings.pool must be one of: prefork, threads, solo, eventlet, gevent; got 'fork'."]),
    "unknown-pool-in-a-profile": (
        {"profiles": {**DEFAULTS["celery_worker_profiles"], "web": {"pool": "forkserver", "queues": ["default"]}}},
        ["celery_worker_profiles.web.pool must be one of: prefork"]),
    "empty-queues": ({"host": {"queues": []}}, ["celery_worker_host_settings.queues", "non-empty list"]),
    "queues-a-string": ({"host": {"queues": "default"}}, ["celery_worker_host_settings.queues", "got 'default'"]),
    "malformed-queue": (
        {"host": {"queues": ["default", "bad queue"]}},
        ["celery_worker_host_settings.queues", "bad queue", "letters, digits"]),
    "queue-with-a-path": ({"host": {"queues": ["../etc"]}}, ["celery_worker_host_settings.queues", "../etc"]),
    "duplicate-queue": ({"host": {"queues": ["default", "default"]}}, ["distinct queue names"]),
    "soft-not-below-hard": (
        {"host": {"soft_time_limit": 400, "time_limit": 300}},
        ["celery_worker_host_settings.soft_time_limit (400)", "must be below",
         "celery_worker_host_settings.time_limit (300)"]),
    "negative-prefetch": (
        {"host": {"prefetch_multiplier": -1}},
        ["celery_worker_host_settings.prefetch_multiplier", "integer >= 1", "got -1"]),
    "node-name-without-host": ({"host": {"node_name": "web"}}, ["must look like name@host", "got 'web'"]),
    "node-name-with-a-space": ({"host": {"node_name": "web worker@%h"}}, ["no whitespace"]),
    "node-name-with-a-newline": ({"host": {"node_name": "web@%h\n"}}, ["must look like name@host", "got 'web@%h\\n'"]),
    "node-name-with-a-quote": ({"host": {"node_name": 'web"@%h'}}, ["must look like name@host"]),
    "queue-with-a-newline": ({"host": {"queues": ["default\n"]}}, ["celery_worker_host_settings.queues"]),
    "memory-max-not-a-string": ({"host": {"memory_max": 2}}, ["memory_max", "got 2"]),
    "bad-autoscale": ({"host": {"autoscale": {"max": 1, "min": 4}}}, ["autoscale", "N >= M >= 0"]),
    "autoscale-needs-prefork": ({"host": {"autoscale": {"max": 4, "min": 1}, "pool": "threads"}},
                                ["needs pool prefork", "with pool threads"]),
    "bad-loglevel": ({"host": {"loglevel": "verbose"}}, ["loglevel must be one of: DEBUG, INFO"]),
    "bad-memory-max": ({"host": {"memory_max": "2 GB"}}, ["memory_max", "got '2 GB'"]),
    "bad-cpu-quota": ({"host": {"cpu_quota": "2"}}, ["cpu_quota", "percentage"]),
    "unknown-rolling-mode": ({"group": {"rolling_mode": "blue_green"}},
                             ["celery_worker_group_settings.rolling_mode must be one of: stop_start, surge",
                              "got 'blue_green'"]),
    "zero-surge-memory": ({"host": {"surge_memory": "0"}}, ["celery_worker_host_settings.surge_memory", "got '0'"]),
    "surge-memory-over-100-percent": ({"host": {"surge_memory": "150%"}}, ["from 1% to 100%", "got '150%'"]),
    "surge-memory-with-a-space": ({"host": {"surge_memory": "2 G"}}, ["surge_memory", "got '2 G'"]),
    "surge-memory-huge": ({"host": {"surge_memory": "9" * 40}}, ["up to 15 digits"]),
    "null-instances-without-gpus": ({"host": {"instances": None}}, ["instances must be a positive integer", "null"]),
    "unknown-gpu-mode": ({"host": {"gpu_mode": "all"}}, ["gpu_mode must be one of: none, per_device, shared"]),
    "unknown-setting": (
        {"group": {"concurency": 8}}, ["Unknown worker setting(s) ['celery_worker_group_settings.concurency']"]),
    "unknown-setting-in-another-profile": (
        {"profiles": {**DEFAULTS["celery_worker_profiles"], "batch": {"queues": ["batch"], "timelimit": 9}}},
        ["celery_worker_profiles.batch.timelimit"]),
    "settings-not-a-mapping": ({"host": ["concurrency", 8]}, ["celery_worker_host_settings must be a mapping"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_settings_are_refused_naming_the_variable_the_value_and_what_is_allowed(case):
    kwargs, phrases = CASES[case]
    message = errors_of(**kwargs)
    for phrase in phrases:
        assert phrase in message, f"{phrase!r} not in {message!r}"


def test_every_error_is_reported_at_once():
    result = layered(host={"concurrency": 0, "pool": "fork", "loglevel": "loud"})
    assert len(result["errors"]) == 3, result["errors"]
    # An unknown key elsewhere does not hide them.
    result = layered(group={"timelimit": 9}, host={"concurrency": 0})
    assert len(result["errors"]) == 2 and "concurrency" in result["errors"][1], result["errors"]


def test_a_defaults_mapping_replaced_without_some_settings_is_refused_not_crashed():
    defaults = {key: value for key, value in DEFAULTS["celery_worker_defaults"].items() if key != "pool"}
    result = cf.worker_settings(defaults, DEFAULTS["celery_worker_profiles"], "", ["web"], {}, {}, SETTING_SPEC)
    assert "Worker setting(s) ['pool'] are set in no layer" in " ".join(result["errors"]), result["errors"]


def test_a_profile_that_is_not_a_name_is_refused_not_crashed():
    message = errors_of(profile=["web"])
    assert "celery_worker_profile must be the name of a group" in message and "got ['web']" in message


def test_choices_come_from_the_argument_spec():
    narrow = {**SETTING_SPEC, "pool": {**SETTING_SPEC["pool"], "choices": ["solo"]}}
    result = cf.worker_settings(DEFAULTS["celery_worker_defaults"], {}, "web", ["web"], {}, {"pool": "solo"}, narrow)
    assert "celery_worker_defaults" not in " ".join(result["errors"])
    assert "must be one of: solo" in " ".join(cf.worker_settings(
        DEFAULTS["celery_worker_defaults"], {"web": {}}, "", ["web"], {}, {}, narrow)["errors"])


# --- The roll --------------------------------------------------------------------------------------

GROUPS = {"web": ["web1", "web2", "web3", "web4", "web5"], "batch": ["batch1", "batch2"], "gpu": ["gpu1"],
          "ml2": ["ml1", "ml2", "ml3"], "workers": ["web1", "web2", "web3", "web4", "web5", "batch1", "batch2",
                                                    "gpu1", "ml1", "ml2", "ml3"]}


def test_plan_rolls_groups_in_order_and_no_batch_spans_two_groups():
    plan = cf.rolling_plan(["web", "batch", "gpu", "ml2"], [1, "25%"], GROUPS, GROUPS["workers"])
    assert plan["errors"] == []
    assert plan["hosts"] == ["web1", "web2", "web3", "web4", "web5", "batch1", "batch2", "gpu1", "ml1", "ml2", "ml3"]
    # web: canary, then 25% of 5 = 1; batch: 1, 1; gpu: 1; ml2: 1, then 25% of 3 rounds down to 0 -> 1.
    assert plan["batches"] == [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]
    big = cf.rolling_plan(["web", "batch"], [1, "50%"], GROUPS, GROUPS["web"] + GROUPS["batch"])
    assert big["batches"] == [1, 2, 2, 1, 1]


def test_plan_of_one_group_holding_every_host():
    plan = cf.rolling_plan(["workers"], [1, "25%"], GROUPS, GROUPS["workers"])
    assert plan["errors"] == [] and plan["hosts"] == GROUPS["workers"]
    assert plan["batches"] == [1, 2, 2, 2, 2, 2]


def test_plan_takes_serials_as_ansible_does_numbers_given_as_strings_included():
    assert cf.rolling_plan(["workers"], "3", GROUPS, GROUPS["workers"])["batches"] == [3, 3, 3, 2]
    assert cf.rolling_plan(["workers"], ["1", "50%"], GROUPS, GROUPS["workers"])["batches"] == [1, 5, 5]
    assert cf.rolling_plan(["workers"], 2, GROUPS, GROUPS["workers"])["batches"] == [2] * 5 + [1]


def test_plan_follows_the_run_s_hosts_under_limit():
    plan = cf.rolling_plan(["web", "batch", "gpu"], [1, "25%"], GROUPS, ["web2", "web4", "batch1"])
    assert plan["hosts"] == ["web2", "web4", "batch1"] and plan["batches"] == [1, 1, 1]


@pytest.mark.parametrize("order, serial, phrase", [
    (["web", "batch"], [1], "worker hosts in none of them: ['gpu1', 'ml1', 'ml2', 'ml3']"),
    (["web", "nope"], [1], "does not have: ['nope']"),
    ("web", [1], "non-empty list of distinct inventory group names; got 'web'"),
    (["web", "web"], [1], "distinct"),
    ([], [1], "non-empty list"),
    (["workers"], [0], "celery_worker_rolling_serial must be a positive integer"),
    (["workers"], ["0%"], "got ['0%']"),
    (["workers"], "250%", "got '250%'"),
    (["workers"], [], "got []"),
    (["workers"], [1, "x"], "got [1, 'x']"),
])
def test_plan_refuses_orders_and_serials_that_cannot_roll_the_fleet(order, serial, phrase):
    plan = cf.rolling_plan(order, serial, GROUPS, GROUPS["workers"])
    assert phrase in " ".join(plan["errors"]), plan["errors"]
    assert plan["batches"] == []


def test_plan_takes_min_online_as_extra_vars_give_it():
    assert cf.rolling_plan(["workers"], [1], GROUPS, GROUPS["workers"], "2")["errors"] == []
    assert cf.rolling_plan(["workers"], [1], GROUPS, GROUPS["workers"], 0)["errors"] == []


def test_a_bad_serial_alone_does_not_blame_the_order():
    assert cf.rolling_plan(["workers"], [0], GROUPS, GROUPS["workers"])["errors"] == [
        "celery_worker_rolling_serial must be a positive integer, a percentage from 1% to 100%, or a non-empty list "
        "of those (batch sizes within each group, the last one repeated); got [0]."]


@pytest.mark.parametrize("min_online", [-1, "-1", "two", True, 1.5])
def test_plan_refuses_a_min_online_that_is_not_a_count(min_online):
    errors = cf.rolling_plan(["workers"], [1], GROUPS, GROUPS["workers"], min_online)["errors"]
    assert "celery_worker_rolling_min_online must be null or an integer >= 0" in " ".join(errors)


WEB_NODES = {"web1": {"web-worker@web1": ["default", "priority"]},
             "web2": {"web-worker@web2": ["default", "priority"]},
             "web3": {"web-worker@web3": ["default", "priority"]}}
SERVING = {node: [{"name": "default"}, {"name": "priority"}] for nodes in WEB_NODES.values() for node in nodes}


def test_guard_counts_the_other_nodes_in_service_outside_the_batch():
    guard = cf.capacity_guard("web-worker@web1", "web", WEB_NODES, ["web2"], None, SERVING)
    assert guard["counted"] == ["web-worker@web3"] and guard["needed"] == 1 and guard["refusal"] == ""


def test_guard_refuses_when_a_node_is_drained_or_silent():
    half = {**SERVING, "web-worker@web3": [{"name": "default"}]}
    guard = cf.capacity_guard("web-worker@web1", "web", WEB_NODES, [], None, half)
    assert guard["in_service"] == ["web-worker@web2"]
    assert guard["refusal"] == ("Capacity guard: 1 other node(s) of group web are in service (web-worker@web2); "
                                "celery_worker_rolling_min_online needs 2; web-worker@web3 does not consume priority. "
                                "Not draining web-worker@web1")
    lost = cf.capacity_guard("web-worker@web1", "web", WEB_NODES, [], None, {})["refusal"]
    assert ("are in service (none); celery_worker_rolling_min_online needs 2; web-worker@web2 does not answer; "
            "web-worker@web3 does not answer. Not draining") in lost


def test_guard_min_online_overrides_and_unknown_hosts_need_it():
    assert cf.capacity_guard("web-worker@web1", "web", WEB_NODES, [], 1, {"web-worker@web2": SERVING[
        "web-worker@web2"]})["refusal"] == ""
    limited = {**WEB_NODES, "web3": None}
    refusal = cf.capacity_guard("web-worker@web1", "web", limited, [], None, SERVING)["refusal"]
    assert "host(s) web3 of group web are not in this run (--limit?)" in refusal
    assert cf.capacity_guard("web-worker@web1", "web", limited, [], 1, SERVING)["refusal"] == ""
    # A host left out (a lost one, with --limit '!web3') is named when the guard refuses.
    assert cf.capacity_guard("web-worker@web1", "web", limited, [], 2, {})["refusal"] == (
        "Capacity guard: 0 other node(s) of group web are in service (none); celery_worker_rolling_min_online "
        "needs 2; web-worker@web2 does not answer; host(s) web3 of group web are not in this run, their nodes "
        "unknown. Not draining web-worker@web1")


def test_drain_timeout_is_prefetch_times_the_hard_limit_plus_the_margin():
    assert cf.drain_timeout({"prefetch_multiplier": 4, "time_limit": 360}, 30) == 1470
    assert cf.drain_timeout({"prefetch_multiplier": "1", "time_limit": "2"}, "0") == 2


def test_consumers_to_restore_are_the_queues_an_answering_node_lacks():
    expected = {"web-worker@web1": ["default", "priority"], "web-worker@web2": ["default", "priority"],
                "batch-worker@batch1": ["batch"]}
    replies = {"web-worker@web1": [], "web-worker@web2": [{"name": "priority"}, {"name": "extra"}]}
    assert cf.consumers_to_restore(expected, replies) == [
        ["web-worker@web1", "default"], ["web-worker@web1", "priority"], ["web-worker@web2", "default"]]
    assert cf.consumers_to_restore(expected, {}) == []


def test_transport_options_put_the_visibility_timeout_above_the_fleet_s_longest_task():
    options = cf.transport_options(3900, 0, 600, 30)
    assert options == {"visibility_timeout": 4500, "socket_timeout": 30.0, "socket_connect_timeout": 30.0,
                       "socket_keepalive": True, "unacked_mutex_expire": 30}
    # A restore's lock left by a killed client blocks restores for 30 s, not kombu's 300.
    assert cf.transport_options(360, 0, 600, 5)["unacked_mutex_expire"] == 30
    assert cf.transport_options(360, 0, 600, 5)["visibility_timeout"] == 3600
    assert cf.transport_options(360, 7200, 600, 5)["visibility_timeout"] == 7200


def test_the_fleet_s_longest_task_counts_every_worker_host_each_with_its_own_layers():
    hosts = [{"group_names": ["web"]},
             {"group_names": ["batch"], "celery_worker_host_settings": {"time_limit": 3900, "soft_time_limit": 3800}},
             {"group_names": ["web", "gpu"]}]  # refused by its own preflight: left out here
    assert cf.fleet_time_limit(hosts, DEFAULTS["celery_worker_defaults"], DEFAULTS["celery_worker_profiles"],
                               SETTING_SPEC) == 3900
    assert cf.fleet_time_limit([], DEFAULTS["celery_worker_defaults"], {}, SETTING_SPEC) == 0


SYSTEMCTL_SHOW = """Id=celery-worker@web.service
ActiveState=active
ActiveEnterTimestamp=Sat 2026-11-28 00:31:16.250000 UTC

Id=celery-worker@old.service
ActiveState=inactive
ActiveEnterTimestamp=

Id=celery-worker@gpu-2.service
ActiveState=active
ActiveEnterTimestamp=Sat 2026-11-28 00:31:20.000000 UTC
"""


def test_unit_start_times_are_read_for_active_instances_only():
    started = cf.unit_start_times(SYSTEMCTL_SHOW)
    assert set(started) == {"web", "gpu-2"}
    assert started["gpu-2"] - started["web"] == pytest.approx(3.75)
    assert cf.unit_start_times("") == {}


def test_pending_restarts_are_the_running_instances_older_than_a_file_they_start_with():
    started = cf.unit_start_times(SYSTEMCTL_SHOW)
    web, gpu = started["web"], started["gpu-2"]
    instances = [{"name": "web"}, {"name": "gpu-2"}, {"name": "new"}]
    files = [{"path": "/etc/celery-fleet/celery.env", "mtime": web - 60},
             {"path": "/etc/celery-fleet/instances/web.env", "mtime": web + 1},  # changed after web started
             {"path": "/etc/systemd/system/celery-worker@gpu-2.service.d/10-celery-fleet.conf", "mtime": gpu - 1}]
    assert cf.pending_restarts(instances, started, files, "/etc/celery-fleet", False) == ["web"]
    # A release to switch to: every running instance (never one that does not run yet).
    assert cf.pending_restarts(instances, started, files, "/etc/celery-fleet", True) == ["web", "gpu-2"]
    shared = files + [{"path": "/etc/systemd/system/celery-worker@.service", "mtime": gpu + 5}]
    assert cf.pending_restarts(instances, started, shared, "/etc/celery-fleet", False) == ["web", "gpu-2"]


def test_the_fleet_s_queues_are_each_profile_s_over_every_worker_host():
    hosts = [{"group_names": ["web"]}, {"group_names": ["batch"]},
             {"group_names": ["batch"], "celery_worker_host_settings": {"queues": ["batch", "reports"]}},
             {"group_names": ["broker"]}]  # no worker profile: not a worker group
    assert cf.fleet_queues(hosts, DEFAULTS["celery_worker_defaults"], DEFAULTS["celery_worker_profiles"],
                           SETTING_SPEC) == {"batch": ["batch", "reports"], "web": ["default", "priority"]}


def test_the_capacity_guard_asks_only_the_nodes_it_counts():
    assert cf.capacity_guard_nodes("web-worker@web1", WEB_NODES, []) == ["web-worker@web2", "web-worker@web3"]
    assert cf.capacity_guard_nodes("web-worker@web1", WEB_NODES, ["web2"]) == ["web-worker@web3"]
    limited = {**WEB_NODES, "web3": None}
    assert cf.capacity_guard_nodes("web-worker@web1", limited, ["web2"]) == []
