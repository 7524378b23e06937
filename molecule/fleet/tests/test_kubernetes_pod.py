"""The worker image for real, on the lab's network against the lab's broker, run as the rendered Deployment
runs it (the container's command and arguments, its ConfigMap, Secret and env, a read-only root, no
capabilities, the image's non-root user): two pods join the fleet as web nodes under a load of ledger tasks of
0-5 s. One gets its preStop hook (`docker exec ... celery_fleet_pod drain`) then `docker stop` (SIGTERM to
Celery as PID 1); the other only `docker stop`. Every task finishes or goes back to the queue and runs
elsewhere: lost 0, run twice 0, no WorkerLostError, both stops warm (exit 0 well inside the grace period)."""

import base64
import json
import subprocess
import time

import pytest

import fleetlab
import fleetload

LAB = fleetlab.LAB_INVENTORY
NETWORK = "celery-fleet-lab"
PODS = ("celery-fleet-lab-pod1", "celery-fleet-lab-pod2")


def docker(*arguments, check=True, timeout=300):
    return subprocess.run(["docker", *arguments], capture_output=True, text=True, check=check, timeout=timeout)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """The lab's manifests and its worker image, built by the playbook (--tags image)."""
    out = tmp_path_factory.mktemp("kubernetes") / "manifests"
    rc, output = fleetload.run_playbook("kubernetes.yml", "--tags", "all,image", "-e",
                                        f"celery_worker_kubernetes_output_dir={out}", inventory=LAB, timeout=900)
    assert rc == 0, output[-3000:]
    return {name: document for name, (_, document) in fleetload.manifest_objects(out).items()}


def pod_environment(objects, deployment):
    """The environment Kubernetes would give the pod: the ConfigMap, the Secret's keys the container names,
    the container's own values."""
    container = objects[f"Deployment/{deployment}"]["spec"]["template"]["spec"]["containers"][0]
    environment = dict(objects["ConfigMap/celery-fleet-worker"]["data"])
    secret = objects["Secret/celery-fleet-broker"]["data"]
    for variable in container["env"]:
        if "valueFrom" in variable:
            environment[variable["name"]] = base64.b64decode(
                secret[variable["valueFrom"]["secretKeyRef"]["key"]]).decode()
        else:
            environment[variable["name"]] = variable["value"]
    return container, environment


@pytest.fixture
def pods(rendered, tmp_path):
    container, environment = pod_environment(rendered, "web-worker")
    env_file = tmp_path / "pod.env"
    env_file.write_text("".join(f"{name}={value}\n" for name, value in environment.items()))
    env_file.chmod(0o600)
    image = container["image"]
    for name in PODS:
        docker("rm", "-f", name, check=False)
        docker("run", "--detach", "--name", name, "--hostname", name.rsplit("-", 1)[1], "--network", NETWORK,
               "--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
               "--env-file", str(env_file), "--entrypoint", container["command"][0], image,
               *container["command"][1:], *container["args"])
    try:
        yield container
    finally:
        for name in PODS:
            docker("rm", "-f", name, check=False)


def hook(pod, command):
    run = docker("exec", pod, *command, check=False, timeout=600)
    return run.returncode, json.loads(run.stdout.strip().splitlines()[-1]) if run.stdout.strip() else run.stderr


def wait_ready(pod, container, seconds=90):
    deadline = time.monotonic() + seconds
    while True:
        rc, outcome = hook(pod, container["readinessProbe"]["exec"]["command"])
        if rc == 0:
            return outcome
        assert time.monotonic() < deadline, f"{pod} not ready: {outcome}"
        time.sleep(1)


def stop(pod, grace):
    started = time.monotonic()
    docker("stop", "--time", str(grace), pod, timeout=grace + 60)
    seconds = time.monotonic() - started
    state = json.loads(docker("inspect", "--format", "{{json .State}}", pod).stdout)
    return seconds, state, docker("logs", pod).stdout + docker("logs", pod).stderr


