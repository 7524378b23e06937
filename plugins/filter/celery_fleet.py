"""Pure logic of the celery_worker role: settings layering and validation, worker instances and their
command lines, GPU detection, and the arithmetic of a roll (batches, capacity guard, drain deadline).

Kept in Python so it is unit-tested (tests/unit/test_filters.py, tests/unit/test_settings.py) and the
YAML only orchestrates.
"""

import hashlib
import json
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


# A surge process of an instance (rolling_mode surge) is named after the instance's node: web-worker@%h ->
# web-worker-surge@%h.
SURGE_SUFFIX = "-surge"


def surge_node_name(node_name):
    """web-worker@web1 -> web-worker-surge@web1: the node of an instance's surge process."""
    name, at, host = node_name.partition("@")
    return f"{name}{SURGE_SUFFIX}{at}{host}"


def worker_instances(settings, group, gpu_devices=None):
    """The worker instances one host runs, each with its unit instance name, node name and devices.

    settings: the combined settings of the host (see roles/celery_worker/defaults/main.yml).
    group: the worker group name (web, batch, gpu...), used for unit instance names.
    gpu_devices: device ids of the host; used when settings['gpu_mode'] is per_device or shared.
    """
    gpu_devices = [str(device) for device in (gpu_devices or [])]
    gpu_mode = settings["gpu_mode"]
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
            # rolling_mode surge: the node and options of the instance's second process during a roll.
            "surge_node_name": surge_node_name(node_name) if settings.get("rolling_mode") == "surge" else None,
            "surge_arguments": (worker_arguments(settings, surge_node_name(node_name))
                                if settings.get("rolling_mode") == "surge" else None),
        })
    return instances


_SYSTEMD_UNITS = {"": 1, "K": 1024, "M": 1024 ** 2, "G": 1024 ** 3, "T": 1024 ** 4}


def _systemd_bytes(value, memory_total):
    """Bytes of a systemd memory size ("2G", "512M", "50%" of memory_total); None for "", infinity, 0, a size
    beyond a pebibyte, or a percentage without memory_total."""
    match = re.fullmatch(r"([0-9]{1,15})([KMGT]?)|([0-9]{1,3})%", str(value or ""))
    if not match:
        return None
    if match.group(3) is not None:
        size = memory_total * int(match.group(3)) // 100 if memory_total else 0
    else:
        size = int(match.group(1)) * _SYSTEMD_UNITS[match.group(2)]
    return size if 0 < size <= 2 ** 50 else None


def _gib(size):
    return f"{size / 1024 ** 3:.2f} GiB"


def surge_memory(settings, instance_count, memory_total, origins=None):
    """Whether a host may roll in rolling_mode surge: its instances and one surge process more (one instance of a
    host rolls at a time) must fit in its memory, each process counted at memory_max (its cgroup's cap, which the
    surge process gets too), or at surge_memory (what the operator declares one process needs) where there is no
    cap. A GPU instance's surge process would load its model a second time on the instance's GPU(s), whose memory
    no check here can see: refused. Returns {"needed", "available" (bytes or None), "error" ("" when allowed)}."""
    origins = origins or {}
    if settings.get("rolling_mode") != "surge":
        return {"needed": None, "available": memory_total, "error": ""}
    where = {key: origins.get(key, f"celery_worker_defaults.{key}")
             for key in ("rolling_mode", "memory_max", "surge_memory", "gpu_mode")}
    refusal = {"needed": None, "available": memory_total}
    if settings.get("gpu_mode", "none") != "none":
        return refusal | {"error": (
            f"{where['rolling_mode']} is surge, which runs a second process of an instance during its roll, on the "
            f"same GPU(s) ({where['gpu_mode']} is {settings.get('gpu_mode')}): the model would be loaded twice in "
            f"GPU memory nothing here can check. Set rolling_mode to stop_start for GPU groups.")}
    if not memory_total:
        return refusal | {"error": (
            f"{where['rolling_mode']} is surge, but the host's memory could not be read (/proc/meminfo), so its "
            f"room for a second process cannot be checked; set rolling_mode to stop_start.")}
    process = (_systemd_bytes(settings.get("memory_max"), memory_total)
               or _systemd_bytes(settings.get("surge_memory"), memory_total))
    if process is None:
        return refusal | {"error": (
            f"{where['rolling_mode']} is surge, which runs a second process of an instance during its roll, but how "
            f"much memory a process takes is not known: set {where['memory_max']} (systemd's MemoryMax per process, "
            f"e.g. 2G) or, without one, {where['surge_memory']} (what one worker process needs, e.g. 2G), or set "
            f"rolling_mode to stop_start.")}
    needed = process * (int(instance_count) + 1)
    if needed > memory_total:
        return {"needed": needed, "available": memory_total, "error": (
            f"{where['rolling_mode']} is surge, which needs memory for the host's {instance_count} instance(s) and "
            f"one surge process: {int(instance_count) + 1} x {_gib(process)} = {_gib(needed)}, more than the "
            f"host's {_gib(memory_total)}. Lower {where['memory_max']} (or {where['surge_memory']} without one), or "
            f"set rolling_mode to stop_start.")}
    return {"needed": needed, "available": memory_total, "error": ""}


def stop_timeout(settings):
    """Seconds systemd waits for a warm shutdown: the longest a task may run, plus a margin."""
    return int(settings["time_limit"]) + int(settings["stop_timeout_margin"])


def worker_arguments(settings, node_name):
    """The `celery worker` command-line options for one instance, as one string.

    systemd splits $CELERY_WORKER_ARGS at whitespace without quote processing, so no value may
    contain whitespace; the role's preflight rejects such values before they get here.
    """
    arguments = [
        f"--hostname={node_name}",
        f"--queues={','.join(settings['queues'])}",
        f"--pool={settings['pool']}",
        f"--loglevel={settings['loglevel']}",
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
    return [node for node in nodes if node in expected and not _service_gap(node, active_queues, expected[node])]


def _service_gap(node, active_queues, queues):
    """Why `node` is not in service ('' when it is): it did not answer active_queues, or it lacks queues."""
    if node not in (active_queues or {}):
        return f"{node} does not answer"
    lacking = sorted(set(queues) - {queue.get("name") for queue in active_queues[node] or []})
    return f"{node} does not consume {', '.join(lacking)}" if lacking else ""


def unreached(ping_results):
    """[{"host", "reason"}] for each host whose ping or fact-gathering result ({host: registered result}) is not a
    pong or facts: unreachable, or failed to run a module (a stopped container, a host without Python)."""
    lost = []
    for host, result in sorted((ping_results or {}).items()):
        reached = (result or {}).get("ping") == "pong" or (result or {}).get("ansible_facts")
        if reached and not (result or {}).get("failed") and not (result or {}).get("unreachable"):
            continue
        result = result or {}
        # The connection's own words first (e.g. docker's "Container ... is not running"), then Ansible's.
        details = [module.get("module_stderr") for module in (result.get("failed_modules") or {}).values()
                   if isinstance(module, dict)]
        details += [result.get("module_stderr"), result.get("msg")]
        reason = next((line.strip() for text in details if text for line in str(text).splitlines() if line.strip()),
                      "no answer")
        lost.append({"host": host, "reason": f"{host}: {reason[:300]}"})
    return lost


_MEMORY_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1024, "m": 1000 ** 2, "mb": 1024 ** 2, "g": 1000 ** 3,
                 "gb": 1024 ** 3}


def memory_bytes(value, variable="a memory size"):
    """Bytes in a Redis memory size ("0", "64mb", "1gb", 1048576), read as redis.conf does: k/m/g are powers
    of 1000, kb/mb/gb of 1024, case-insensitive. Anything else raises an error naming `variable`."""
    from ansible.errors import AnsibleFilterError

    match = re.fullmatch(r"([0-9]{1,15})([kmg]?b?)", str(value), re.IGNORECASE | re.ASCII)
    size = int(match.group(1)) * _MEMORY_UNITS[match.group(2).lower()] if match else None
    # Above a pebibyte nobody means it, and Redis's own parser overflows (17179869184gb reads as no cap).
    if isinstance(value, bool) or size is None or size > 2 ** 50:
        raise AnsibleFilterError(f"{variable} must be a Redis memory size up to 1024 TiB: a whole number of "
                                 f"bytes, or one with a unit k, kb, m, mb, g or gb (e.g. 256mb); got {value!r}")
    return size


# Variables the role writes itself (celery.env and the instance files): an extra variable must not hide one.
FLEET_ENVIRONMENT = ("CELERY_APP", "CELERY_FLEET_APP", "CELERY_FLEET_RUNTIME_DIGEST", "PYTHONPATH",
                     "CELERY_BROKER_URL", "CELERY_RESULT_BACKEND", "CELERY_TASK_ACKS_LATE",
                     "CELERY_TASK_REJECT_ON_WORKER_LOST", "CELERY_RESULT_EXPIRES", "CELERY_BROKER_TRANSPORT_OPTIONS",
                     "CELERY_WORKER_ARGS", "CUDA_VISIBLE_DEVICES", "CELERY_FLEET_TASK_EVENTS",
                     "CELERY_FLEET_BROKER_CA_DIGEST", "CELERY_FLEET_NODE_NAME", "CELERY_FLEET_QUEUES",
                     "CELERY_FLEET_DRAIN_SECONDS")


# Variables Celery's CLI or settings, or Python, read before the fleet's settings apply: one of them in the
# extra environment would change which broker, app or code the workers use.
OVERRIDING_ENVIRONMENT = ("APP", "BROKER_URL", "RESULT_BACKEND", "LOADER", "CONFIG_MODULE", "CELERY_BROKER_READ_URL",
                          "CELERY_BROKER_WRITE_URL", "CELERY_CONFIG_MODULE", "CELERY_LOADER", "PYTHONSAFEPATH",
                          "PYTHONHOME", "PYTHONSTARTUP", "PYTHONINSPECT", "PYTHONUSERBASE", "LD_PRELOAD",
                          "LD_LIBRARY_PATH")


def environment_errors(variables, variable="celery_worker_extra_environment"):
    """Errors in extra environment variables ({name: value}), each naming the variable. The file is read by
    systemd (EnvironmentFile) and sourced by sh (the celery-fleet command), so a value is written in double
    quotes and may hold nothing either reads differently: no newline, '"', '\\', '$' or '`'."""
    if not isinstance(variables, dict):
        return [f"{variable} must be a mapping of names to values; got {type(variables).__name__}."]
    errors = []
    for name, value in variables.items():
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,127}", name, re.ASCII):
            errors.append(f"{variable}: {name!r} is not a variable name (a letter or '_', then letters, digits, "
                          f"'_'; up to 128).")
        elif name in FLEET_ENVIRONMENT:
            errors.append(f"{variable}: {name} is set by the role itself; use the role's variable for it.")
        elif name in OVERRIDING_ENVIRONMENT:
            errors.append(f"{variable}: {name} would change which broker, application or code the workers use "
                          f"(Celery or Python reads it before the fleet's settings apply); it may not be set.")
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            errors.append(f"{variable}[{name!r}] must be a string or a number; got {type(value).__name__}.")
        elif re.search(r'[\n\r\0"\\$`]', str(value)) or len(str(value)) > 4096:
            errors.append(f"{variable}[{name!r}] may not hold a newline, NUL, '\"', '\\', '$' or '`' (the file is "
                          f"read by systemd and by sh) nor exceed 4096 characters.")
    return errors


