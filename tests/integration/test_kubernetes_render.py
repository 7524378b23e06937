"""playbooks/kubernetes.yml end to end on the controller: the manifests it writes for the lab and the example
production inventory, each object validated strictly against Kubernetes 1.37's schema (kubernetes-validate) and
the KEDA objects against KEDA's own API schema (kedaschema); the refusals happen before anything is written.
The image and the preStop drain run for real on the lab: molecule/fleet/tests/test_kubernetes_pod.py."""

import base64
import json
import os
import stat

import kubernetes_validate
import pytest
import yaml

import celery_fleet as cf
import fleetload
import kedaschema

PROJECT = fleetload.PROJECT
LAB = PROJECT / "inventories" / "lab"
PRODUCTION = PROJECT / "inventories" / "production.example"
KUBERNETES_VERSION = "1.37.0"
# The example inventory's vault is only an example (vault.yml.example): its two passwords given here.
PRODUCTION_VAULT = ["-e", "vault_celery_broker_password=example-broker-password-0123456789",
                    "-e", "vault_celery_broker_admin_password=example-admin-password-0123456789"]


@pytest.fixture
def production_vault(tmp_path, monkeypatch):
    """The example inventory is not the lab: a vault password file of its own (the lab's public one is refused)."""
    password_file = tmp_path / "vault-password"
    password_file.write_text("example-vault-password-not-the-lab-s\n")
    monkeypatch.setenv("ANSIBLE_VAULT_PASSWORD_FILE", str(password_file))


def kubernetes_defaults(**changes):
    """-e arguments setting celery_worker_kubernetes_defaults: the role's, with these keys changed (an extra var
    replaces the whole mapping)."""
    defaults = yaml.safe_load((PROJECT / "roles/celery_worker/defaults/main.yml").read_text())
    return ["-e", json.dumps({"celery_worker_kubernetes_defaults":
                              dict(defaults["celery_worker_kubernetes_defaults"], **changes)})]


def render(tmp_path, inventory, *extra):
    out = tmp_path / "manifests"
    rc, output = fleetload.run_playbook("kubernetes.yml", "-e", f"celery_worker_kubernetes_output_dir={out}", *extra,
                                        inventory=inventory, timeout=300)
    return rc, output, out


def assert_valid(objects):
    """Every core object against Kubernetes' schema (strict: no unknown field), every KEDA object against KEDA's."""
    keda = [document for _, document in objects.values() if document["apiVersion"].startswith("keda.sh/")]
    for name, (_, document) in objects.items():
        if document["apiVersion"].startswith("keda.sh/"):
            continue
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
    results = kedaschema.validate(keda)
    assert results and all(error is None for error in results.values()), results
    return results


def lab_password():
    rc_vars = fleetload.inventory_list(LAB)
    return rc_vars["_meta"]["hostvars"]["web1"]["vault_celery_broker_password"]


