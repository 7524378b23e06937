"""The Kubernetes view of the worker groups (celery_fleet.kubernetes_workers): every number the manifests
carry, derived from the same settings layers as the systemd instances, and the refusals of settings
Kubernetes would run differently. Rendering and schema validation: tests/integration/test_kubernetes_render.py."""

import types
from pathlib import Path

import pytest
import yaml
from kombu.transport.redis import PRIORITY_STEPS, Channel

import celery_fleet as cf

ROLE = Path(__file__).resolve().parents[2] / "roles" / "celery_worker"
DEFAULTS = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())
SPEC = yaml.safe_load((ROLE / "meta" / "argument_specs.yml").read_text())["argument_specs"]["main"]["options"]
SETTING_SPEC = SPEC["celery_worker_defaults"]["options"]
KUBE_SPEC = SPEC["celery_worker_kubernetes_defaults"]["options"]
ROLLING = {"serial": DEFAULTS["celery_worker_rolling_serial"], "min_online": None,
           "drain_margin": DEFAULTS["celery_worker_rolling_drain_margin"]}


def host(name, group, **variables):
    return {"inventory_hostname": name, "group_names": [group, "workers"], **variables}


LAB = [host("web1", "web"), host("web2", "web"), host("batch1", "batch"),
       host("gpu1", "gpu", celery_worker_gpu_devices=[0, 1])]


def render(hosts=LAB, rolling=None, kube=None):
    result = cf.kubernetes_workers(hosts, DEFAULTS["celery_worker_defaults"], DEFAULTS["celery_worker_profiles"],
                                   SETTING_SPEC, dict(DEFAULTS["celery_worker_kubernetes_defaults"], **(kube or {})),
                                   KUBE_SPEC, rolling or ROLLING)
    return result, {group["group"]: group for group in result["groups"]}


def test_priority_lists_are_kombu_s_own_names():
    channel = types.SimpleNamespace(sep=Channel.sep, priority_steps=PRIORITY_STEPS)
    channel.priority = lambda step: Channel.priority(channel, step)
    assert list(cf.KOMBU_PRIORITY_STEPS) == list(PRIORITY_STEPS)
    for queue in ("default", "ml", "a.b:c-d"):
        assert cf.priority_lists(queue) == [Channel._q_for_pri(channel, queue, step) for step in PRIORITY_STEPS]
    assert cf.priority_lists("ml") == ["ml", "ml\x06\x163", "ml\x06\x166", "ml\x06\x169"]


def test_the_lab_groups_derive_from_their_worker_settings():
    result, groups = render()
    assert result["errors"] == []
    assert sorted(groups) == ["batch", "gpu", "web"]
    web, batch, gpu = groups["web"], groups["batch"], groups["gpu"]
    # Replicas: what the inventory runs (2 web hosts; one batch host; one pinned instance per GPU on gpu1).
    assert (web["replicas"], batch["replicas"], gpu["replicas"]) == (2, 1, 2)
    # The scaler's defaults: from the inventory's count to four times it, a pod's slots x prefetch per pod.
    assert (web["min_replicas"], web["max_replicas"], web["target_per_replica"]) == (2, 8, 8 * 4)
    assert batch["target_per_replica"] == 4 * 1
    # Queues, every priority sub-list of each.
    assert web["scale_queues"] == ["default", "priority"]
    assert web["scale_lists"] == cf.priority_lists("default") + cf.priority_lists("priority")
    assert len(gpu["scale_lists"]) == 4


def test_the_container_arguments_are_the_systemd_instance_s():
    """Every group: the pod's `celery worker` options are exactly those of a systemd instance of the group (the
    GPU group's systemd instances differ only in the indexed node name, one instance per device)."""
    _, groups = render()
    for name, group in groups.items():
        settings = group["settings"]
        instances = cf.worker_instances(settings, name, ["0", "1"])
        for instance in instances:
            systemd = instance["arguments"].split()
            assert [a for a in systemd if not a.startswith("--hostname=")] == \
                [a for a in group["arguments"] if not a.startswith("--hostname=")], name
        assert f"--hostname={settings['node_name']}" in group["arguments"]
        assert f"--queues={','.join(settings['queues'])}" in group["arguments"]
    assert "--max-tasks-per-child=1000" in groups["batch"]["arguments"]
    assert "--concurrency=8" in groups["web"]["arguments"]


def test_the_grace_period_holds_the_drain_and_the_hard_limit():
    _, groups = render()
    for group in groups.values():
        settings = group["settings"]
        drain = settings["prefetch_multiplier"] * settings["time_limit"] + ROLLING["drain_margin"]
        assert group["prestop_seconds"] == drain == cf.drain_timeout(settings, ROLLING["drain_margin"])
        # The hook's own overhead, then TimeoutStopSec after the drain: systemd's own stop timeout.
        assert group["grace_seconds"] == drain + cf.POD_HOOK_OVERHEAD + cf.stop_timeout(settings)
        assert group["grace_seconds"] > group["prestop_seconds"] + settings["time_limit"]
    # web: 4 x 360 + 30 = 1470 s of drain, 20 s for the hook, then 360 + 30.
    assert groups["web"]["grace_seconds"] == 1470 + 20 + 390