def wheelhouse_source_errors(index_url, extra_index_urls, find_links):
    """Errors in where the controller gets wheels from, each naming the variable (and an item's position, never an
    index URL itself: it may hold credentials)."""
    errors = []

    def url_ok(url):
        return isinstance(url, str) and re.fullmatch(r"https?://[^\s/@]+(@[^\s/@]+)?(/\S*)?", url, re.ASCII)

    if index_url != "" and not url_ok(index_url):
        errors.append("celery_worker_wheelhouse_index_url must be \"\" (pip's own index) or an http:// or https:// URL "
                      "with no spaces.")
    if not isinstance(extra_index_urls, list):
        errors.append("celery_worker_wheelhouse_extra_index_urls must be a list of http:// or https:// URLs.")
    else:
        errors += [f"celery_worker_wheelhouse_extra_index_urls[{position}] must be an http:// or https:// URL with no "
                   f"spaces." for position, url in enumerate(extra_index_urls) if not url_ok(url)]
    if not isinstance(find_links, list):
        errors.append("celery_worker_wheelhouse_find_links must be a list of absolute directory paths.")
    else:
        errors += [f"celery_worker_wheelhouse_find_links[{position}] must be an absolute directory path on the "
                   f"controller; got {_show(path)}." for position, path in enumerate(find_links)
                   if not (isinstance(path, str) and path.startswith("/") and "\n" not in path)]
    return errors


def duplicates(values):
    """Values that occur more than once, sorted."""
    seen, repeated = set(), set()
    for value in values:
        (repeated if value in seen else seen).add(value)
    return sorted(repeated)


# --- Settings: one layering, one validation --------------------------------------------------------

# Patterns are matched whole (fullmatch): a trailing newline would split an environment file's line.
QUEUE_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]*")
# Celery expands %h, %n and %d; nothing that a shell, systemd or an env file would read specially.
NODE_NAME_PATTERN = re.compile(r"[A-Za-z0-9_.%-]+@[A-Za-z0-9_.%-]+")
MEMORY_MAX_PATTERN = re.compile(r"|[0-9]+[KMGT]?|[0-9]+%|infinity")
CPU_QUOTA_PATTERN = re.compile(r"|[0-9]+%")
SURGE_MEMORY_PATTERN = re.compile(r"|[1-9][0-9]{0,14}[KMGT]?|([1-9][0-9]?|100)%")
# Integer settings and their allowed range: an instance or slot count in the millions is a typo that would
# make the controller loop or a host fork without end; a week is longer than any task should run.
INTEGER_RANGE = {"concurrency": (1, 10000), "prefetch_multiplier": (1, 10000), "max_tasks_per_child": (0, None),
                 "max_memory_per_child": (0, None), "soft_time_limit": (1, 604800), "time_limit": (1, 604800),
                 "stop_timeout_margin": (0, 86400)}
MAX_INSTANCES = 256


