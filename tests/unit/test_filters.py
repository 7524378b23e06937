import json
from pathlib import Path

import pytest
from ansible.errors import AnsibleFilterError

import celery_fleet as cf

WEB = {
    "node_name": "web-worker@%h", "queues": ["default", "priority"], "pool": "prefork",
    "concurrency": 8, "prefetch_multiplier": 4, "max_tasks_per_child": 0,
    "max_memory_per_child": 0, "soft_time_limit": 300, "time_limit": 360,
    "autoscale": None, "loglevel": "INFO", "instances": 1, "gpu_mode": "none",
    "stop_timeout_margin": 30,
}

NVIDIA_SMI_TWO = (
    "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-1b2c3d4e-aaaa-bbbb-cccc-000000000000)\n"
    "GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-1b2c3d4e-aaaa-bbbb-cccc-111111111111)\n"
)


def test_nvidia_smi_two_devices():
    assert cf.parse_nvidia_smi(NVIDIA_SMI_TWO) == ["0", "1"]


def test_nvidia_smi_ignores_mig_and_noise():
    out = NVIDIA_SMI_TWO.splitlines()[0] + "\n  MIG 1g.10gb Device 0: (UUID: MIG-x)\nNo devices were found\n"
    assert cf.parse_nvidia_smi(out) == ["0"]


def test_nvidia_smi_empty():
    assert cf.parse_nvidia_smi("") == []
    assert cf.parse_nvidia_smi(None) == []


def test_wheel_platforms_newest_first_and_complete():
    tags = cf.wheel_platforms("x86_64", "2.36")
    assert tags[0] == "manylinux_2_36_x86_64"
    assert "manylinux_2_28_x86_64" in tags and "manylinux_2_17_x86_64" in tags
    assert tags[-2:] == ["manylinux2014_x86_64", "linux_x86_64"]


def test_wheel_platforms_rejects_unknown_glibc():
    with pytest.raises(ValueError):
        cf.wheel_platforms("x86_64", "3.1")


def test_single_instance_keeps_the_group_node_name():
    (instance,) = cf.worker_instances(WEB, "web")
    assert instance["name"] == "web"
    assert instance["node_name"] == "web-worker@%h"
    assert instance["cuda_visible_devices"] is None
    assert instance["timeout_stop_sec"] == 390


def test_web_arguments_match_the_settings():
    args = cf.worker_arguments(WEB, "web-worker@%h").split()
    assert "--hostname=web-worker@%h" in args
    assert "--queues=default,priority" in args
    assert "--pool=prefork" in args
    assert "--concurrency=8" in args
    assert "--prefetch-multiplier=4" in args
    assert "--time-limit=360" in args and "--soft-time-limit=300" in args
    # Zero means unlimited: the option is left out rather than passed as 0.
    assert not any(a.startswith("--max-tasks-per-child") for a in args)


def test_batch_max_tasks_and_memory_per_child():
    batch = dict(WEB, queues=["batch"], concurrency=4, max_tasks_per_child=1000, max_memory_per_child=512000)
    args = cf.worker_arguments(batch, "batch-worker@%h").split()
    assert "--max-tasks-per-child=1000" in args
    assert "--max-memory-per-child=512000" in args


def test_autoscale_replaces_concurrency():
    args = cf.worker_arguments(dict(WEB, autoscale={"max": 10, "min": 2}), "w@%h").split()
    assert "--autoscale=10,2" in args
    assert not any(a.startswith("--concurrency") for a in args)


def test_several_instances_get_unique_names():
    instances = cf.worker_instances(dict(WEB, instances=3), "web")
    assert [i["name"] for i in instances] == ["web-1", "web-2", "web-3"]
    assert [i["node_name"] for i in instances] == [
        "web-worker-1@%h", "web-worker-2@%h", "web-worker-3@%h"]
    assert "--hostname=web-worker-2@%h" in instances[1]["arguments"].split()