def test_the_rendered_arguments_are_those_of_the_lab_s_systemd_instances(rendered):
    """Compared with the files the role wrote on the lab's hosts: each group's pod runs its instances' options
    (gpu1's two instances differ only in their indexed node names)."""
    for deployment, host, instances in (("web-worker", "web1", ["web"]), ("batch-worker", "batch1", ["batch"]),
                                        ("gpu-worker", "gpu1", ["gpu-1", "gpu-2"])):
        args = rendered[f"Deployment/{deployment}"]["spec"]["template"]["spec"]["containers"][0]["args"]
        for instance in instances:
            systemd = fleetload.env_file(f"celery-fleet-lab-{host}",
                                         f"/etc/celery-fleet/instances/{instance}.env")["CELERY_WORKER_ARGS"].split()
            assert [a for a in systemd if not a.startswith("--hostname=")] == \
                [a for a in args if not a.startswith("--hostname=")], (deployment, instance)
            if len(instances) == 1:
                assert systemd == args


def test_pods_of_the_image_drain_on_prestop_and_stop_warmly_under_load(rendered, pods):
    container = pods
    grace = rendered["Deployment/web-worker"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    nodes = {f"web-worker@{pod.rsplit('-', 1)[1]}": pod for pod in PODS}
    for pod in PODS:
        ready = wait_ready(pod, container)
        assert ready["ready"] and ready["consuming"] == ["default", "priority"], ready
        rc, alive = hook(pod, container["livenessProbe"]["exec"]["command"])
        assert rc == 0 and alive["alive"] and alive["broker"] == "answers", alive
    client = fleetload.lab_client(LAB)
    consuming = fleetload.discover_nodes(client, fleetlab.EXPECTED_NODES + len(PODS))
    assert set(nodes) <= set(consuming), sorted(consuming)
    load = fleetload.Load(client, consuming, rates={"default": 8, "priority": 2}, durations=(0.0, 5.0))
    load.start()
    time.sleep(10)
    # Pod 1: the preStop hook, then SIGTERM.
    first, second = PODS
    rc, drained = hook(first, container["lifecycle"]["preStop"]["exec"]["command"])
    assert rc == 0 and drained["drained"] and drained["pending"]["total"] == 0, drained
    rc, ready = hook(first, container["readinessProbe"]["exec"]["command"])
    assert rc == 1 and ready["consuming"] == [], ready
    first_stop = stop(first, grace)
    time.sleep(5)
    # Pod 2: SIGTERM alone, while it runs tasks.
    app = client.app("pod-pending")
    try:
        pending = app.control.inspect(destination=[f"web-worker@{second.rsplit('-', 1)[1]}"],
                                      timeout=2.0).active() or {}
    finally:
        app.close()
    second_stop = stop(second, grace)
    time.sleep(3)
    records = load.finish(complete_timeout=120)
    report = fleetload.analyse(load.producer.sent, records, load.monitor.samples,
                               {node: "web" for node in consuming}, load.marks, {}, load.starts)
    summary = {key: report[key] for key in ("sent", "completed", "lost", "duplicates", "started_again",
                                            "redelivered", "ran_per_node")}
    summary.update(drain=drained, active_at_plain_stop=sum(len(tasks) for tasks in pending.values()),
                   stop_seconds=[round(first_stop[0], 1), round(second_stop[0], 1)])
    print(f"pods under load: {json.dumps(summary, sort_keys=True)}")
    assert not load.producer.errors and not load.producer.send_failures
    assert report["sent"] >= 100
    assert (report["lost"], report["duplicates"], report["started_again"], report["unknown"]) == (0, 0, 0, 0), \
        summary
    for node in nodes:
        assert report["ran_per_node"].get(node, 0) > 0, (node, report["ran_per_node"])
    for seconds, state, logs in (first_stop, second_stop):
        # Warm: Celery exits by itself, well inside the grace period, and nothing was killed.
        assert state["ExitCode"] == 0 and not state["OOMKilled"], state
        assert seconds < 60, seconds
        assert "Warm shutdown" in logs or "worker: Warm shutdown" in logs, logs[-2000:]
        assert not fleetlab.KILLED.search(logs), fleetlab.KILLED.search(logs).group(0)