def _is_integer(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _show(value):
    """A value as the operator wrote it, for error messages."""
    if isinstance(value, str):
        return repr(str(value))
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def worker_profile(explicit, group_names, profiles):
    """The profile a host takes: celery_worker_profile when set, else the one group of the host that has
    a profile. '' when there is none or more than one (worker_settings() says which)."""
    if explicit and isinstance(explicit, str):
        return explicit
    matching = [group for group in group_names or [] if group in (profiles or {})]
    return matching[0] if len(matching) == 1 and not explicit else ""


def _layers(defaults, profile, profiles, group_settings, host_settings):
    """The layers a host's worker settings combine from, last wins: the only place this order is written."""
    profile_layer = (profiles.get(profile) if isinstance(profiles, dict) else None) or {}
    return [("celery_worker_defaults", defaults),
            (f"celery_worker_profiles.{profile}", profile_layer),
            ("celery_worker_group_settings", group_settings),
            ("celery_worker_host_settings", host_settings)]


def _profile_errors(explicit, group_names, profiles):
    matching = [group for group in group_names or [] if group in (profiles or {})]
    if explicit and not isinstance(explicit, str):
        return [f"celery_worker_profile must be the name of a group in celery_worker_profiles "
                f"{sorted(profiles or {})}; got {_show(explicit)}."]
    if explicit:
        if explicit not in (profiles or {}):
            return [f"celery_worker_profile must be one of {sorted(profiles or {})}; got {_show(explicit)}."]
        return []
    if not matching:
        return [f"celery_worker_profile must be one of {sorted(profiles or {})} (the host's groups are "
                f"{sorted(group_names or [])}); got ''. Put the host in one of those groups or set "
                f"celery_worker_profile."]
    if len(matching) > 1:
        return [f"The host is in {len(matching)} groups that have a worker profile ({' and '.join(sorted(matching))}); "
                f"a host takes exactly one. Set celery_worker_profile (host_vars) to one of them, or take the host "
                f"out of all but one of those groups."]
    return []


def _setting_errors(settings, origins, spec):
    """Errors of the combined settings; each names the variable that set the bad value."""
    errors = []

    def where(key):
        return origins.get(key, f"celery_worker_defaults.{key}")

    for key, value in settings.items():
        if key not in spec:
            continue
        choices = spec[key].get("choices")
        if choices and value not in choices:
            errors.append(f"{where(key)} must be one of: {', '.join(map(str, choices))}; got {_show(value)}.")
    for key, (minimum, maximum) in INTEGER_RANGE.items():
        value = settings.get(key)
        if not _is_integer(value) or value < minimum or (maximum is not None and value > maximum):
            kind = "a positive integer" if minimum == 1 else "a non-negative integer"
            bound = f" and <= {maximum}" if maximum is not None else ""
            errors.append(f"{where(key)} must be an integer >= {minimum}{bound} ({kind}); got {_show(value)}.")
    soft, hard = settings.get("soft_time_limit"), settings.get("time_limit")
    if _is_integer(soft) and _is_integer(hard) and soft >= hard:
        errors.append(f"{where('soft_time_limit')} ({soft}) must be below {where('time_limit')} ({hard}), "
                      f"so that a task can clean up before it is killed.")
    queues = settings.get("queues")
    if (not isinstance(queues, list) or not queues
            or not all(isinstance(queue, str) and QUEUE_PATTERN.fullmatch(queue) for queue in queues)
            or len(set(queues)) != len(queues)):
        errors.append(f"{where('queues')} must be a non-empty list of distinct queue names, each matching "
                      f"{QUEUE_PATTERN.pattern} (letters, digits, '_', '.', ':', '-'); got {_show(queues)}.")
    node_name = settings.get("node_name")
    if not isinstance(node_name, str) or not NODE_NAME_PATTERN.fullmatch(node_name):
        errors.append(f"{where('node_name')} must look like name@host (for example web-worker@%h), with only "
                      f"letters, digits, '_', '.', '-' and % on either side (no whitespace); got {_show(node_name)}.")
    autoscale = settings.get("autoscale")
    if autoscale is not None:
        if not (isinstance(autoscale, dict) and sorted(autoscale) == ["max", "min"]
                and _is_integer(autoscale["max"]) and _is_integer(autoscale["min"])
                and 0 <= autoscale["min"] <= autoscale["max"] and autoscale["max"] >= 1
                and settings.get("pool") == "prefork"):
            errors.append(f"{where('autoscale')} must be null or {{max: N, min: M}} with integers N >= M >= 0 and "
                          f"N >= 1, and needs pool prefork; got {_show(autoscale)} with pool "
                          f"{settings.get('pool')}.")
    memory_max, cpu_quota = settings.get("memory_max"), settings.get("cpu_quota")
    if not isinstance(memory_max, str) or not MEMORY_MAX_PATTERN.fullmatch(memory_max):
        errors.append(f"{where('memory_max')} must be empty, bytes with an optional K/M/G/T suffix, a percentage "
                      f"or infinity; got {_show(memory_max)}.")
    if not isinstance(cpu_quota, str) or not CPU_QUOTA_PATTERN.fullmatch(cpu_quota):
        errors.append(f"{where('cpu_quota')} must be empty or a percentage like 200%; got {_show(cpu_quota)}.")
    surge_memory_value = settings.get("surge_memory")
    if not isinstance(surge_memory_value, str) or not SURGE_MEMORY_PATTERN.fullmatch(surge_memory_value):
        errors.append(f"{where('surge_memory')} must be empty (memory_max's), a positive number of bytes with an "
                      f"optional K/M/G/T suffix (up to 15 digits), or a percentage of the host's memory from 1% to "
                      f"100%; got {_show(surge_memory_value)}.")
    instances = settings.get("instances")
    if not ((instances is None and settings.get("gpu_mode") == "per_device")
            or (_is_integer(instances) and 1 <= instances <= MAX_INSTANCES)):
        errors.append(f"{where('instances')} must be a positive integer up to {MAX_INSTANCES} (or null with gpu_mode "
                      f"per_device, meaning one per GPU); got {_show(instances)}.")
    return errors


def worker_settings(defaults, profiles, explicit_profile, group_names, group_settings, host_settings, spec):
    """Layer a host's worker settings and check them: the one place for both.

    Layers, last wins: celery_worker_defaults, celery_worker_profiles[profile], celery_worker_group_settings,
    celery_worker_host_settings. The profile is celery_worker_profile when set, else the host's one group
    that has a profile. spec: the setting options of the role's argument_specs (their choices).
    Returns {"profile", "settings", "origins" (setting -> variable that set it), "errors" (all of them)}.
    """
    spec = spec or {}
    profile = worker_profile(explicit_profile, group_names, profiles)
    settings, origins = {}, {}
    for variable, layer in _layers(defaults, profile, profiles, group_settings, host_settings):
        for key, value in (layer.items() if isinstance(layer, dict) else ()):
            settings[key] = value
            origins[key] = f"{variable}.{key}"
    errors = _profile_errors(explicit_profile, group_names, profiles)
    # Every layer, and every profile (not only this host's): a typo never goes unnoticed.
    if not isinstance(profiles, dict):
        errors.append(f"celery_worker_profiles must map group names to worker settings; got {_show(profiles)}.")
        profiles = {}
    layers = [(variable, layer) for variable, layer in _layers(defaults, "", {}, group_settings, host_settings)
              if variable != "celery_worker_profiles."]
    layers[1:1] = [(f"celery_worker_profiles.{name}", layer) for name, layer in sorted(profiles.items())]
    for variable, layer in layers:
        if not isinstance(layer, dict):
            errors.append(f"{variable} must be a mapping of worker settings; got {_show(layer)}.")
            continue
        unknown = [f"{variable}.{key}" for key in layer if key not in spec]
        if unknown:
            errors.append(f"Unknown worker setting(s) {unknown}; allowed settings are {list(spec)}.")
    # Layers replace, not merge, a dict (Ansible's default): a celery_worker_defaults overridden in an
    # inventory without some settings would leave them unset.
    missing = [key for key in spec if key not in settings]
    if missing:
        errors.append(f"Worker setting(s) {missing} are set in no layer: celery_worker_defaults must hold every "
                      f"setting (an inventory that overrides it replaces the whole mapping).")
    else:
        errors += _setting_errors(settings, origins, spec)
    return {"profile": profile, "settings": settings, "origins": origins, "errors": errors}


# --- Delivery settings every client shares -----------------------------------------------------------


def _host_settings(host_vars, defaults, profiles, spec):
    """worker_settings() of another host, from its hostvars: its inventory may override the role's defaults
    and profiles, else the role's (defaults, profiles) apply."""
    return worker_settings(host_vars.get("celery_worker_defaults", defaults),
                           host_vars.get("celery_worker_profiles", profiles),
                           host_vars.get("celery_worker_profile", ""), host_vars.get("group_names", []),
                           host_vars.get("celery_worker_group_settings", {}),
                           host_vars.get("celery_worker_host_settings", {}), spec)


def fleet_time_limit(hosts_vars, defaults, profiles, spec):
    """The longest hard time limit of every worker host given, from each host's own layers.

    hosts_vars: the hostvars of the inventory's worker hosts (all of them, not only the run's: a host left
    out by --limit still runs tasks that long). A host's inventory may override defaults and profiles;
    otherwise the role's (defaults, profiles) apply.
    """
    limits = []
    for host_vars in hosts_vars:
        result = _host_settings(host_vars, defaults, profiles, spec)
        # Counted even when the host's other settings are refused: a typo on a host a --limit left out
        # must not shrink the timeout under the tasks it runs.
        if _is_integer(result["settings"].get("time_limit")):
            limits.append(result["settings"]["time_limit"])
    return max(limits, default=0)


def fleet_queues(hosts_vars, defaults, profiles, spec):
    """{profile: sorted queues} over every worker host given (the inventory's, as fleet_time_limit), from each
    host's own layers: what the application check compares the app's routes with."""
    queues = {}
    for host_vars in hosts_vars:
        result = _host_settings(host_vars, defaults, profiles, spec)
        if result["profile"] and isinstance(result["settings"].get("queues"), list):
            queues.setdefault(result["profile"], set()).update(str(q) for q in result["settings"]["queues"])
    return {profile: sorted(names) for profile, names in sorted(queues.items())}


UNACKED_MUTEX_EXPIRE = 30


def transport_options(fleet_time_limit, visibility_timeout, margin, socket_timeout):
    """kombu's Redis transport options for the fleet: every client (workers, the control module, the load
    tools) uses these, since any client that polls the broker restores unacknowledged messages older
    than ITS visibility timeout, and the shortest one among the clients wins.

    visibility_timeout 0: max(3600, the fleet's longest hard time limit + margin).

    unacked_mutex_expire: the lock a client takes to put back messages past their visibility timeout
    (kombu's QoS.restore_visible, run by every polling client, the control calls and the monitor's exporter too)
    expires after this. kombu's default, 300 s, is how long a client killed while it held the lock (a control call
    ended at its deadline while the broker was frozen: the lock's SET is applied when Redis thaws) stops every
    restore. The lock only saves work: each message is put back in a transaction that WATCHes the unacked hash
    (kombu's QoS.restore_by_tag), so two clients restoring at once cannot deliver a message twice.
    """
    computed = int(visibility_timeout) or max(3600, int(fleet_time_limit) + int(margin))
    return {"visibility_timeout": computed, "socket_timeout": float(socket_timeout),
            "socket_connect_timeout": float(socket_timeout), "socket_keepalive": True,
            "unacked_mutex_expire": UNACKED_MUTEX_EXPIRE}


# --- The operator's application: what the release's check found, judged --------------------------------


def app_findings(report, group_queues, transport_options, acks_late=True, reject_on_worker_lost=True,
                 app="the application", beat_hosts=None):
    """Judge the report of `python -m celery_fleet_runtime check` (the runtime's __main__).

    Errors break a guarantee the fleet gives and stop the deploy: a task that runs with acks_late or
    reject_on_worker_lost off while the fleet asks for them (declared on the task or its base class, or
    bound from the app's own settings when the app was finalized at import), and an app-level visibility
    timeout below the fleet's (the app's clients outside the fleet, a web server say, would hand a running
    task to a second worker). Warnings: queues the app routes to that no group consumes (tasks wait there
    for ever), groups consuming queues nothing routes to, routes the check could not work out.
    With beat_hosts given (the hosts with celery_worker_beat), an app whose beat_schedule holds periodic
    tasks while no host runs beat is an error: they would never be sent.
    Returns {"errors": [...], "warnings": [...]}.
    """
    errors, warnings = [], []
    schedule = report.get("beat_schedule") or []
    if beat_hosts is not None and schedule and not beat_hosts:
        errors.append(f"{app}: the app's beat_schedule holds periodic tasks ({', '.join(sorted(schedule))}) and no "
                      f"worker host has celery_worker_beat: true: they would never be sent. Set it on exactly one "
                      f"host (host_vars).")
    finalized = report.get("finalized_before_fleet_settings")
    where = ("declared on the task or its base class, or bound from the app's own settings: the app was "
             "finalized when imported, before the fleet's settings applied" if finalized
             else "declared on the task or its base class, or bound while the app's configuration loaded: "
                  "then set it True in the app's own settings too")
    for name, task in sorted(report.get("tasks", {}).items()):
        if acks_late and not task.get("acks_late"):
            errors.append(f"{app}: task {name} runs with acks_late=False ({where}): a task whose worker dies "
                          f"or is killed while it runs is lost. Remove acks_late=False so the fleet's "
                          f"celery_worker_task_acks_late applies.")
        if reject_on_worker_lost and not task.get("reject_on_worker_lost"):
            errors.append(f"{app}: task {name} runs with reject_on_worker_lost=False ({where}): a task whose "
                          f"worker process is killed is acknowledged, not requeued. Remove it so the fleet's "
                          f"celery_worker_task_reject_on_worker_lost applies.")
    own = report.get("app_visibility_timeout")
    fleet = transport_options.get("visibility_timeout")
    if own is not None and fleet is not None and float(own) < float(fleet):
        errors.append(f"{app}: broker_transport_options['visibility_timeout'] is {own} s in the app's own "
                      f"settings, below the fleet's {fleet} s: any client of the app outside the fleet puts "
                      f"back tasks still running longer than that, and a second worker runs them. Remove it "
                      f"or set it to at least {fleet}.")
    consumed = {queue: sorted(group for group, queues in group_queues.items() if queue in queues)
                for queues in group_queues.values() for queue in queues}
    routed = {}
    for name, task in sorted(report.get("tasks", {}).items()):
        if task.get("route_error"):
            warnings.append(f"{app}: task {name}: its route could not be worked out without arguments "
                            f"({task['route_error']}); check by hand that a group consumes its queue.")
        elif task.get("queue"):
            routed.setdefault(task["queue"], []).append(name)
    for queue, names in sorted(routed.items()):
        if queue not in consumed:
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            warnings.append(f"{app}: queue {queue} (task {shown}) is consumed by no group: its tasks would "
                            f"wait there. Groups consume: " + "; ".join(
                                f"{group}: {', '.join(queues)}" for group, queues in sorted(group_queues.items())))
    default_queue = report.get("default_queue")
    for group, queues in sorted(group_queues.items()):
        idle = [queue for queue in queues if queue not in routed and queue != default_queue]
        if idle:
            warnings.append(f"{app}: group {group} consumes {', '.join(idle)}, where none of the app's tasks "
                            f"is routed (tasks sent by name with an explicit queue still arrive).")
    return {"errors": errors, "warnings": warnings}


# --- Rolling: order and batches, capacity guard, drain deadline ---------------------------------------


def _batch_size(value, group_size):
    """Ansible's serial arithmetic (pct_to_int): 'N%' of the hosts, at least 1; a number as it is."""
    if isinstance(value, str) and value.endswith("%"):
        return int(int(value[:-1]) / 100.0 * group_size) or 1
    return int(value)


def _serial_errors(serial):
    values = serial if isinstance(serial, list) else [serial]
    # As Ansible's serial: integers, numeric strings (-e celery_worker_rolling_serial=2) and percentages.
    good = bool(values) and all(
        (_is_integer(value) and value >= 1)
        or (isinstance(value, str) and re.fullmatch(r"[1-9][0-9]*|[1-9][0-9]?%|100%", value)) for value in values)
    return [] if good else [
        f"celery_worker_rolling_serial must be a positive integer, a percentage from 1% to 100%, or a non-empty "
        f"list of those (batch sizes within each group, the last one repeated); got {_show(serial)}."]


def _rolling_serials(serial):
    """(batch sizes, errors) of celery_worker_rolling_serial: a list as Ansible's serial takes it, [1] when refused
    (so that a plan can still be made and its other errors told at the same time)."""
    errors = _serial_errors(serial)
    return ([1] if errors else (serial if isinstance(serial, list) else [serial])), errors


def _rolling_min_online(min_online):
    """(value, errors) of celery_worker_rolling_min_online: null or an integer >= 0, as extra vars give it too
    (-e celery_worker_rolling_min_online=2 is the string '2')."""
    if isinstance(min_online, str) and min_online.isdigit():
        min_online = int(min_online)
    if min_online is not None and not (_is_integer(min_online) and min_online >= 0):
        return None, [f"celery_worker_rolling_min_online must be null or an integer >= 0; got {_show(min_online)}."]
    return min_online, []


def rolling_plan(order, serial, groups, play_hosts, min_online=None):
    """Which hosts roll in which order and batch sizes, so that groups roll one after another, each with
    its own canary batch first, and no batch ever spans two groups.

    order: celery_worker_rolling_order (group names); serial: celery_worker_rolling_serial, applied to
    each group's hosts as Ansible applies a play's serial; groups: the inventory's groups; play_hosts: the
    worker hosts of the run (after --limit); min_online: celery_worker_rolling_min_online, checked here.
    Returns {"hosts", "batches", "errors"}; a host in several of the groups rolls with the first.
    """
    if (not isinstance(order, list) or not order or not all(isinstance(group, str) for group in order)
            or len(set(order)) != len(order)):
        return {"hosts": [], "batches": [], "errors": [
            f"celery_worker_rolling_order must be a non-empty list of distinct inventory group names; got "
            f"{_show(order)}."]}
    errors = []
    unknown = [group for group in order if group not in groups]
    if unknown:
        errors.append(f"celery_worker_rolling_order names group(s) the inventory does not have: {unknown} "
                      f"(order {order}).")
    # Planned even when the serial is refused, so that the order's own errors are told at the same time.
    serials, serial_errors = _rolling_serials(serial)
    errors += serial_errors
    errors += _rolling_min_online(min_online)[1]
    hosts, batches = [], []
    for group in order:
        members = [host for host in groups.get(group, []) if host in play_hosts and host not in hosts]
        group_size, position = len(members), 0
        while members:
            size = min(_batch_size(serials[min(position, len(serials) - 1)], group_size), len(members))
            hosts += members[:size]
            batches.append(size)
            members, position = members[size:], position + 1
    left_out = [host for host in play_hosts if host not in hosts]
    if left_out and not unknown:
        errors.append(f"celery_worker_rolling_order {order} must together hold every worker host of the run; "
                      f"worker hosts in none of them: {left_out}.")
    return {"hosts": hosts, "batches": batches if not errors else [], "errors": errors}


def capacity_guard_nodes(node, host_nodes, batch_hosts):
    """The nodes the capacity guard counts (arguments as capacity_guard's): the group's known nodes but `node`
    and those of the other hosts of its batch. The guard asks only them, so the answer comes as soon as they
    replied instead of after the whole timeout."""
    drained_with_it = {other for host in batch_hosts or [] for other in (host_nodes.get(host) or {})}
    return sorted(other for nodes in host_nodes.values() for other in (nodes or {})
                  if other != node and other not in drained_with_it)


def capacity_guard(node, group, host_nodes, batch_hosts, min_online, active_queues):
    """Whether `node` may be drained: enough of its group's other nodes are in service.

    host_nodes: {host: {node: [queues]}} for every host of the group, None for a host not in the run
    (--limit): its nodes are unknown. batch_hosts: the other hosts of the batch, drained at the same
    time: their nodes never count. min_online: celery_worker_rolling_min_online (None: every counted node).
    active_queues: the inspect reply {node: [{"name": queue}, ...]}.
    Returns {"counted", "in_service", "needed", "unknown_hosts", "refusal"} (refusal '' when it may go on).
    """
    unknown = sorted(host for host, nodes in host_nodes.items() if nodes is None)
    expected = {}
    for nodes in host_nodes.values():
        expected.update(nodes or {})
    counted = capacity_guard_nodes(node, host_nodes, batch_hosts)
    needed = len(counted) if min_online is None else int(min_online)
    serving = in_service(counted, active_queues, expected)
    refusal = ""
    if unknown and min_online is None:
        refusal = (f"Capacity guard: host(s) {', '.join(unknown)} of group {group} are not in this run (--limit?), "
                   f"so their nodes are unknown. Roll the whole group, or set celery_worker_rolling_min_online to "
                   f"the number of the group's other known nodes that must be in service")
    elif len(serving) < needed:
        # Name the nodes the inventory expects that are not in service, and why: a lost host shows up here.
        missing = [_service_gap(other, active_queues, expected[other]) for other in counted if other not in serving]
        if unknown:
            missing.append(f"host(s) {', '.join(unknown)} of group {group} are not in this run, their nodes unknown")
        refusal = (f"Capacity guard: {len(serving)} other node(s) of group {group} are in service "
                   f"({', '.join(serving) or 'none'}); celery_worker_rolling_min_online needs {needed}"
                   f"{''.join('; ' + reason for reason in missing)}. Not draining {node}")
    return {"counted": counted, "in_service": serving, "needed": needed, "unknown_hosts": unknown,
            "refusal": refusal}


def _systemctl_units(systemctl_show):
    """The blocks of `systemctl show -p Id -p ... <units>`, one {property: value} per unit that has an Id."""
    for block in (systemctl_show or "").split("\n\n"):
        fields = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
        if fields.get("Id"):
            yield fields


def _active_units(systemctl_show):
    """{unit id: start time (seconds since the epoch)} of the active units in
    `systemctl show --timestamp=us+utc -p Id -p ActiveState -p ActiveEnterTimestamp <units>`."""
    from datetime import datetime, timezone

    started = {}
    for fields in _systemctl_units(systemctl_show):
        if fields.get("ActiveState") != "active":
            continue
        stamp = fields.get("ActiveEnterTimestamp", "").split(" ", 1)[-1].replace(" UTC", "")
        try:
            at = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S.%f").replace(tzinfo=timezone.utc)
        except ValueError:
            at = datetime.fromtimestamp(0, timezone.utc)  # unknown: any file counts as newer
        started[fields["Id"]] = at.timestamp()
    return started


def unit_start_times(systemctl_show):
    """{instance name: start time (seconds since the epoch)} of the active celery-worker@ units, from
    `systemctl show --timestamp=us+utc -p Id -p ActiveState -p ActiveEnterTimestamp 'celery-worker@*'`."""
    return {unit[len("celery-worker@"):].removesuffix(".service"): at
            for unit, at in _active_units(systemctl_show).items() if unit.startswith("celery-worker@")}


def transport_switched(url_schemes, tls):
    """Names of the running worker instances that connect to the broker the other way than `tls` says (TLS switched
    on or off), from celery_fleet_host_state's url_schemes ({unit id: scheme of CELERY_BROKER_URL in its main
    process's environment, "" when unset, None when unreadable}). An instance whose environment could not be read is
    left to the roll."""
    switched = []
    for unit, scheme in sorted((url_schemes or {}).items()):
        if not unit.startswith("celery-worker@") or scheme is None:
            continue
        if (scheme == "rediss") != bool(tls):
            switched.append(unit[len("celery-worker@"):].removesuffix(".service"))
    return switched


def app_check_cached(text, request):
    """The application check's report kept beside a release (install.yml), when it was made for `request` (the
    digest of what the check is asked), else None: the check runs again. A file that is missing, too large for one
    read (celery_fleet_host_state returns none) or not the JSON the role writes is no report."""
    try:
        kept = json.loads(text) if text else None
    except ValueError:
        return None
    if not isinstance(kept, dict) or kept.get("request") != request or not isinstance(kept.get("report"), dict):
        return None
    return kept["report"]


def units_off(units, names, active=None, enabled=None):
    """Those of `names` (unit ids) that systemd does not hold as wanted: active (or not) when `active` is a bool,
    enabled (or not) when `enabled` is. units: celery_fleet_host_state's parsed `systemctl show` ({id: properties});
    a unit it does not list, or does not find, is inactive and not enabled. What a start/enable (or stop/disable)
    task must still touch; the others it skips."""
    off = []
    for name in names or []:
        fields = (units or {}).get(name) or {}
        if fields.get("LoadState") == "not-found":
            fields = {}
        is_active = fields.get("ActiveState") == "active"
        is_enabled = fields.get("UnitFileState") in ("enabled", "enabled-runtime", "static", "alias")
        if (active is not None and is_active != bool(active)) or (enabled is not None and is_enabled != bool(enabled)):
            off.append(name)
    return off


def beat_restart_due(systemctl_show, files):
    """Whether celery-beat.service must be (re)started: it does not run, or it started before one of the files
    it starts with changed (files: [{"path", "mtime"}], the current link's own mtime among them)."""
    started = _active_units(systemctl_show).get("celery-beat.service")
    return started is None or any(float(entry["mtime"]) > started for entry in files or [])


WORKER_TEMPLATE_UNIT = "/etc/systemd/system/celery-worker@.service"


def _instance_files(name, config_dir):
    """The files only instance `name` starts with: its worker options and its drop-in."""
    return [f"{config_dir}/instances/{name}.env",
            f"/etc/systemd/system/celery-worker@{name}.service.d/10-celery-fleet.conf"]


def changed_instances(changed_paths, names, config_dir):
    """Names of the instances that start with a file among changed_paths (celery_fleet_files' result): all of
    them for the template unit, else those whose own files changed."""
    changed = set(changed_paths or [])
    return [name for name in names
            if changed.intersection([WORKER_TEMPLATE_UNIT] + _instance_files(name, config_dir))]


def changed_broker_instances(changed_paths, instances, dropin_format):
    """Names of the broker instances ([{"name", "unit", "config"}]) whose configuration or unit drop-in
    (dropin_format % unit) is among changed_paths."""
    changed = set(changed_paths or [])
    return [instance["name"] for instance in instances
            if instance["config"] in changed or dropin_format % instance["unit"] in changed]


def services_to_restart(changed_paths, file_services):
    """{service: [changed paths]} for every service of file_services ([{"path", "services"}], a null path
    skipped): the handlers a run of celery_fleet_files owes, from the paths it changed."""
    changed = set(changed_paths or [])
    owed = {}
    for entry in file_services:
        for service in entry["services"]:
            owed.setdefault(service, [])
            if entry["path"] and entry["path"] in changed:
                owed[service].append(entry["path"])
    return owed


def pending_restarts(instances, started, files, config_dir, release_changed):
    """Names of the running instances that do not run with what the host holds now: a file they start
    with (the env files, the template unit, their drop-in) is newer than their start, or the release to
    run differs from the one they run. Decided from the host, not from what one run changed, so a run
    stopped before its roll, or one limited by --tags, leaves nothing owed unnoticed.

    started: unit_start_times(); files: [{"path", "mtime"}] (Ansible's find).
    """
    mtime = {entry["path"]: float(entry["mtime"]) for entry in files or []}
    pending = []
    for instance in instances:
        name = instance["name"]
        if name not in started:
            continue
        paths = [f"{config_dir}/celery.env", WORKER_TEMPLATE_UNIT] + _instance_files(name, config_dir)
        if release_changed or any(mtime.get(path, 0) > started[name] for path in paths):
            pending.append(name)
    return pending


def consumers_to_restore(expected, active_queues):
    """[[node, queue], ...] for each queue a node answered without consuming although it should: what a
    run stopped mid-drain leaves behind (the node runs, and consumes nothing). Nodes that did not answer
    are not in it."""
    missing = []
    for node in sorted(expected):
        if node in (active_queues or {}):
            consumed = {queue.get("name") for queue in active_queues[node] or []}
            missing += [[node, queue] for queue in sorted(expected[node]) if queue not in consumed]
    return missing


def drain_timeout(settings, margin):
    """Seconds a drained node may take to finish: each slot may hold prefetch_multiplier tasks, each up to
    the hard time limit, plus a margin."""
    return int(settings["prefetch_multiplier"]) * int(settings["time_limit"]) + int(margin)


# --- Broker credentials ------------------------------------------------------------------------
# What the workers and every client of the fleet may run on Redis (ACL user celery_broker_user), and why.
# Found by running a worker (prefork, events on), a client and the control API against a Redis whose
# INFO commandstats was reset first (tests/integration/test_broker_acl.py prints what a workload used),
# and by reading kombu's and Celery's Redis code (kombu/transport/redis.py, celery/backends/redis.py),
# including the Lua scripts they run (a script's redis.call() is checked against the same ACL).
REDIS_CLIENT_COMMANDS = {
    # Connection (redis-py): handshake, database, health checks.
    "hello": "redis-py's handshake", "select": "the broker's and results' databases",
    "ping": "health_check_interval and kombu's connection check",
    "client|setname": "a client that names its connection (kombu's client_name)",
    # (redis-py also sends CLIENT SETINFO, which Redis 7.0, Debian 12's, does not know: it ignores the error.)
    # Queues (kombu Channel): publish, consume, size, purge, delete, bind.
    "lpush": "publish (Channel._put)", "rpush": "restore an unacknowledged message",
    "brpop": "consume (Channel._brpop_start)", "rpop": "basic_get (Channel._get)",
    "llen": "queue size, purge", "lindex": "celery-fleet status and the monitor: the next message out of a queue", "del": "purge, delete a queue, results, the mutex", "exists": "queue_declare passive",
    "pexpire": "queues with x-expires; redis-py Lock", "sadd": "queue bindings (_kombu.binding.*)",
    "srem": "unbind", "smembers": "exchange table lookups",
    # Unacknowledged messages (kombu QoS): the unacked hash, its index, and the restore mutex (redis-py Lock).
    "hset": "unacked hash", "hget": "restore by tag", "hdel": "ack", "zadd": "unacked_index",
    "zrem": "ack", "zrange": "restore_visible", "zrangebyscore": "restore_visible",
    "set": "mutex (SET NX PX), results", "get": "mutex owner, results", "pttl": "redis-py Lock (Lua)",
    "time": "kombu's Lua (message timestamps)",
    "multi": "pipelines", "exec": "pipelines", "discard": "pipelines", "watch": "transactions",
    "unwatch": "transactions",
    "evalsha": "Lua scripts (kombu, Celery chords, redis-py Lock)", "script|load": "a script Redis does not know yet",
    "script|exists": "scripts in pipelines",
    # Fanout exchanges: the control API (pidbox) and task events (celeryev).
    "publish": "broadcast, events, result notifications", "subscribe": "result notifications",
    "psubscribe": "broadcast and events", "unsubscribe": "a result read",
    "punsubscribe": "a consumer of broadcasts or events closing",
    # Results (Celery's Redis backend), chords included.
    "setex": "results with expiry", "mget": "results of a group", "expire": "result and chord expiry",
    "incrby": "chord counters (redis-py's incr sends INCRBY: Task.add_to_chord)", "lrange": "ordered chord results",
    "zcount": "chord results", "sismember": "chord part dedup",
    # The fleet's own status (celery_control action=status): read only.
    "hscan": "unacknowledged messages per queue (status)",
    # Never sent by the clients, but written by Redis into the AOF for them and replayed as the default user,
    # which holds this list (redis_acl): EXPIRE and PEXPIRE go to the AOF as PEXPIREAT (Celery's chord script,
    # kombu's reply queues with x-expires), and an expired key as DEL, or UNLINK with lazyfree-lazy-expire.
    "pexpireat": "the AOF's form of expire and pexpire", "unlink": "the AOF's form of an expired key (lazy free)",
}
# Never for the clients, whatever a later list adds: commands that administer, copy or flush Redis. (What the
# list cannot prevent: one user for every client, on every key and channel, can still delete or read any queue
# and publish control commands; the ACL keeps a task from taking over Redis itself, not from the fleet's data.)
REDIS_FORBIDDEN = ("flushall", "flushdb", "config", "replicaof", "slaveof", "monitor", "debug", "shutdown", "acl",
                   "keys", "module", "save", "bgsave", "bgrewriteaof", "migrate", "failover", "sync", "psync")
# A password reaches Redis only as a SHA-256 in the ACL file and the clients only inside a URL (encoded):
# any printable character works. Whitespace and control characters are refused (a line of --askpass and the
# env file end at a newline; a space at either end is lost by the vault's and the shell's readers).
PASSWORD_PATTERN = re.compile(r"[!-~]{16,512}")


def _sha256(text):
    return hashlib.sha256(str(text).encode()).hexdigest()


# What the monitoring user (Prometheus's redis exporter) may run: server and memory facts, no key, no channel.
REDIS_MONITOR_COMMANDS = ("hello", "ping", "select", "client|setname", "info", "config|get", "slowlog|get",
                          "slowlog|len", "latency|latest", "client|list", "memory|stats", "dbsize")


def redis_acl(client_user, client_password, admin_user, admin_password, legacy_default_user=False,
              monitor_user=None, monitor_password=None):
    """The lines of the Redis ACL file (aclfile): the default user off, the fleet's clients with exactly
    REDIS_CLIENT_COMMANDS on every key and channel (queue names are the operator's), the admin with
    everything. Passwords only as their SHA-256.

    The default user is off and has no password, so nobody can log in as it, yet it holds the clients'
    commands (and the forms Redis writes them in to the AOF): Redis 7.0 (Debian 12's) replays the AOF as the
    default user and re-checks each command of a MULTI/EXEC against that user's ACL, skipping with -NOPERM
    every one it may not run (redis/redis issue #14541, fixed by PR #14545 after 7.0; valkey issue #3983;
    multi.c's execCommand). kombu writes a delivered message into the unacked hash and acknowledges it in
    transactions, so a default user with -@all made every restart of Redis forget unacknowledged messages:
    they were lost on the lab (7 of 67 under a restart then a kill -9).

    legacy_default_user: for the one run that moves a broker from a single password to these users, the
    default user stays on with the clients' password and commands, so the workers still running with the old
    URL (no user name: Redis's default user) keep working until the roll has moved them."""

    def digest(password):
        return "#" + _sha256(password)

    commands = " ".join(f"+{command}" for command in sorted(REDIS_CLIENT_COMMANDS))
    default = (f"user default on resetpass {digest(client_password)} resetkeys ~* resetchannels &* -@all {commands}"
               if legacy_default_user else f"user default off resetpass resetkeys ~* resetchannels &* -@all {commands}")
    lines = [
        default,
        f"user {client_user} on {digest(client_password)} resetkeys ~* resetchannels &* -@all {commands}",
        f"user {admin_user} on {digest(admin_password)} resetkeys ~* resetchannels &* +@all",
    ]
    if monitor_user:
        monitoring = " ".join(f"+{command}" for command in REDIS_MONITOR_COMMANDS)
        # resetpass first: a rotated password replaces the old one at once (ACL SETUSER adds a hash otherwise).
        lines.append(f"user {monitor_user} on resetpass {digest(monitor_password)} resetkeys resetchannels -@all "
                     f"{monitoring}")
    return lines


def url_secret(value):
    """A user name or password for a URL's userinfo: every character but letters, digits and '-._~'
    percent-encoded (Jinja's urlencode leaves '/' alone, which kombu then reads as the end of the host)."""
    from urllib.parse import quote

    return quote(str(value), safe="-._~")


def broker_credential_errors(credentials):
    """{variable: value} of user names and passwords -> error messages naming each bad one (and its class)."""
    errors = []
    for variable, value in credentials.items():
        if "password" in variable:
            if not isinstance(value, str) or not PASSWORD_PATTERN.fullmatch(value):
                errors.append(f"{variable} must be 16 to 512 printable ASCII characters (letters, digits and "
                              f"punctuation: !-~); no space, tab, newline or other control character, no "
                              f"non-ASCII character; the value given does not qualify")
        elif not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", value):
            errors.append(f"{variable} must be a user name of letters, digits, '_', '.' and '-' (at most 64); "
                          f"got {_show(value)}")
    passwords = [value for variable, value in credentials.items() if "password" in variable]
    if len(set(map(str, passwords))) != len(passwords):
        errors.append(f"{' and '.join(v for v in credentials if 'password' in v)} must differ")
    users = [value for variable, value in credentials.items() if "password" not in variable]
    if "default" in users or len(set(map(str, users))) != len(users):
        errors.append(f"{' and '.join(v for v in credentials if 'password' not in v)} must differ and "
                      f"not be 'default' (Redis's default user is switched off)")
    return errors


# SHA-256 of the lab's public secrets (inventories/lab: its vault password file and the passwords its vault
# holds, present and past). Outside the lab (celery_fleet_lab unset) any of them is refused: they are public.
LAB_SECRET_DIGESTS = frozenset({
    "44deed4a927d986a22e15f7687bc3f7c761df279f95401637f8a17fe7ea73af8",  # lab-vault-password.txt
    "8f393f40c1b8024f28ca78060f9861419884efa8d5e8349a64af25d96f6f43b9",  # vault_celery_broker_password
    "480f98d74af3c35b7cf92ae045c1621969c15a57078f0aa87accf4b685d14616",  # vault_celery_broker_admin_password
    "c2a0cfc110fb12723a045d27b90ad44256989d6ce2b7503eed605ad93b51f81e",  # the lab's password before ACL users
    "b71644aa61547c2902e3254f63d7535aa0de0a0d4dc44149cf8f419fd957363d",  # vault_celery_broker_monitor_password
    "e25714d81f924914387a0e7ad237aaa6ac4753f63333aff12fe193cb6539307d",  # vault_celery_monitor_flower_password
})


def lab_secret_errors(secrets, vault_password=None, lab=False):
    """{variable: value} of passwords, and the text of the configured vault password file -> errors naming the
    variables (or the vault) that hold one of the lab's public secrets, unless this is the lab."""
    if lab:
        return []

    def public(value):
        return value is not None and _sha256(str(value).strip()) in LAB_SECRET_DIGESTS

    errors = [f"{variable} is one of the lab's public passwords (inventories/lab): set your own in your vault"
              for variable, value in secrets.items() if public(value)]
    if public(vault_password):
        errors.append("the vault password file is the lab's public one (inventories/lab/lab-vault-password.txt): "
                      "encrypt your inventory's vault with a password of your own")
    return errors


# --- TLS between the fleet and its broker ------------------------------------------------------------------------
REDIS_SCHEMES = ("redis", "rediss")
# Where the broker role installs its certificate, key and CA on the broker host (the workers copy the CA from here).
BROKER_TLS_DIR = "/etc/redis/tls"


def broker_tls_files(tls_dir=None):
    """{dir, ca_cert, cert, key}: the broker's TLS files on the broker host. One place for both roles: the broker
    role installs them, the worker role reads the CA the broker trusts from here
    (`none | celery_fleet_broker_tls_files`: under BROKER_TLS_DIR)."""
    tls_dir = tls_dir or BROKER_TLS_DIR
    return {"dir": tls_dir, "ca_cert": f"{tls_dir}/ca.crt", "cert": f"{tls_dir}/redis.crt",
            "key": f"{tls_dir}/redis.key"}


def tls_names(names):
    """Host names and addresses -> subjectAltName entries ("IP:..." for an address, "DNS:..." otherwise), in order,
    without duplicates or empty values."""
    import ipaddress

    entries = []
    for name in names or []:
        name = str(name or "").strip()
        if not name:
            continue
        try:
            entry = f"IP:{ipaddress.ip_address(name)}"
        except ValueError:
            entry = f"DNS:{name}"
        if entry not in entries:
            entries.append(entry)
    return entries


def redis_url(endpoint, user, password, ca_certs=None):
    """A Redis URL for the fleet's clients: "host:port/db" with the user and password percent-encoded, and with
    TLS (ca_certs: the CA file on the client's host) "rediss://" plus the query both kombu and Celery's result
    backend read: the server's certificate required and checked against that CA (a rediss:// URL without
    ssl_cert_reqs makes Celery refuse to start; CERT_NONE would accept any server)."""
    from urllib.parse import quote

    scheme = "rediss" if ca_certs else "redis"
    query = f"?ssl_cert_reqs=required&ssl_ca_certs={quote(str(ca_certs), safe='')}" if ca_certs else ""
    return f"{scheme}://{url_secret(user)}:{url_secret(password)}@{endpoint}{query}"


def broker_url_errors(url, variable="celery_worker_broker_url"):
    """Errors of a Redis URL the fleet's clients would use (never echoing its credentials): the scheme one of
    REDIS_SCHEMES; rediss:// with the server's certificate required and a CA file; redis:// without TLS options
    (Celery refuses those)."""
    from urllib.parse import parse_qs, urlsplit

    try:
        parts = urlsplit(str(url).strip())
        query = parse_qs(parts.query)
        parts.port  # noqa: B018 (raises for a port that is not a number)
    except ValueError:
        # (Not the parser's message: for a password with '/' it quotes the password's start as the "port".)
        return [f"{variable} is not a valid URL (host:port unreadable: percent-encode the user and password)"]
    if parts.scheme not in REDIS_SCHEMES:
        return [f"{variable} must use one of the schemes {list(REDIS_SCHEMES)}; got '{parts.scheme}://...'"]
    tls_options = sorted(key for key in query if key.startswith("ssl_"))
    if parts.scheme == "redis":
        if tls_options:
            return [f"{variable} is a redis:// (plain TCP) URL with TLS options {tls_options}: use rediss://"]
        return []
    errors = []
    # Exactly as kombu, Celery's backend and redis-py all read it ("required"; kombu refuses "Required").
    if query.get("ssl_cert_reqs") != ["required"]:
        errors.append(f"{variable} is a rediss:// URL: it needs ssl_cert_reqs=required (the broker's certificate "
                      f"checked; 'none' or 'optional' would accept any server); got "
                      f"{query.get('ssl_cert_reqs', ['nothing'])[0]!r}")
    if not query.get("ssl_ca_certs"):
        errors.append(f"{variable} is a rediss:// URL: it needs ssl_ca_certs=<the CA file on the worker host>")
    if [value.lower() for value in query.get("ssl_check_hostname", ["true"])] != ["true"]:
        errors.append(f"{variable} turns off the check of the broker's host name (ssl_check_hostname): drop it")
    return errors


# --- The fleet's status ---------------------------------------------------------------------------------------------
def _memory(value):
    """systemd's MemoryCurrent/MemoryMax ("[not set]", "infinity" or bytes) -> bytes or None."""
    return int(value) if str(value).isdigit() else None


def fleet_status(hosts, observed, min_online=None):
    """One view of the fleet, from the inventory's side and the fleet's (celery_control action=status).

    hosts: {host: {"group", "release", "nodes": {node: [queues]}, "units": {node: {"active", "memory",
    "memory_max"}}}} for every worker host (what it should run, and its units as systemd sees them).
    observed: the status action's {"nodes_status", "queues_status"}. min_online: celery_worker_rolling_min_online.
    Returns {"nodes": [...], "queues": [...], "groups": [...]}. A node's state: "in service" (answers and
    consumes all its queues), "drained" (answers, consumes fewer), "offline" (its unit runs, it does not answer),
    "missing" (expected, no unit running), "surge of <node>" (the node's surge process, during a roll in
    rolling_mode surge: it has no group, so the groups count only their nodes), "unknown" (answers, not in the
    inventory). Utilisation: active / concurrency (the seed's definition).
    """
    answered = observed.get("nodes_status") or {}
    nodes, expected = [], set()
    for host in sorted(hosts):
        info = hosts[host]
        for node in sorted(info.get("nodes") or {}):
            expected.add(node)
            queues = sorted(info["nodes"][node])
            seen = answered.get(node)
            unit = (info.get("units") or {}).get(node) or {}
            if seen is not None:
                state = "in service" if set(queues) <= set(seen.get("queues") or []) else "drained"
            else:
                state = "offline" if unit.get("active") else "missing"
            seen = seen or {}
            active, concurrency = seen.get("active"), seen.get("concurrency")
            nodes.append({
                "node": node, "group": info.get("group"), "host": host, "release": info.get("release"),
                "state": state, "queues": queues, "consuming": seen.get("queues", []),
                "active": active, "concurrency": concurrency, "reserved": seen.get("reserved"),
                "utilisation": round(active / concurrency, 3) if active is not None and concurrency else None,
                "processed": seen.get("processed"), "pool": seen.get("pool"), "uptime": seen.get("uptime"),
                "memory": _memory(unit.get("memory")), "memory_max": _memory(unit.get("memory_max")),
            })
    # rolling_mode surge: a node's surge process, while a roll runs it, in its node's group and host (counted apart
    # from the group's nodes).
    surges = {surge_node_name(node["node"]): node for node in nodes}
    for node in sorted(set(answered) - expected):
        seen = answered[node]
        of = surges.get(node)
        nodes.append({"node": node, "group": None, "host": of and of["host"], "release": None,
                      "state": f"surge of {of['node']}" if of else "unknown",
                      "queues": [], "consuming": seen.get("queues", []), "active": seen.get("active"),
                      "concurrency": seen.get("concurrency"), "reserved": seen.get("reserved"),
                      "utilisation": None, "processed": seen.get("processed"), "pool": seen.get("pool"),
                      "uptime": seen.get("uptime"), "memory": None, "memory_max": None})
    queues = [{"queue": name, **details} for name, details in sorted((observed.get("queues_status") or {}).items())]
    groups = []
    for group in sorted({node["group"] for node in nodes if node["group"]}):
        members = [node for node in nodes if node["group"] == group]
        serving = sum(node["state"] == "in service" for node in members)
        # What the capacity guard asks of the others while one node is drained: min_online, or all of them.
        minimum = int(min_online) if min_online is not None else len(members) - 1
        groups.append({"group": group, "nodes": len(members), "in_service": serving,
                       "guard_minimum": minimum, "can_roll": serving - 1 >= minimum})
    return {"nodes": nodes, "queues": queues, "groups": groups}


def systemd_units_memory(systemctl_show, node_names=None, instance_names=None):
    """{unit id: {"active", "memory", "memory_max"}} from `systemctl show -p Id -p ActiveState -p MemoryCurrent
    -p MemoryMax <units>` (MemoryCurrent: the unit's cgroup, the node and its pool's children). With the host's
    node names and their instances' names (same order): {node: that unit's, or {} when systemd has none}."""
    units = {fields["Id"]: {"active": fields.get("ActiveState") == "active", "memory": fields.get("MemoryCurrent"),
                            "memory_max": fields.get("MemoryMax")} for fields in _systemctl_units(systemctl_show)}
    if node_names is None:
        return units
    return {node: units.get(f"celery-worker@{name}.service", {}) for node, name in zip(node_names, instance_names)}


def _integer(value):
    """An int from an int or a string of digits; None for anything else (a bool, a float, text)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    text = str(value).strip()
    return int(text) if re.fullmatch(r"-?[0-9]{1,18}", text) else None


def _number(value):
    if isinstance(value, bool):
        return None
    try:
        number = float(str(value).strip())
    except ValueError:
        return None
    return number if number == number and abs(number) != float("inf") else None


def monitor_errors(settings):
    """{celery_monitor_* variable: value} -> error messages naming each bad variable and what it allows."""
    import ipaddress

    errors = []

    def integer(variable, low, high):
        value = _integer(settings.get(variable))
        if value is None or not low <= value <= high:
            errors.append(f"{variable} must be a whole number from {low} to {high}; got {_show(settings.get(variable))}")
            return None
        return value

    def number(variable, low, high, low_open=False):
        value = _number(settings.get(variable))
        if value is None or value > high or value < low or (low_open and value == low):
            bound = f"above {low}" if low_open else f"from {low}"
            errors.append(f"{variable} must be a number {bound} up to {high}; got {_show(settings.get(variable))}")
            return None
        return value

    ports = {}
    flower = bool(settings.get("celery_monitor_flower"))
    for variable in ("celery_monitor_exporter_port", "celery_monitor_prometheus_port",
                     "celery_monitor_redis_exporter_port") + (("celery_monitor_flower_port",) if flower else ()):
        # The services run as unprivileged users with no capability: a port below 1024 could not be bound.
        port = integer(variable, 1024, 65535)
        if port is not None:
            ports.setdefault(port, []).append(variable)
    for port, variables in sorted(ports.items()):
        if len(variables) > 1:
            errors.append(f"{' and '.join(variables)} must differ (all on the monitor host); both are {port}")
    for variable in ("celery_monitor_exporter_address", "celery_monitor_prometheus_address") + (
            ("celery_monitor_flower_address",) if flower else ()):
        try:
            # As written: the services are given the value itself, and " 127.0.0.1" is no address to them.
            ipaddress.ip_address(str(settings.get(variable)))
        except ValueError:
            errors.append(f"{variable} must be an IP address to listen on (127.0.0.1, 0.0.0.0, ::1, ...); "
                          f"got {_show(settings.get(variable))}")
    interval = number("celery_monitor_exporter_interval", 1, 3600)
    timeout = number("celery_monitor_exporter_timeout", 0.1, 60)
    deadline = number("celery_monitor_exporter_deadline", 1, 600)
    if None not in (interval, timeout, deadline) and not 4 * timeout + 1 <= deadline:
        errors.append(f"celery_monitor_exporter_deadline ({deadline:g} s) must be at least 4 x "
                      f"celery_monitor_exporter_timeout + 1 s ({4 * timeout + 1:g} s): a refresh asks the nodes four "
                      "questions one after the other, each waiting up to the timeout, then reads Redis")
    integer("celery_monitor_prometheus_scrape_interval", 1, 3600)
    if not re.fullmatch(r"[1-9][0-9]{0,5}(ms|s|m|h|d|w|y)", str(settings.get("celery_monitor_prometheus_retention"))):
        errors.append("celery_monitor_prometheus_retention must be a Prometheus duration such as 15d, 12h or 2w; "
                      f"got {_show(settings.get('celery_monitor_prometheus_retention'))}")
    integer("celery_monitor_alert_minutes", 1, 1440)
    integer("celery_monitor_alert_queue_ready", 1, 10**12)
    number("celery_monitor_alert_queue_age", 0, 10**7, low_open=True)
    number("celery_monitor_alert_failure_ratio", 0, 1, low_open=True)
    integer("celery_monitor_alert_failure_min_runs", 1, 10**9)
    ratio = number("celery_monitor_alert_broker_memory_ratio", 0, 1, low_open=True)
    if ratio == 1:
        errors.append("celery_monitor_alert_broker_memory_ratio must be below 1 (at the cap it is too late)")
    overrides = settings.get("celery_monitor_service_overrides", {})
    if not isinstance(overrides, dict) or any(
            not re.fullmatch(r"[A-Z][A-Za-z0-9]{1,63}", str(name)) or isinstance(value, (dict, list))
            or re.search(r"[\x00-\x1f\x7f]", str(value)) for name, value in (overrides or {}).items()):
        errors.append("celery_monitor_service_overrides must map systemd [Service] directive names (letters and "
                      "digits, such as PrivateUsers) to one-line values; got "
                      f"{_show(overrides if not isinstance(overrides, dict) else sorted(map(str, overrides)))}")
    if flower:
        integer("celery_monitor_flower_max_tasks", 100, 10**7)
        user = settings.get("celery_monitor_flower_user")
        if not isinstance(user, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", user):
            errors.append("celery_monitor_flower_user must be a user name of letters, digits, '_', '.' and '-' "
                          f"(at most 64); got {_show(user)}")
        password = settings.get("celery_monitor_flower_password")
        if not isinstance(password, str) or not PASSWORD_PATTERN.fullmatch(password) or "," in password:
            errors.append("celery_monitor_flower_password must be 16 to 512 printable ASCII characters without "
                          "space or ',' (Flower splits its credentials on commas); the value given does not qualify")
    return errors


def fleet_capacity(fleet, measured, window_seconds):
    """The seed's sizing rule per worker group (its nodes serve its queues together): arrival rate x mean task
    duration = slots needed; / slots per host = hosts needed, next to what the inventory gives the group.

    fleet: fleet_status's view (nodes with group, host, concurrency, queues). measured: Flower's task events over
    the last window_seconds, per worker node: {"received": {node: tasks}, "runtime_sum": {node: seconds},
    "runtime_count": {node: tasks}}, each also as Prometheus's instant vector ([{"metric": {"worker": node},
    "value": [time, "number"]}], what `sum by (worker) (increase(...))` answers). The arrival rate is the rate tasks reached
    the group's nodes: below the true arrival rate while a queue of the group grows (its READY column says so).
    A group with no finished task in the window has no mean duration: nothing to size (None)."""
    import math

    def by_node(values):
        if isinstance(values, list):
            return {item["metric"].get("worker"): float(item["value"][1]) for item in values}
        return values or {}

    measured = {key: by_node(values) for key, values in (measured or {}).items()}
    window = float(window_seconds)
    if window <= 0:
        raise ValueError(f"the capacity window must be above 0 s; got {window_seconds!r}")
    rows = []
    for group in sorted({node["group"] for node in fleet.get("nodes", []) if node.get("group")}):
        members = [node for node in fleet["nodes"] if node.get("group") == group]
        hosts = sorted({node["host"] for node in members if node.get("host")})
        slots = sum(node.get("concurrency") or 0 for node in members)
        names = [node["node"] for node in members]
        received = sum(float((measured.get("received") or {}).get(name, 0)) for name in names)
        runtime = sum(float((measured.get("runtime_sum") or {}).get(name, 0)) for name in names)
        finished = sum(float((measured.get("runtime_count") or {}).get(name, 0)) for name in names)
        arrival = received / window
        mean = runtime / finished if finished > 0 else None
        needed = arrival * mean if mean is not None else None
        # Slots per host from the hosts whose nodes answered: an offline host gives no slot, and counting it would
        # halve what a host of the group holds (and double the hosts needed).
        serving = {node["host"] for node in members if node.get("host") and node.get("concurrency")}
        per_host = slots / len(serving) if serving and slots else None
        rows.append({
            "group": group, "queues": sorted({queue for node in members for queue in node.get("queues") or []}),
            "arrival_per_second": round(arrival, 3), "mean_seconds": None if mean is None else round(mean, 3),
            "slots_needed": None if needed is None else round(needed, 2), "slots": slots,
            "hosts": len(hosts), "slots_per_host": per_host,
            "hosts_needed": None if needed is None or not per_host else max(1, math.ceil(needed / per_host)),
        })
    return rows


def host_port(address, port, local=False):
    """"host:port" for an address a service listens on ("[v6]:port" for IPv6). local: the address a client on
    the same host connects to (a wildcard address, 0.0.0.0 or ::, becomes loopback)."""
    import ipaddress

    parsed = ipaddress.ip_address(str(address).strip())
    if local and parsed.is_unspecified:
        parsed = ipaddress.ip_address("::1" if parsed.version == 6 else "127.0.0.1")
    return f"[{parsed}]:{int(port)}" if parsed.version == 6 else f"{parsed}:{int(port)}"


def monitor_fleet_hosts(worker_hostvars, worker_hosts):
    """{host: {"group", "nodes": {node: [queues]}}} of every worker host, from their facts (facts.yml), for the
    fleet exporter; raises naming the hosts whose facts are missing (not reached in this run)."""
    hosts, missing = {}, []
    for host, variables in zip(worker_hosts, worker_hostvars):
        nodes = (variables or {}).get("_celery_worker_node_queues")
        if nodes is None:
            missing.append(host)
            continue
        hosts[host] = {"group": (variables.get("_celery_worker_layered") or {}).get("profile"),
                       "nodes": {node: sorted(queues) for node, queues in nodes.items()}}
    if missing:
        raise ValueError(f"no worker facts for {', '.join(missing)}: the monitor's view of the fleet needs every "
                         "worker host in the run (do not --limit them out of a run that configures the monitor)")
    return hosts


# --- Kubernetes: the same workers as Deployments ---------------------------------------------------------
# kombu's Redis transport keeps a queue's messages of priority 0 in a list named as the queue and each other
# priority step in its own list, "<queue>\x06\x16<step>" (kombu/transport/redis.py: PRIORITY_STEPS,
# Channel.sep, Channel._q_for_pri). tests/unit/test_kubernetes.py checks these against kombu's own.
KOMBU_PRIORITY_STEPS = (0, 3, 6, 9)
KOMBU_PRIORITY_SEPARATOR = "\x06\x16"
KUBERNETES_NAME_PATTERN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
KUBERNETES_CPU_PATTERN = re.compile(r"[0-9]+(\.[0-9]+)?|[0-9]+m")
KUBERNETES_MEMORY_PATTERN = re.compile(r"[0-9]+(Ki|Mi|Gi|Ti|k|M|G|T)?")
# Seconds the preStop hook may take beyond its drain wait: the Python start and its two bounded control calls
# (images/worker/celery_fleet_pod.py: CALL_DEADLINE each).
POD_HOOK_OVERHEAD = 20


def priority_lists(queue):
    """Every Redis list kombu keeps the queue's ready messages in: one per priority step."""
    return [queue if step == 0 else f"{queue}{KOMBU_PRIORITY_SEPARATOR}{step}" for step in KOMBU_PRIORITY_STEPS]