def test_surge_mode_gives_each_instance_a_surge_node_and_its_options():
    instances = cf.worker_instances(dict(WEB, instances=2, rolling_mode="surge"), "web")
    assert [i["surge_node_name"] for i in instances] == ["web-worker-1-surge@%h", "web-worker-2-surge@%h"]
    assert "--hostname=web-worker-2-surge@%h" in instances[1]["surge_arguments"].split()
    # Everything but the node name is the instance's own.
    assert (instances[1]["surge_arguments"].replace("-surge@", "@") == instances[1]["arguments"])
    (plain,) = cf.worker_instances(dict(WEB, rolling_mode="stop_start"), "web")
    assert plain["surge_node_name"] is None and plain["surge_arguments"] is None


GIB = 1024 ** 3


@pytest.mark.parametrize("memory_max, surge_memory, instances, total, needed, refused", [
    ("2G", "", 1, 8 * GIB, 4 * GIB, False),          # memory_max x 2
    ("2G", "", 3, 7 * GIB, 8 * GIB, True),           # three instances and one surge process: 8 GiB
    # The surge process gets the instance's MemoryMax: counted at it, whatever the operator declares.
    ("2G", "1G", 3, 7 * GIB, 8 * GIB, True),
    ("", "3G", 2, 8 * GIB, 9 * GIB, True),           # no cap: the declared need stands for every process
    ("", "2G", 2, 8 * GIB, 6 * GIB, False),
    ("512M", "", 1, 1024 * 1024 ** 2, 1024 * 1024 ** 2, False),  # exactly the host's memory fits
    ("25%", "", 2, 8 * GIB, 6 * GIB, False),         # percentages of the host's memory
    ("40%", "", 2, 8 * GIB, (8 * GIB * 40 // 100) * 3, True),
])
def test_surge_needs_memory_for_the_instances_and_one_process_more(memory_max, surge_memory, instances, total,
                                                                   needed, refused):
    settings = dict(WEB, rolling_mode="surge", memory_max=memory_max, surge_memory=surge_memory)
    outcome = cf.surge_memory(settings, instances, total, {"memory_max": "celery_worker_group_settings.memory_max"})
    assert outcome["needed"] == needed
    assert bool(outcome["error"]) == refused, outcome
    if refused:
        assert "celery_worker_group_settings.memory_max" in outcome["error"] and "stop_start" in outcome["error"]
        assert f"{instances + 1} x " in outcome["error"] and f"{needed / GIB:.2f} GiB" in outcome["error"]


@pytest.mark.parametrize("memory_max, surge_memory", [
    ("", ""), ("infinity", ""), ("0", ""), ("9" * 400, ""), ("99999999999999T", ""), ("", "0")])
def test_surge_without_a_known_process_memory_is_refused_naming_both_variables(memory_max, surge_memory):
    outcome = cf.surge_memory(dict(WEB, rolling_mode="surge", memory_max=memory_max, surge_memory=surge_memory), 1,
                              8 * GIB)
    assert "celery_worker_defaults.memory_max" in outcome["error"], outcome
    assert "celery_worker_defaults.surge_memory" in outcome["error"]


def test_surge_is_refused_on_gpu_hosts_and_where_the_memory_is_unknown():
    gpu = cf.surge_memory(dict(WEB, rolling_mode="surge", memory_max="1G", surge_memory="", gpu_mode="per_device"), 2,
                          64 * GIB, {"rolling_mode": "celery_worker_group_settings.rolling_mode"})
    assert "celery_worker_group_settings.rolling_mode is surge" in gpu["error"] and "GPU" in gpu["error"]
    unread = cf.surge_memory(dict(WEB, rolling_mode="surge", memory_max="50%", surge_memory=""), 1, None)
    assert "/proc/meminfo" in unread["error"]
    off = cf.surge_memory(dict(WEB, rolling_mode="stop_start", memory_max="", surge_memory="", gpu_mode="shared"), 1,
                          None)
    assert off["error"] == ""


def test_gpu_per_device_pins_one_device_each():
    gpu = dict(WEB, node_name="gpu-worker@%h", queues=["ml"], concurrency=1, gpu_mode="per_device",
               instances=None)
    instances = cf.worker_instances(gpu, "gpu", ["0", "1"])
    assert [(i["name"], i["cuda_visible_devices"]) for i in instances] == [("gpu-1", "0"), ("gpu-2", "1")]
    assert [i["node_name"] for i in instances] == ["gpu-worker-1@%h", "gpu-worker-2@%h"]


def test_gpu_shared_runs_one_instance_on_all_devices():
    gpu = dict(WEB, node_name="gpu-worker@%h", queues=["ml"], concurrency=2, gpu_mode="shared")
    (instance,) = cf.worker_instances(gpu, "gpu", ["0", "1"])
    assert instance["cuda_visible_devices"] == "0,1"
    assert "--concurrency=2" in instance["arguments"].split()


def test_node_names_expand_like_celery():
    assert cf.node_names(["web-worker@%h", "%n-x@%d"], "web1.example.org") == [
        "web-worker@web1.example.org", "web1-x@example.org"]


def test_duplicates():
    assert cf.duplicates(["a", "b", "a", "c", "b"]) == ["a", "b"]
    assert cf.duplicates(["a"]) == []


def test_in_service_needs_an_answer_and_every_expected_queue():
    from celery_fleet import in_service

    replies = {
        "web-worker@web1": [{"name": "default"}, {"name": "priority"}],
        "web-worker@web2": [{"name": "default"}],  # half drained
        "web-worker@web3": [],  # drained
        "stranger@x": [{"name": "default"}],
    }
    expected = {f"web-worker@web{n}": ["default", "priority"] for n in range(1, 5)}
    nodes = ["web-worker@web1", "web-worker@web2", "web-worker@web3", "web-worker@web4", "stranger@x"]
    assert in_service(nodes, replies, expected) == ["web-worker@web1"]
    assert in_service(nodes, {}, expected) == []
    assert in_service(nodes, None, expected) == []


@pytest.mark.parametrize("value, expected", [("0", 0), (0, 0), ("64mb", 64 * 2**20), ("64MB", 64 * 2**20),
                                             ("1g", 10**9), ("1gb", 2**30), ("512k", 512000), ("100", 100)])
def test_memory_bytes_reads_sizes_as_redis_conf_does(value, expected):
    assert cf.memory_bytes(value) == expected


@pytest.mark.parametrize("value", ["64 MiB", "-1", "", "1tb", "64mb\n", "64mb maxmemory-policy noeviction", True,
                                   None, "9" * 16, "17179869184gb", "999999999999999gb", "\u0666\u0664mb"])
def test_memory_bytes_refuses_anything_else_naming_the_variable(value):
    with pytest.raises(AnsibleFilterError, match="celery_broker_results_maxmemory must be a Redis memory size"):
        cf.memory_bytes(value, "celery_broker_results_maxmemory")


def test_unreached_names_each_host_that_did_not_answer_with_its_connection_s_reason():
    results = {
        "web1": {"ping": "pong", "changed": False},
        "web2": {"failed": True, "msg": "The following modules failed to execute: ansible.legacy.setup.",
                 "failed_modules": {"ansible.legacy.ping": {
                     "module_stderr": "Error response from daemon: Container 2b4f is not running\n"}}},
        "web3": {"unreachable": True, "msg": "Failed to connect to the host via ssh: timed out"},
        "web4": {},
        "web5": {"ansible_facts": {"ansible_nodename": "web5"}, "changed": False},
        "web6": {"ansible_facts": {"discovered_interpreter_python": "/usr/bin/python3"}, "failed": True,
                 "msg": "The following modules failed to execute: ansible.legacy.setup."},
    }
    assert cf.unreached(results) == [
        {"host": "web2", "reason": "web2: Error response from daemon: Container 2b4f is not running"},
        {"host": "web3", "reason": "web3: Failed to connect to the host via ssh: timed out"},
        {"host": "web4", "reason": "web4: no answer"},
        {"host": "web6", "reason": "web6: The following modules failed to execute: ansible.legacy.setup."}]


def test_extra_environment_accepts_plain_names_and_values():
    assert cf.environment_errors({"DJANGO_SETTINGS_MODULE": "proj.settings", "WORKERS": 4, "_X": "a b:c/d"}) == []


@pytest.mark.parametrize("variables, fragment", [
    ({"BAD NAME": "x"}, "'BAD NAME' is not a variable name"),
    ({"1ABC": "x"}, "'1ABC' is not a variable name"),
    ({"CELERY_BROKER_URL": "redis://evil"}, "CELERY_BROKER_URL is set by the role itself"),
    ({"BROKER_URL": "redis://evil"}, "BROKER_URL would change which broker, application or code the workers use"),
    ({"CELERY_BROKER_WRITE_URL": "redis://evil"}, "CELERY_BROKER_WRITE_URL would change which broker"),
    ({"LD_PRELOAD": "/tmp/x.so"}, "LD_PRELOAD would change which broker, application or code"),
    ({"A": 'say "hi"'}, "celery_worker_extra_environment['A'] may not hold a newline"),
    ({"A": "line\nINJECTED=1"}, "may not hold a newline"),
    ({"A": "$(reboot)"}, "may not hold a newline"),
    ({"A": "`id`"}, "may not hold a newline"),
    ({"A": "back\\slash"}, "may not hold a newline"),
    ({"A": "x" * 4097}, "nor exceed 4096 characters"),
    ({"A": True}, "must be a string or a number; got bool"),
    ({"A": ["list"]}, "must be a string or a number; got list"),
    (["A=1"], "must be a mapping of names to values"),
])
def test_extra_environment_refuses_what_systemd_and_sh_would_read_differently(variables, fragment):
    assert fragment in " ".join(cf.environment_errors(variables))


def test_wheelhouse_sources_are_checked_without_echoing_an_index_url():
    assert cf.wheelhouse_source_errors("", [], []) == []
    assert cf.wheelhouse_source_errors("https://ci:t0ken@pypi.internal/simple", ["http://127.0.0.1:8080/simple/"],
                                       ["/srv/wheels"]) == []
    errors = cf.wheelhouse_source_errors("ftp://ci:t0ken@mirror/simple", ["https://ok/simple", "https://a b"],
                                         ["wheels", "/srv/wheels"])
    assert errors == [
        "celery_worker_wheelhouse_index_url must be \"\" (pip's own index) or an http:// or https:// URL with no "
        "spaces.",
        "celery_worker_wheelhouse_extra_index_urls[1] must be an http:// or https:// URL with no spaces.",
        "celery_worker_wheelhouse_find_links[0] must be an absolute directory path on the controller; got 'wheels'."]
    assert "t0ken" not in " ".join(errors)
    assert cf.wheelhouse_source_errors("", "https://one", "/srv") == [
        "celery_worker_wheelhouse_extra_index_urls must be a list of http:// or https:// URLs.",
        "celery_worker_wheelhouse_find_links must be a list of absolute directory paths."]


BEAT_SHOW = """Id=celery-beat.service
ActiveState=active
ActiveEnterTimestamp=Sat 2026-11-28 00:31:16.250000 UTC
"""


def test_beat_restart_is_due_when_a_file_it_starts_with_is_newer_than_its_start():
    start = 1795825876.25  # 2026-11-28 00:31:16.25 UTC
    assert cf.beat_restart_due(BEAT_SHOW, [{"path": "/opt/celery-fleet/current", "mtime": start - 60}]) is False
    assert cf.beat_restart_due(BEAT_SHOW, [{"path": "/etc/celery-fleet/celery.env", "mtime": start - 60},
                                           {"path": "/opt/celery-fleet/current", "mtime": start + 5}]) is True
    stopped = BEAT_SHOW.replace("ActiveState=active", "ActiveState=inactive")
    assert cf.beat_restart_due(stopped, [{"path": "/opt/celery-fleet/current", "mtime": start - 60}]) is True
    assert cf.unit_start_times(BEAT_SHOW) == {}


def test_an_app_with_periodic_tasks_and_no_beat_host_is_refused():
    report = {"tasks": {}, "beat_schedule": ["tick", "nightly"], "default_queue": "default"}
    findings = cf.app_findings(report, {"web": ["default"]}, {"visibility_timeout": 3600}, app="acme", beat_hosts=[])
    assert findings["errors"] == [
        "acme: the app's beat_schedule holds periodic tasks (nightly, tick) and no worker host has "
        "celery_worker_beat: true: they would never be sent. Set it on exactly one host (host_vars)."]
    assert cf.app_findings(report, {"web": ["default"]}, {}, beat_hosts=["batch1"])["errors"] == []
    assert cf.app_findings({**report, "beat_schedule": []}, {"web": ["default"]}, {}, beat_hosts=[])["errors"] == []


# --- Broker credentials --------------------------------------------------------------------------------

MARKER = "a/b%c#d'e\"f:g@h?i&j=k+l;m\\n`o$p"


def test_the_acl_switches_the_default_user_off_and_keeps_only_hashes():
    lines = cf.redis_acl("celery", MARKER, "celery-admin", "admin-" + "x" * 20)
    default, client, admin = (line.split() for line in lines)
    # Off, no password (resetpass and none added, not nopass): nobody logs in as it. It holds the clients'
    # commands only for Redis's replay of their transactions from the AOF (tests/integration/test_broker_acl.py).
    assert default[:4] == ["user", "default", "off", "resetpass"] and "nopass" not in default
    assert not any(word.startswith((">", "#", "<", "!")) for word in default)
    assert "+@all" not in default and default[default.index("-@all") + 1:] == client[client.index("-@all") + 1:]
    assert client[:3] == ["user", "celery", "on"] and admin[:3] == ["user", "celery-admin", "on"]
    assert MARKER not in "\n".join(lines) and all(line.count("#") <= 1 for line in lines)
    assert "-@all" in client and "+@all" not in client and "+@all" in admin
    granted = {word[1:] for word in client if word.startswith("+")}
    assert granted == set(cf.REDIS_CLIENT_COMMANDS)
    assert not granted & set(cf.REDIS_FORBIDDEN)
    assert not {command.split("|")[0] for command in granted} & set(cf.REDIS_FORBIDDEN)


def test_a_password_with_any_printable_character_survives_the_url():
    from kombu.utils.url import url_to_parts

    url = f"redis://{cf.url_secret('celery')}:{cf.url_secret(MARKER)}@broker1:6379/0"
    parts = url_to_parts(url)  # as kombu and Celery's Redis backend read it (they decode)
    assert (parts.hostname, parts.port, parts.username, parts.password) == ("broker1", 6379, "celery", MARKER)
    assert set(cf.url_secret(MARKER)) <= set("ABCDEFabcdef0123456789%-._~ghijklmnopqrstuvwxyz")


@pytest.mark.parametrize("password, problem", [
    ("short", "16 to 512"), ("with a space inside it", "no space"), ("tab\there-and-long-enough", "no space"),
    ("line\nbreak-and-long-enough", "no space"), ("accentué-and-long-enough", "non-ASCII"), (12345678901234567, "16 to 512"),
])
def test_broker_passwords_outside_the_printable_class_are_refused_by_name(password, problem):
    errors = cf.broker_credential_errors({"celery_broker_user": "celery", "celery_broker_password": password})
    assert len(errors) == 1 and errors[0].startswith("celery_broker_password must be") and problem in errors[0]
    assert str(password) not in errors[0]


def test_broker_users_and_passwords_must_differ():
    same = cf.broker_credential_errors({"celery_broker_user": "celery", "celery_broker_password": MARKER,
                                        "celery_broker_admin_user": "celery", "celery_broker_admin_password": MARKER})
    assert len(same) == 2
    assert cf.broker_credential_errors({"celery_broker_user": "default", "celery_broker_password": MARKER})
    assert cf.broker_credential_errors({"celery_broker_user": "ce lery", "celery_broker_password": MARKER})
    assert cf.broker_credential_errors({"celery_broker_user": "celery", "celery_broker_password": MARKER,
                                        "celery_broker_admin_user": "celery-admin",
                                        "celery_broker_admin_password": MARKER + "2"}) == []


def test_the_lab_s_public_secrets_are_refused_outside_the_lab():
    lab_vault = (Path(__file__).resolve().parents[2] / "inventories" / "lab" / "lab-vault-password.txt").read_text()
    errors = cf.lab_secret_errors({"celery_broker_password": "Lab/q%7#x'Zk2\"SCJmeyE5Y8-LEAKMARK"}, lab_vault)
    assert len(errors) == 2 and errors[0].startswith("celery_broker_password is one of the lab's public passwords")
    assert "vault password file is the lab's public one" in errors[1]
    assert cf.lab_secret_errors({"celery_broker_password": "Lab/q%7#x'Zk2\"SCJmeyE5Y8-LEAKMARK"}, lab_vault,
                                lab=True) == []
    assert cf.lab_secret_errors({"celery_broker_password": MARKER}, "my own vault password") == []


def test_a_broker_moving_to_acl_users_keeps_the_default_user_for_one_run_when_asked():
    lines = cf.redis_acl("celery", MARKER, "celery-admin", "admin-" + "x" * 20, legacy_default_user=True)
    default, client = lines[0].split(), lines[1].split()
    assert default[:3] == ["user", "default", "on"] and "+@all" not in default
    # The old URLs' login (no user: Redis's default user) with the clients' password and commands, no more.
    assert default[4] == client[3] and default[5:] == client[4:]


# --- TLS to the broker ---------------------------------------------------------------------------------------------
def test_a_tls_url_is_read_by_kombu_and_celery_s_backend_with_the_certificate_required(tmp_path):
    import ssl

    from celery import Celery
    from celery.backends.redis import RedisBackend
    from kombu import Connection

    ca = tmp_path / "broker ca.crt"  # a space in the path survives the query too
    url = cf.redis_url("broker1:6379/0", "celery", MARKER, str(ca))
    assert url.startswith("rediss://") and cf.broker_url_errors(url) == []
    conninfo = Connection(url)
    assert (conninfo.hostname, conninfo.port, conninfo.userid, conninfo.password) == ("broker1", 6379, "celery", MARKER)
    assert conninfo.ssl == {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": str(ca)}
    params = RedisBackend(app=Celery(set_as_current=False), url=cf.redis_url("broker1:6380/0", "celery", MARKER, str(ca))).connparams
    assert (params["ssl_cert_reqs"], params["ssl_ca_certs"], params["port"]) == (ssl.CERT_REQUIRED, str(ca), 6380)
    assert params["password"] == MARKER


def test_a_plain_url_has_no_tls_options():
    url = cf.redis_url("broker1:6379/1", "celery", "x" * 16)
    assert url == f"redis://celery:{'x' * 16}@broker1:6379/1" and cf.broker_url_errors(url) == []


@pytest.mark.parametrize("url, problem", [
    ("rediss://u:p@broker1:6379/0", "ssl_cert_reqs=required"),
    ("rediss://u:p@broker1:6379/0?ssl_cert_reqs=none&ssl_ca_certs=%2Fca", "got 'none'"),
    ("rediss://u:p@broker1:6379/0?ssl_cert_reqs=optional&ssl_ca_certs=%2Fca", "got 'optional'"),
    ("rediss://u:p@broker1:6379/0?ssl_cert_reqs=required", "ssl_ca_certs"),
    ("redis://u:p@broker1:6379/0?ssl_cert_reqs=required", "use rediss://"),
    ("amqp://u:p@broker1:5672//", "one of the schemes ['redis', 'rediss']"),
    ("redis://u:p@broker1:port/0", "not a valid URL"),
    ("rediss://u:p@broker1:6379/0?ssl_cert_reqs=Required&ssl_ca_certs=%2Fca", "got 'Required'"),
    ("rediss://u:p@broker1:6379/0?ssl_cert_reqs=required&ssl_ca_certs=%2Fca&ssl_check_hostname=false",
     "ssl_check_hostname"),
    ("redis://celery:s3cr/et@broker1:6379/0", "percent-encode"),
])
def test_broker_urls_that_would_not_check_the_broker_are_refused(url, problem):
    errors = cf.broker_url_errors(url, "celery_worker_broker_url")
    assert errors and all(error.startswith("celery_worker_broker_url") for error in errors)
    assert problem in " ".join(errors) and ":p@" not in " ".join(errors) and "s3cr" not in " ".join(errors)


def test_certificate_names_are_addresses_or_host_names_once_each():
    assert cf.tls_names(["broker1", "", None, "172.18.0.5", "127.0.0.1", "broker1", "::1", "redis.example.com"]) == [
        "DNS:broker1", "IP:172.18.0.5", "IP:127.0.0.1", "IP:::1", "DNS:redis.example.com"]


def test_a_kept_application_check_counts_only_for_the_same_request():
    report = {"tasks": ["acme.add"], "settings": {"task_acks_late": True}}
    kept = json.dumps({"request": "abc", "report": report})
    assert cf.app_check_cached(kept, "abc") == report
    assert cf.app_check_cached(kept, "abd") is None
    for text in (None, "", "{", '{"request": "abc"}', '{"request": "abc", "report": "x"}', "[1]"):
        assert cf.app_check_cached(text, "abc") is None, text


def test_units_off_are_those_systemd_does_not_hold_as_wanted():
    units = {"celery-worker@web.service": {"ActiveState": "active", "UnitFileState": "enabled"},
             "celery-worker@gpu-1.service": {"ActiveState": "inactive", "UnitFileState": "enabled"},
             "celery-worker@gpu-2.service": {"ActiveState": "active", "UnitFileState": "disabled"},
             "celery-beat.service": {"ActiveState": "failed", "UnitFileState": "enabled"},
             "gone.service": {"ActiveState": "inactive", "LoadState": "not-found"}}
    names = ["celery-worker@web.service", "celery-worker@gpu-1.service", "celery-worker@gpu-2.service",
             "celery-worker@new.service"]
    assert cf.units_off(units, names, active=True, enabled=True) == names[1:]
    assert cf.units_off(units, names, active=True) == ["celery-worker@gpu-1.service", "celery-worker@new.service"]
    assert cf.units_off(units, names, enabled=True) == ["celery-worker@gpu-2.service", "celery-worker@new.service"]
    assert cf.units_off(units, names, active=False, enabled=False) == names[:3]
    assert cf.units_off(units, ["gone.service", "celery-worker@new.service"], active=False, enabled=False) == []
    assert cf.units_off(units, ["celery-beat.service", "gone.service"], enabled=True) == ["gone.service"]
    assert cf.units_off(units, ["celery-beat.service"], active=True) == ["celery-beat.service"]
    assert cf.units_off(units, [], active=True) == []


def test_instances_cut_off_by_a_switch_of_tls_are_found_from_their_environment():
    schemes = {"celery-worker@web.service": "redis", "celery-worker@gpu-1.service": "rediss",
               "celery-worker@unset.service": "", "celery-worker@gone.service": None, "celery-beat.service": "redis"}
    assert cf.transport_switched(schemes, tls=True) == ["unset", "web"]
    assert cf.transport_switched(schemes, tls=False) == ["gpu-1"]
    assert cf.transport_switched({}, tls=True) == []


# --- The fleet's status ----------------------------------------------------------------------------------------------
def test_status_compares_the_inventory_with_what_the_fleet_says():
    hosts = {
        "web1": {"group": "web", "release": "1.0.0", "nodes": {"web-worker@web1": ["default", "priority"]},
                 "units": {"web-worker@web1": {"active": True, "memory": "104857600", "memory_max": "infinity"}}},
        "web2": {"group": "web", "release": "1.0.0", "nodes": {"web-worker@web2": ["default", "priority"]},
                 "units": {"web-worker@web2": {"active": True, "memory": "1048576", "memory_max": "2147483648"}}},
        "web3": {"group": "web", "release": "1.0.0", "nodes": {"web-worker@web3": ["default", "priority"]},
                 "units": {"web-worker@web3": {"active": True, "memory": "[not set]", "memory_max": "infinity"}}},
        "batch1": {"group": "batch", "release": None, "nodes": {"batch-worker@batch1": ["batch"]}, "units": {}},
    }
    observed = {
        "nodes_status": {
            "web-worker@web1": {"queues": ["default", "priority"], "active": 6, "concurrency": 8, "reserved": 2,
                                "processed": 100, "pool": "prefork", "uptime": 30},
            "web-worker@web2": {"queues": ["priority"], "active": 0, "concurrency": 8, "reserved": 0},
            "stray@elsewhere": {"queues": ["default"], "active": 1, "concurrency": 2},
            "web-worker-surge@web2": {"queues": ["default", "priority"], "active": 3, "concurrency": 8},
        },
        "queues_status": {"default": {"ready": 5, "by_priority": {"0": 2, "3": 0, "6": 0, "9": 3}, "unacked": 1,
                                      "consumers": ["stray@elsewhere", "web-worker@web1"]}},
    }
    status = cf.fleet_status(hosts, observed)
    nodes = {node["node"]: node for node in status["nodes"]}
    assert {name: node["state"] for name, node in nodes.items()} == {
        "web-worker@web1": "in service", "web-worker@web2": "drained", "web-worker@web3": "offline",
        "batch-worker@batch1": "missing", "stray@elsewhere": "unknown",
        "web-worker-surge@web2": "surge of web-worker@web2"}
    assert (nodes["web-worker-surge@web2"]["host"], nodes["web-worker-surge@web2"]["group"]) == ("web2", None)
    assert nodes["web-worker@web1"]["utilisation"] == 0.75 and nodes["web-worker@web1"]["memory"] == 104857600
    assert nodes["web-worker@web1"]["memory_max"] is None and nodes["web-worker@web2"]["memory_max"] == 2147483648
    assert nodes["web-worker@web3"]["utilisation"] is None and nodes["web-worker@web3"]["memory"] is None
    assert status["queues"] == [{"queue": "default", **observed["queues_status"]["default"]}]
    assert status["groups"] == [
        {"group": "batch", "nodes": 1, "in_service": 0, "guard_minimum": 0, "can_roll": False},
        {"group": "web", "nodes": 3, "in_service": 1, "guard_minimum": 2, "can_roll": False}]
    assert cf.fleet_status(hosts, observed, min_online=0)["groups"][1]["can_roll"] is True


def test_unit_memory_is_read_per_node_from_systemctl_show():
    show = ("Id=celery-worker@gpu-1.service\nActiveState=active\nMemoryCurrent=5242880\nMemoryMax=infinity\n\n"
            "Id=celery-worker@gpu-2.service\nActiveState=failed\nMemoryCurrent=[not set]\nMemoryMax=1073741824\n")
    assert cf.systemd_units_memory(show, ["gpu-worker-1@gpu1", "gpu-worker-2@gpu1", "gpu-worker-3@gpu1"],
                                   ["gpu-1", "gpu-2", "gpu-3"]) == {
        "gpu-worker-1@gpu1": {"active": True, "memory": "5242880", "memory_max": "infinity"},
        "gpu-worker-2@gpu1": {"active": False, "memory": "[not set]", "memory_max": "1073741824"},
        "gpu-worker-3@gpu1": {}}


def test_changed_instances_are_those_whose_own_files_or_the_template_unit_changed():
    names = ["gpu-1", "gpu-2"]
    config = "/etc/celery-fleet"
    assert cf.changed_instances([], names, config) == []
    assert cf.changed_instances(["/etc/celery-fleet/instances/gpu-2.env", "/usr/local/sbin/celery-fleet"], names,
                                config) == ["gpu-2"]
    assert cf.changed_instances(["/etc/systemd/system/celery-worker@gpu-1.service.d/10-celery-fleet.conf"], names,
                                config) == ["gpu-1"]
    assert cf.changed_instances(["/etc/systemd/system/celery-worker@.service"], names, config) == names
    # A name that is a prefix of another does not match the other's files.
    assert cf.changed_instances(["/etc/celery-fleet/instances/gpu-10.env"], ["gpu-1", "gpu-10"], config) == ["gpu-10"]


def test_services_to_restart_lists_every_service_and_the_changed_files_it_starts_with():
    services = [{"path": "/etc/m.json", "services": ["exporter", "flower"]},
                {"path": "/etc/default/prometheus", "services": ["prometheus"]},
                {"path": None, "services": ["exporter", "redis_exporter"]}]  # the CA, without TLS
    assert cf.services_to_restart([], services) == {"exporter": [], "flower": [], "prometheus": [],
                                                    "redis_exporter": []}
    owed = cf.services_to_restart(["/etc/m.json", "/elsewhere"], services)
    assert owed == {"exporter": ["/etc/m.json"], "flower": ["/etc/m.json"], "prometheus": [], "redis_exporter": []}


def test_changed_broker_instances_follow_their_own_configuration_and_drop_in():
    instances = [{"name": "queues", "unit": "redis-server.service", "config": "/etc/redis/redis.conf"},
                 {"name": "results", "unit": "redis-server@results.service", "config": "/etc/redis/redis-results.conf"}]
    dropin = "/etc/systemd/system/%s.d/10-celery-fleet.conf"
    assert cf.changed_broker_instances([], instances, dropin) == []
    assert cf.changed_broker_instances(["/etc/redis/redis-results.conf"], instances, dropin) == ["results"]
    assert cf.changed_broker_instances(["/etc/systemd/system/redis-server.service.d/10-celery-fleet.conf"],
                                       instances, dropin) == ["queues"]
