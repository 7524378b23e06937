"""Pure logic of the celery_worker role: worker instances, their command lines, GPU detection.

Kept in Python so it is unit-tested (tests/unit/test_filters.py) and the unit templates stay short.
"""

import re

NVIDIA_SMI_LINE = re.compile(r"^GPU (?P<index>\d+): .*?(?:\(UUID: (?P<uuid>[^)]+)\))?\s*$")


def parse_nvidia_smi(stdout):
    """Device indices from `nvidia-smi -L` output, in the order listed ("GPU 0: ... (UUID: ...)")."""
    devices = []
    for line in (stdout or "").splitlines():
        match = NVIDIA_SMI_LINE.match(line.strip())
        if match:
            devices.append(match.group("index"))
    return devices


def wheel_platforms(architecture, glibc_version="2.36", oldest_minor=17):
    """pip --platform tags a host with this glibc accepts, newest first (pip does not expand them)."""
    major, minor = (int(part) for part in str(glibc_version).split(".")[:2])
    if major != 2:
        raise ValueError(f"unsupported glibc version {glibc_version!r}")
    tags = [f"manylinux_2_{m}_{architecture}" for m in range(minor, oldest_minor - 1, -1)]
    return tags + [f"manylinux2014_{architecture}", f"linux_{architecture}"]


def _indexed_node_name(node_name, index):
    """web-worker@%h -> web-worker-2@%h: unique names for several instances on one host."""
    name, at, host = node_name.partition("@")
    return f"{name}-{index}{at}{host}"


def worker_instances(settings, group, gpu_devices=None):
    """The worker instances one host runs, each with its unit instance name, node name and devices.

    settings: the combined settings of the host (see roles/celery_worker/defaults/main.yml).
    group: the worker group name (web, batch, gpu...), used for unit instance names.
    gpu_devices: device ids of the host; used when settings['gpu_mode'] is per_device or shared.
    """
    gpu_devices = [str(device) for device in (gpu_devices or [])]
    gpu_mode = settings.get("gpu_mode", "none")
    if gpu_mode == "per_device":
        count = settings.get("instances") or len(gpu_devices)
    else:
        count = settings.get("instances") or 1
    instances = []
    for index in range(1, count + 1):
        if count == 1:
            name, node_name = group, settings["node_name"]
        else:
            name, node_name = f"{group}-{index}", _indexed_node_name(settings["node_name"], index)
        if gpu_mode == "per_device":
            devices = gpu_devices[index - 1:index]
        elif gpu_mode == "shared":
            devices = gpu_devices
        else:
            devices = []
        instances.append({
            "name": name,
            "index": index,
            "node_name": node_name,
            "cuda_visible_devices": ",".join(devices) if gpu_mode != "none" else None,
            "arguments": worker_arguments(settings, node_name),
            "timeout_stop_sec": stop_timeout(settings),
        })
    return instances


def stop_timeout(settings):
    """Seconds systemd waits for a warm shutdown: the longest a task may run, plus a margin."""
    return int(settings["time_limit"]) + int(settings.get("stop_timeout_margin", 30))


def worker_arguments(settings, node_name):
    """The `celery worker` command-line options for one instance, as one string.

    systemd splits $CELERY_WORKER_ARGS at whitespace without quote processing, so no value may
    contain whitespace; the role's preflight rejects such values before they get here.
    """
    arguments = [
        f"--hostname={node_name}",
        f"--queues={','.join(settings['queues'])}",
        f"--pool={settings['pool']}",
        f"--loglevel={settings.get('loglevel', 'INFO')}",
        f"--prefetch-multiplier={settings['prefetch_multiplier']}",
        f"--time-limit={settings['time_limit']}",
        f"--soft-time-limit={settings['soft_time_limit']}",
    ]
    autoscale = settings.get("autoscale")
    if autoscale:
        arguments.append(f"--autoscale={autoscale['max']},{autoscale['min']}")
    else:
        arguments.append(f"--concurrency={settings['concurrency']}")
    if settings.get("max_tasks_per_child"):
        arguments.append(f"--max-tasks-per-child={settings['max_tasks_per_child']}")
    if settings.get("max_memory_per_child"):
        arguments.append(f"--max-memory-per-child={settings['max_memory_per_child']}")
    # Nodes need no mingle/gossip to work; without them a restart joins faster.
    arguments += ["--without-mingle", "--without-gossip"]
    return " ".join(arguments)


def node_names(node_name_templates, hostname):
    """Expand Celery's %h/%n/%d in node names as the worker will (hostname = the host's FQDN)."""
    short, _, domain = hostname.partition(".")
    expanded = []
    for template in node_name_templates:
        expanded.append(
            template.replace("%h", hostname).replace("%n", short).replace("%d", domain)
        )
    return expanded


def in_service(nodes, active_queues, expected):
    """The nodes that answered active_queues and consume all the queues `expected` says they should.

    active_queues: {node: [{"name": queue, ...}, ...]} as Celery's inspect returns it;
    expected: {node: [queue, ...]}. A node not in `expected` is never in service.
    """
    serving = []
    for node in nodes:
        if node not in expected or node not in (active_queues or {}):
            continue
        consumed = {queue.get("name") for queue in active_queues[node] or []}
        if set(expected[node]) <= consumed:
            serving.append(node)
    return serving


def setting_origins(defaults, profile_name, profile, group_settings, host_settings):
    """For each worker setting, the variable that set it last (the layers combine in this order)."""
    origins = {}
    layers = [
        ("celery_worker_defaults", defaults),
        (f"celery_worker_profiles.{profile_name}", profile),
        ("celery_worker_group_settings", group_settings),
        ("celery_worker_host_settings", host_settings),
    ]
    for variable, layer in layers:
        for key in layer or {}:
            origins[key] = f"{variable}.{key}"
    return origins


def duplicates(values):
    """Values that occur more than once, sorted."""
    seen, repeated = set(), set()
    for value in values:
        (repeated if value in seen else seen).add(value)
    return sorted(repeated)


class FilterModule:
    def filters(self):
        return {
            "celery_fleet_parse_nvidia_smi": parse_nvidia_smi,
            "celery_fleet_wheel_platforms": wheel_platforms,
            "celery_fleet_worker_instances": worker_instances,
            "celery_fleet_worker_arguments": worker_arguments,
            "celery_fleet_node_names": node_names,
            "celery_fleet_duplicates": duplicates,
            "celery_fleet_setting_origins": setting_origins,
            "celery_fleet_in_service": in_service,
        }