def test_a_grace_period_shorter_than_drain_and_hard_limit_is_refused_naming_the_variable():
    hosts = [host("web1", "web", celery_worker_kubernetes_group_settings={"grace_period_seconds": 300})] + LAB[1:]
    result, _ = render(hosts)
    message = " ".join(result["errors"])
    assert "celery_worker_kubernetes_group_settings.grace_period_seconds (group web) (300 s)" in message
    assert "at least 1880" in message and "time_limit" in message
    # At the floor: accepted; a second below: refused.
    hosts[0]["celery_worker_kubernetes_group_settings"]["grace_period_seconds"] = 1880
    assert render(hosts)[0]["errors"] == []
    hosts[0]["celery_worker_kubernetes_group_settings"]["grace_period_seconds"] = 1879
    assert render(hosts)[0]["errors"]


def test_gpu_pods_request_one_gpu_each_and_a_gpu_group_without_gpus_is_refused():
    _, groups = render()
    assert groups["gpu"]["resources"]["limits"] == {"nvidia.com/gpu": 1}
    assert groups["gpu"]["gpus"] == 1 and groups["web"]["gpus"] == 0
    assert "nvidia.com/gpu" not in groups["web"]["resources"]["limits"]
    hosts = LAB[:3] + [host("gpu1", "gpu", celery_worker_kubernetes_group_settings={"gpus_per_pod": 0})]
    result, _ = render(hosts)
    assert any("celery_worker_kubernetes_group_settings.gpus_per_pod (group gpu) must be at least 1" in error
               and "gpu_mode is per_device" in error for error in result["errors"]), result["errors"]
    # No spare GPU for a surge pod: GPU pods are replaced a batch at a time.
    assert groups["gpu"]["strategy"] == {"maxSurge": 0, "maxUnavailable": 1}
    # shared: the device plugin gives a GPU to one pod, so pods cannot share a host's GPUs as instances do.
    shared = {"gpu_mode": "shared", "instances": 2}
    hosts = LAB[:3] + [host("gpu1", "gpu", celery_worker_group_settings=shared, celery_worker_gpu_devices=[0, 1])]
    result, _ = render(hosts)
    assert any("gpus_per_pod must be set for group gpu, whose gpu_mode is shared" in error
               for error in result["errors"]), result["errors"]
    hosts[-1]["celery_worker_kubernetes_group_settings"] = {"gpus_per_pod": 1}
    result, groups = render(hosts)
    assert result["errors"] == [] and groups["gpu"]["replicas"] == 2
    # Another extended resource name, e.g. for AMD.
    hosts = LAB[:3] + [host("gpu1", "gpu", celery_worker_kubernetes_group_settings={"gpu_resource": "amd.com/gpu"})]
    assert render(hosts)[1]["gpu"]["resources"]["limits"] == {"amd.com/gpu": 1}


def test_a_scaler_without_a_queue_is_refused():
    for bad in ([], ["not-consumed"], "default"):
        hosts = [host("web1", "web", celery_worker_kubernetes_group_settings={"scale_queues": bad})] + LAB[1:]
        result, _ = render(hosts)
        assert any("celery_worker_kubernetes_group_settings.scale_queues (group web)" in error
                   and "a scaler needs a queue" in error for error in result["errors"]), (bad, result["errors"])
    hosts = [host("web1", "web", celery_worker_kubernetes_group_settings={"scale_queues": ["priority"]})] + LAB[1:]
    result, groups = render(hosts)
    assert result["errors"] == [] and groups["web"]["scale_lists"] == cf.priority_lists("priority")


def test_the_roll_and_the_budget_follow_the_serial_and_the_guard():
    # The guard's default (every other node in service): pods surge, none goes before its replacement serves.
    _, groups = render()
    assert groups["web"]["strategy"] == {"maxSurge": 1, "maxUnavailable": 0}
    assert groups["web"]["budget"] == {"maxUnavailable": 1}
    # 8 web hosts, serial [1, "25%"]: batches of 2 after the canary; min_online 5 lets 2 go (8 - 5 = 3, capped).
    hosts = [host(f"web{i}", "web") for i in range(8)]
    _, groups = render(hosts, rolling=dict(ROLLING, min_online=5))
    assert groups["web"]["replicas"] == 8
    assert groups["web"]["strategy"] == {"maxSurge": 2, "maxUnavailable": 2}
    assert groups["web"]["budget"] == {"minAvailable": 5}
    # min_online 7 of 8: only one may go at a time.
    _, groups = render(hosts, rolling=dict(ROLLING, min_online="7"))
    assert groups["web"]["strategy"] == {"maxSurge": 2, "maxUnavailable": 1}
    # A minimum that leaves no pod to evict would block every node drain: refused.
    result, _ = render(rolling=dict(ROLLING, min_online=2))
    assert any("celery_worker_rolling_min_online (2) must be below group web's fewest pods" in error
               for error in result["errors"]), result["errors"]
    # A minimum that is no number is the roll's own error (not a crash).
    result, _ = render(rolling=dict(ROLLING, min_online="many"))
    assert any("celery_worker_rolling_min_online must be null or an integer >= 0; got 'many'" in error
               for error in result["errors"]), result["errors"]
    # A bad serial is the roll's own error.
    result, _ = render(rolling=dict(ROLLING, serial="0%"))
    assert any("celery_worker_rolling_serial" in error for error in result["errors"])