def kubernetes_memory(memory_max):
    """systemd's MemoryMax (bytes with an optional K/M/G/T suffix, base 1024) as a Kubernetes quantity;
    None for no limit ('' or infinity). A percentage has no Kubernetes meaning: ValueError."""
    if memory_max in ("", "infinity", None):
        return None
    match = re.fullmatch(r"([0-9]+)([KMGT]?)", str(memory_max))
    if not match:
        raise ValueError(memory_max)
    number, suffix = match.groups()
    return f"{number}{suffix}i" if suffix else number


def kubernetes_cpu(cpu_quota):
    """systemd's CPUQuota ('200%': two CPUs) as a Kubernetes CPU quantity; None for no limit."""
    if not cpu_quota:
        return None
    percent = int(str(cpu_quota).rstrip("%"))
    return str(percent // 100) if percent % 100 == 0 else f"{percent * 10}m"


def _kubernetes_replicas(host_vars_list, settings, group):
    """How many worker processes the inventory runs for the group: each host's instances, as worker_instances()
    counts them (gpu per_device: one per GPU the inventory names, else one, since the controller cannot run
    nvidia-smi on a pod's node)."""
    return sum(max(len(worker_instances(settings, group, host_vars.get("celery_worker_gpu_devices"))), 1)
               for host_vars in host_vars_list)


def kubernetes_workers(hosts_vars, defaults, profiles, spec, kube_defaults, kube_spec, rolling):
    """The worker groups as Kubernetes sees them, every number derived from the same settings the systemd
    instances get: one place for the arithmetic the manifests carry.

    hosts_vars: hostvars of the inventory's worker hosts; defaults, profiles, spec: the worker role's settings
    layers and option spec (as worker_settings). kube_defaults: celery_worker_kubernetes_defaults; each group's
    hosts may override keys in celery_worker_kubernetes_group_settings (group_vars). kube_spec: that option's
    spec (choices). rolling: {"serial", "min_online", "drain_margin"} of the systemd roll.
    A group's settings are its first host's layers without the host layer (a Deployment's pods are alike).
    Returns {"groups": [...], "errors": [...]}; every error names the variable and what is allowed.
    """
    spec, kube_spec = spec or {}, kube_spec or {}
    errors, members = [], {}
    for host_vars in hosts_vars:
        profile = worker_profile(host_vars.get("celery_worker_profile", ""), host_vars.get("group_names", []),
                                 host_vars.get("celery_worker_profiles", profiles))
        if profile:
            members.setdefault(profile, []).append(host_vars)
    serials, serial_errors = _rolling_serials(rolling.get("serial"))
    min_online, min_online_errors = _rolling_min_online(rolling.get("min_online"))
    errors += serial_errors + min_online_errors
    groups = []
    for group, group_hosts in sorted(members.items()):
        first = dict(group_hosts[0])
        first["celery_worker_host_settings"] = {}
        layered = _host_settings(first, defaults, profiles, spec)
        hosts = [host_vars.get("inventory_hostname") for host_vars in group_hosts]
        if layered["errors"]:
            errors += [f"group {group}: {error}" for error in layered["errors"]]
            continue
        settings = layered["settings"]
        overrides = first.get("celery_worker_kubernetes_group_settings") or {}
        if not isinstance(overrides, dict):
            errors.append(f"group {group}: celery_worker_kubernetes_group_settings must be a mapping of "
                          f"{sorted(kube_spec)}; got {_show(overrides)}.")
            overrides = {}
        kube = dict(kube_defaults or {})
        kube.update(overrides)

        def where(key):
            return (f"celery_worker_kubernetes_group_settings.{key} (group {group})" if key in overrides
                    else f"celery_worker_kubernetes_defaults.{key}")

        unknown = sorted(key for key in kube if key not in kube_spec)
        if unknown:
            errors.append(f"group {group}: unknown Kubernetes setting(s) {unknown}; allowed are {sorted(kube_spec)}.")
        group_errors = []
        for key, option in kube_spec.items():
            if option.get("choices") and kube.get(key) not in option["choices"]:
                group_errors.append(f"{where(key)} must be one of: {', '.join(map(str, option['choices']))}; "
                                    f"got {_show(kube.get(key))}.")

        def integer_or_null(key, minimum):
            value = kube.get(key)
            if value is None:
                return None
            if not _is_integer(value) or value < minimum:
                group_errors.append(f"{where(key)} must be null or an integer >= {minimum}; got {_show(value)}.")
                return None
            return value

        replicas = integer_or_null("replicas", 0)
        if replicas is None:
            replicas = max(_kubernetes_replicas(group_hosts, settings, group), 1)
        min_replicas = integer_or_null("min_replicas", 0)
        min_replicas = replicas if min_replicas is None else min_replicas
        max_replicas = integer_or_null("max_replicas", 1)
        max_replicas = max(4 * replicas, 1) if max_replicas is None else max_replicas
        if min_replicas > max_replicas:
            group_errors.append(f"{where('min_replicas')} ({min_replicas}) must not exceed {where('max_replicas')} "
                                f"({max_replicas}).")
        cooldown = integer_or_null("cooldown_seconds", 0)
        polling = integer_or_null("polling_seconds", 1)
        slots = settings["autoscale"]["max"] if settings.get("autoscale") else settings["concurrency"]
        target = integer_or_null("target_per_replica", 1)
        target = slots * int(settings["prefetch_multiplier"]) if target is None else target
        # The preStop hook drains the pod's node within the systemd roll's drain deadline; SIGTERM then waits
        # for what is still running (at most the hard limit) plus the stop margin. Kubernetes counts the grace
        # period from the start of preStop, so it must hold both.
        prestop = drain_timeout(settings, rolling.get("drain_margin", 30))
        needed = prestop + POD_HOOK_OVERHEAD + stop_timeout(settings)
        grace = integer_or_null("grace_period_seconds", 1)
        if grace is not None and grace < needed:
            group_errors.append(
                f"{where('grace_period_seconds')} ({grace} s) is shorter than the drain ({prestop} s: "
                f"prefetch_multiplier x time_limit + celery_worker_rolling_drain_margin, and {POD_HOOK_OVERHEAD} s "
                f"for the hook itself) plus the warm stop (time_limit + stop_timeout_margin, "
                f"{stop_timeout(settings)} s; {layered['origins'].get('time_limit', 'celery_worker_defaults.time_limit')}): "
                f"Kubernetes would kill running tasks. Set it to at least {needed}, or null.")
        grace = needed if grace is None else grace
        # GPUs: a pod per device, as per_device runs an instance per device; shared sees all the node gives it.
        gpus = integer_or_null("gpus_per_pod", 0)
        if settings["gpu_mode"] == "shared" and gpus is None:
            group_errors.append(f"{where('gpus_per_pod')} must be set for group {group}, whose gpu_mode is shared "
                                f"({layered['origins'].get('gpu_mode')}): the device plugin gives a GPU to one pod only, "
                                f"so pods cannot share the host's GPUs as its instances do. Set it to the GPUs each "
                                f"pod may take (with time-slicing or MPS configured in the cluster), or use per_device.")
        if gpus is None:
            gpus = {"per_device": 1, "shared": max(len(first.get("celery_worker_gpu_devices") or []), 1)}.get(
                settings["gpu_mode"], 0)
        if settings["gpu_mode"] != "none" and gpus < 1:
            group_errors.append(f"{where('gpus_per_pod')} must be at least 1 for group {group}, whose gpu_mode is "
                                f"{settings['gpu_mode']} ({layered['origins'].get('gpu_mode')}): its pods would "
                                f"get no GPU; got {_show(kube.get('gpus_per_pod'))}.")
        if settings["gpu_mode"] == "none" and gpus:
            group_errors.append(f"{where('gpus_per_pod')} must be 0 or null for group {group}, whose gpu_mode is "
                                f"none; got {gpus}.")
        resources = {"requests": {}, "limits": {}}
        memory = kube.get("memory_limit")
        try:
            memory = memory if memory else kubernetes_memory(settings["memory_max"])
        except ValueError:
            group_errors.append(f"{where('memory_limit')} must be set for group {group}: its memory_max "
                                f"{settings['memory_max']!r} ({layered['origins'].get('memory_max')}) is a percentage, which "
                                f"Kubernetes has no quantity for.")
            memory = None
        for key, value, pattern in (("memory_limit", memory, KUBERNETES_MEMORY_PATTERN),
                                    ("memory_request", kube.get("memory_request"), KUBERNETES_MEMORY_PATTERN),
                                    ("cpu_request", kube.get("cpu_request"), KUBERNETES_CPU_PATTERN)):
            if value and not pattern.fullmatch(str(value)):
                group_errors.append(f"{where(key)} must be a Kubernetes quantity ({pattern.pattern}); got "
                                    f"{_show(value)}.")
        cpu = kubernetes_cpu(settings["cpu_quota"])
        if memory:
            resources["limits"]["memory"] = str(memory)
        resources["requests"]["memory"] = str(kube.get("memory_request") or memory or "256Mi")
        if cpu:
            resources["limits"]["cpu"] = cpu
        resources["requests"]["cpu"] = str(kube.get("cpu_request") or cpu or "250m")
        if gpus:
            resources["limits"][str(kube.get("gpu_resource") or "nvidia.com/gpu")] = gpus
        # The roll: as many pods at once as the systemd roll's steady batch; never below the guard's minimum.
        batch = max(_batch_size(serials[-1], replicas), 1)
        if min_online is None:
            # The guard's default keeps every other node in service: new pods come up before old ones go.
            strategy = {"maxSurge": batch, "maxUnavailable": 0}
            budget = {"maxUnavailable": batch}
        else:
            out = max(0, min(batch, replicas - min_online))
            strategy = {"maxSurge": batch, "maxUnavailable": out}
            budget = {"minAvailable": min_online}
            if min_online >= min_replicas:
                group_errors.append(f"celery_worker_rolling_min_online ({min_online}) must be below group {group}'s "
                                    f"fewest pods ({where('min_replicas')}: {min_replicas}): its budget would allow no "
                                    f"eviction at all and block every node drain.")
        if gpus:
            # No spare GPU can be assumed for a surge pod: a GPU group rolls by replacing a batch at a time.
            strategy = {"maxSurge": 0,
                        "maxUnavailable": batch if min_online is None else max(strategy["maxUnavailable"], 1)}
        scale_queues = kube.get("scale_queues")
        scale_queues = settings["queues"] if scale_queues is None else scale_queues
        if (not isinstance(scale_queues, list) or not scale_queues
                or not all(isinstance(queue, str) for queue in scale_queues)
                or not set(scale_queues) <= set(settings["queues"])):
            group_errors.append(f"{where('scale_queues')} must be null (the group's queues) or a non-empty list of "
                                f"queues group {group} consumes ({settings['queues']}): a scaler needs a queue; got "
                                f"{_show(scale_queues)}.")
            scale_queues = []
        name = f"{group}-worker"
        if not KUBERNETES_NAME_PATTERN.fullmatch(name) or len(name) > 52:
            group_errors.append(f"group {group}: its Deployment would be named {name!r}, which Kubernetes refuses "
                                f"(lower-case letters, digits and '-', at most 52 characters). Rename the group.")
        errors += group_errors
        groups.append({
            "group": group, "name": name, "file": f"10-{name}.yaml", "hosts": hosts, "settings": settings,
            "node_name": settings["node_name"],
            # Exactly the systemd instance's options, split as systemd splits $CELERY_WORKER_ARGS.
            "arguments": worker_arguments(settings, settings["node_name"]).split(),
            "replicas": replicas, "min_replicas": min_replicas, "max_replicas": max_replicas,
            "cooldown_seconds": cooldown, "polling_seconds": polling, "target_per_replica": target,
            "prestop_seconds": prestop, "grace_seconds": grace, "resources": resources, "gpus": gpus,
            "strategy": strategy, "budget": budget, "batch": batch, "scaler": kube.get("scaler"),
            # The solo pool answers no control call while a task runs: probes through the control API would
            # call it dead, so its pods have none.
            "probes": settings["pool"] != "solo",
            "scale_queues": scale_queues,
            "scale_lists": [name for queue in scale_queues for name in priority_lists(queue)],
        })
    if not members:
        errors.append("No worker group to render: no host of the inventory is in a group that has a worker profile "
                      f"({sorted(profiles or {})}).")
    return {"groups": groups, "errors": errors}


def prometheus_queue_selector(queues):
    """A PromQL label matcher for exactly these queues (their names may hold '.', which a regex would widen)."""
    return "|".join(re.escape(queue) for queue in queues)


class FilterModule:
    def filters(self):
        return {
            "celery_fleet_parse_nvidia_smi": parse_nvidia_smi,
            "celery_fleet_monitor_errors": monitor_errors,
            "celery_fleet_monitor_fleet_hosts": monitor_fleet_hosts,
            "celery_fleet_host_port": host_port,
            "celery_fleet_fleet_capacity": fleet_capacity,
            "celery_fleet_wheel_platforms": wheel_platforms,
            "celery_fleet_worker_instances": worker_instances,
            "celery_fleet_worker_arguments": worker_arguments,
            "celery_fleet_surge_memory": surge_memory,
            "celery_fleet_node_names": node_names,
            "celery_fleet_duplicates": duplicates,
            "celery_fleet_environment_errors": environment_errors,
            "celery_fleet_wheelhouse_source_errors": wheelhouse_source_errors,
            "celery_fleet_unreached": unreached,
            "celery_fleet_memory_bytes": memory_bytes,
            "celery_fleet_in_service": in_service,
            "celery_fleet_worker_settings": worker_settings,
            "celery_fleet_rolling_plan": rolling_plan,
            "celery_fleet_capacity_guard": capacity_guard,
            "celery_fleet_capacity_guard_nodes": capacity_guard_nodes,
            "celery_fleet_drain_timeout": drain_timeout,
            "celery_fleet_consumers_to_restore": consumers_to_restore,
            "celery_fleet_unit_start_times": unit_start_times,
            "celery_fleet_beat_restart_due": beat_restart_due,
            "celery_fleet_units_off": units_off,
            "celery_fleet_app_check_cached": app_check_cached,
            "celery_fleet_transport_switched": transport_switched,
            "celery_fleet_pending_restarts": pending_restarts,
            "celery_fleet_changed_instances": changed_instances,
            "celery_fleet_services_to_restart": services_to_restart,
            "celery_fleet_changed_broker_instances": changed_broker_instances,
            "celery_fleet_fleet_time_limit": fleet_time_limit,
            "celery_fleet_transport_options": transport_options,
            "celery_fleet_fleet_queues": fleet_queues,
            "celery_fleet_app_findings": app_findings,
            "celery_fleet_redis_acl": redis_acl,
            "celery_fleet_url_secret": url_secret,
            "celery_fleet_broker_credential_errors": broker_credential_errors,
            "celery_fleet_lab_secret_errors": lab_secret_errors,
            "celery_fleet_broker_tls_files": broker_tls_files,
            "celery_fleet_tls_names": tls_names,
            "celery_fleet_redis_url": redis_url,
            "celery_fleet_broker_url_errors": broker_url_errors,
            "celery_fleet_fleet_status": fleet_status,
            "celery_fleet_systemd_units_memory": systemd_units_memory,
            "celery_fleet_kubernetes_workers": kubernetes_workers,
            "celery_fleet_priority_lists": priority_lists,
            "celery_fleet_prometheus_queue_selector": prometheus_queue_selector,
        }