def test_the_lab_renders_valid_manifests_with_the_secret_only_in_the_secret(tmp_path):
    stale = tmp_path / "manifests"
    stale.mkdir()
    (stale / "10-old-worker.yaml").write_text("# a group the inventory no longer has\n")
    rc, output, out = render(tmp_path, LAB)
    assert rc == 0, output[-3000:]
    assert sorted(path.name for path in out.iterdir()) == ["00-common.yaml", "10-batch-worker.yaml",
                                                           "10-gpu-worker.yaml", "10-web-worker.yaml"]
    assert all(stat.S_IMODE(path.stat().st_mode) == 0o600 for path in out.iterdir())
    objects = fleetload.manifest_objects(out)
    keda = assert_valid(objects)
    assert sorted(keda) == ["ScaledObject/batch-worker", "ScaledObject/gpu-worker", "ScaledObject/web-worker",
                            "TriggerAuthentication/celery-fleet-broker"]
    # The password: nowhere in plain text, in the Secret's base64 data only.
    password = lab_password()
    encoded = cf.url_secret(password)
    for path in out.iterdir():
        text = path.read_text()
        assert password not in text and encoded not in text, path.name
    secret = objects["Secret/celery-fleet-broker"][1]["data"]
    url = base64.b64decode(secret["CELERY_BROKER_URL"]).decode()
    assert url == f"redis://celery:{encoded}@broker1:6379/0"
    # The pods restart when what they read at start changes.
    annotations = objects["Deployment/web-worker"][1]["spec"]["template"]["metadata"]["annotations"]
    assert len(annotations["celery-fleet/config-digest"]) == 64
    assert base64.b64decode(secret["redis-password"]).decode() == password
    # The pod runs `celery worker` with exactly the systemd instance's options; each number as derived.
    web = objects["Deployment/web-worker"][1]
    container = web["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["celery", "--app", "celery_fleet_runtime:app", "worker"]
    assert container["args"] == ["--hostname=web-worker@%h", "--queues=default,priority", "--pool=prefork",
                                 "--loglevel=INFO", "--prefetch-multiplier=4", "--time-limit=360",
                                 "--soft-time-limit=300", "--concurrency=8", "--without-mingle", "--without-gossip"]
    assert web["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 4 * 360 + 30 + 20 + 360 + 30
    assert container["lifecycle"]["preStop"]["exec"]["command"] == ["python", "-m", "celery_fleet_pod", "drain"]
    assert {"name": "CELERY_FLEET_DRAIN_SECONDS", "value": "1470"} in container["env"]
    assert web["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    assert "replicas" not in web["spec"]  # the scaler owns the count
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    gpu = objects["Deployment/gpu-worker"][1]["spec"]["template"]["spec"]["containers"][0]
    assert gpu["resources"]["limits"] == {"nvidia.com/gpu": 1}
    assert "CUDA_VISIBLE_DEVICES" not in json.dumps(gpu)
    assert objects["PodDisruptionBudget/batch-worker"][1]["spec"]["maxUnavailable"] == 1
    # The scaler: one redis trigger per queue and priority sub-list, summed.
    scaled = objects["ScaledObject/web-worker"][1]["spec"]
    lists = [trigger["metadata"]["listName"] for trigger in scaled["triggers"]]
    assert lists == cf.priority_lists("default") + cf.priority_lists("priority")
    assert scaled["advanced"]["scalingModifiers"]["formula"] == " + ".join(f"list{i}" for i in range(8))
    assert (scaled["minReplicaCount"], scaled["maxReplicaCount"]) == (2, 8)
    # The ConfigMap holds the fleet's settings as the hosts' celery.env has them.
    config = objects["ConfigMap/celery-fleet-worker"][1]["data"]
    assert config["CELERY_TASK_ACKS_LATE"] == "true" and config["CELERY_TASK_REJECT_ON_WORKER_LOST"] == "true"
    assert json.loads(config["CELERY_BROKER_TRANSPORT_OPTIONS"])["visibility_timeout"] > 360
    # The README shows one manifest as rendered.
    readme = (PROJECT / "README.md").read_text()
    block = readme.split("<!-- rendered: 10-batch-worker.yaml -->\n```yaml\n", 1)[1].split("```\n", 1)[0]
    assert block == (out / "10-batch-worker.yaml").read_text()


def test_an_in_cluster_broker_and_the_hpa_render_valid_manifests(tmp_path):
    rc, output, out = render(tmp_path, LAB, "-e", "celery_worker_kubernetes_broker=in-cluster",
                             *kubernetes_defaults(scaler="hpa"))
    assert rc == 0, output[-3000:]
    objects = fleetload.manifest_objects(out)
    for name, (_, document) in objects.items():
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
    assert not [name for name in objects if name.startswith(("ScaledObject", "TriggerAuthentication"))]
    hpa = objects["HorizontalPodAutoscaler/web-worker"][1]["spec"]
    assert hpa["metrics"][0]["external"]["metric"]["selector"]["matchExpressions"][0]["values"] == \
        ["default", "priority"]
    redis = objects["StatefulSet/celery-fleet-redis"][1]
    assert redis["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "1Gi"
    config = base64.b64decode(objects["Secret/celery-fleet-redis"][1]["data"]["redis.conf"]).decode()
    assert "appendonly yes" in config and "maxmemory-policy noeviction" in config
    acl = base64.b64decode(objects["Secret/celery-fleet-redis"][1]["data"]["users.acl"]).decode()
    assert acl.splitlines()[0].startswith("user default off") and "+flushall" not in acl
    url = base64.b64decode(objects["Secret/celery-fleet-broker"][1]["data"]["CELERY_BROKER_URL"]).decode()
    # A name KEDA's operator resolves too, from its own namespace.
    assert url.endswith("@celery-fleet-redis.celery-fleet.svc:6379/0")


def test_the_production_example_renders_valid_manifests(tmp_path, production_vault):
    """With KEDA's Prometheus trigger on the fleet exporter's metrics."""
    rc, output, out = render(tmp_path, PRODUCTION, *PRODUCTION_VAULT,
                             "-e", "celery_worker_kubernetes_prometheus_url=http://prometheus.monitoring.svc:9090",
                             *kubernetes_defaults(scaler="keda-prometheus"))
    assert rc == 0, output[-3000:]
    objects = fleetload.manifest_objects(out)
    assert_valid(objects)
    trigger = objects["ScaledObject/web-worker"][1]["spec"]["triggers"][0]["metadata"]
    # Raw strings (backticks): PromQL reads no escape in them. Ready plus held by pods.
    assert trigger["query"] == ("sum(celery_fleet_queue_ready_messages{queue=~`^(default|priority)$`}) + "
                                "sum(celery_fleet_queue_unacked_messages{queue=~`^(default|priority)$`})"), trigger
    # Three web hosts, two batch hosts; the GPU host's devices are found by nvidia-smi on the host, which a
    # render cannot run: one pod until the group's replicas say more.
    replicas = {name: objects[f"ScaledObject/{name}"][1]["spec"]["minReplicaCount"]
                for name in ("web-worker", "batch-worker", "gpu-worker")}
    assert replicas == {"web-worker": 3, "batch-worker": 2, "gpu-worker": 1}
    gpu = objects["Deployment/gpu-worker"][1]["spec"]["template"]["spec"]
    assert gpu["containers"][0]["resources"]["limits"] == {"memory": "24Gi", "nvidia.com/gpu": 1}
    assert gpu["terminationGracePeriodSeconds"] == 1 * 1900 + 30 + 20 + 1900 + 30


def test_bad_input_is_refused_before_anything_is_written(tmp_path, production_vault):
    """Every refusal of one run at once (the assert reports them all), each naming its variable."""
    bad = {"grace_period_seconds": 600, "gpus_per_pod": 0, "scale_queues": [], "scaler": "keda-prometheus"}
    rc, output, out = render(tmp_path, PRODUCTION, *PRODUCTION_VAULT,
                             "-e", json.dumps({"celery_worker_kubernetes_group_settings": bad}))
    assert rc != 0
    output = " ".join(output.split())  # the callback wraps long messages
    for fragment in ("celery_worker_kubernetes_group_settings.grace_period_seconds (group batch) (600 s) is shorter",
                     "Set it to at least",
                     "celery_worker_kubernetes_group_settings.gpus_per_pod (group gpu) must be at least 1",
                     "celery_worker_kubernetes_group_settings.scale_queues (group web) must be null",
                     "a scaler needs a queue",
                     "no Prometheus is known: set celery_worker_kubernetes_prometheus_url",
                     "Nothing was written"):
        assert fragment in output, (fragment, output[-3000:])
    assert not out.exists()