def test_solo_pods_have_no_control_api_probes():
    _, groups = render()
    assert groups["web"]["probes"] is True
    hosts = [host("batch1", "batch", celery_worker_group_settings={"pool": "solo"})]
    assert render(hosts)[1]["batch"]["probes"] is False


def test_resources_come_from_memory_max_and_cpu_quota():
    hosts = [host("batch1", "batch", celery_worker_group_settings={"memory_max": "2G", "cpu_quota": "150%"})]
    result, groups = render(hosts)
    assert result["errors"] == []
    assert groups["batch"]["resources"] == {"limits": {"memory": "2Gi", "cpu": "1500m"},
                                            "requests": {"memory": "2Gi", "cpu": "1500m"}}
    assert cf.kubernetes_memory("512M") == "512Mi" and cf.kubernetes_memory("1048576") == "1048576"
    assert cf.kubernetes_memory("infinity") is None and cf.kubernetes_cpu("200%") == "2"
    # A percentage has no Kubernetes meaning: the operator must give the limit.
    hosts = [host("batch1", "batch", celery_worker_group_settings={"memory_max": "50%"})]
    result, _ = render(hosts)
    assert any("celery_worker_kubernetes_defaults.memory_limit must be set for group batch" in error
               and "celery_worker_group_settings.memory_max" in error
               for error in result["errors"]), result["errors"]
    hosts[0]["celery_worker_kubernetes_group_settings"] = {"memory_limit": "3Gi"}
    result, groups = render(hosts)
    assert result["errors"] == [] and groups["batch"]["resources"]["limits"]["memory"] == "3Gi"


@pytest.mark.parametrize("settings, fragment", [
    ({"scaler": "keda"}, "scaler (group web) must be one of: keda-redis, keda-prometheus, hpa, none; got 'keda'"),
    ({"replicas": -1}, "replicas (group web) must be null or an integer >= 0; got -1"),
    ({"max_replicas": 0}, "max_replicas (group web) must be null or an integer >= 1; got 0"),
    ({"min_replicas": 9, "max_replicas": 3}, "(9) must not exceed"),
    ({"memory_request": "lots"}, "memory_request (group web) must be a Kubernetes quantity"),
    ({"cpu_request": "2 cores"}, "cpu_request (group web) must be a Kubernetes quantity"),
    ({"replica": 2}, "unknown Kubernetes setting(s) ['replica']"),
])
def test_bad_kubernetes_settings_are_refused_naming_the_variable(settings, fragment):
    hosts = [host("web1", "web", celery_worker_kubernetes_group_settings=settings)] + LAB[1:]
    result, _ = render(hosts)
    assert any(fragment in error for error in result["errors"]), result["errors"]


def test_bad_worker_settings_stop_the_render_too():
    hosts = [host("web1", "web", celery_worker_group_settings={"concurrency": "eight"})] + LAB[1:]
    result, groups = render(hosts)
    assert any(error.startswith("group web: celery_worker_group_settings.concurrency") for error in result["errors"])
    assert "web" not in groups
    # A host's own layer is not a Deployment's: pods of a group are alike.
    hosts = [host("web1", "web", celery_worker_host_settings={"concurrency": 2})] + LAB[1:]
    assert "--concurrency=8" in render(hosts)[1]["web"]["arguments"]


def test_an_inventory_without_worker_groups_is_refused():
    result, _ = render(hosts=[{"inventory_hostname": "x", "group_names": ["other"]}])
    assert any("No worker group to render" in error for error in result["errors"])


def test_the_prometheus_selector_matches_only_the_named_queues():
    import re

    selector = cf.prometheus_queue_selector(["default", "a.b"])
    pattern = re.compile(f"^({selector})$")
    assert pattern.match("a.b") and pattern.match("default")
    assert not pattern.match("aXb") and not pattern.match("default2")


def test_an_extra_variable_may_not_hide_one_the_fleet_or_the_pod_hooks_set():
    role = yaml.safe_load((ROLE / "vars" / "main.yml").read_text())
    for name in list(role["_celery_worker_fleet_environment"]) + ["CELERY_FLEET_NODE_NAME", "CELERY_FLEET_QUEUES",
                                                                  "CELERY_FLEET_DRAIN_SECONDS"]:
        assert cf.environment_errors({name: "x"}), name
