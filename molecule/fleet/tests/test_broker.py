"""The Redis broker: ACL users (the default user off, the fleet's clients limited to what Celery needs),
durable, never evicting, listening where the workers connect; its configuration read-only to Redis."""

from fleet import lab_host, redis_cli

testinfra_hosts = ["ansible://broker1"]


def config(host, key):
    return redis_cli(host, "config", "get", key).stdout.splitlines()[1]


def test_redis_is_running_and_enabled(host):
    service = host.service("redis-server")
    assert service.is_running and service.is_enabled


def test_unauthenticated_clients_and_the_default_user_are_refused(host):
    out = host.run("redis-cli ping")
    assert "NOAUTH" in out.stdout + out.stderr
    password = host.ansible.get_variables()["vault_celery_broker_password"]
    out = redis_cli(host, "ping", user="default", password=password)
    assert "WRONGPASS" in out.stdout + out.stderr


def test_aof_everysec_and_noeviction(host):
    assert config(host, "appendonly") == "yes"
    assert config(host, "appendfsync") == "everysec"
    assert config(host, "maxmemory-policy") == "noeviction"


def test_listens_on_the_address_workers_use(host):
    address = host.check_output("hostname -I").split()[0]
    assert redis_cli(host, "ping", address=address).stdout.strip() == "PONG"


def test_configuration_and_users_are_root_s_and_hold_no_password(host):
    secrets = host.ansible.get_variables()
    for path in ("/etc/redis/redis.conf", "/etc/redis/users.acl"):
        conf = host.file(path)
        assert (conf.mode, conf.user, conf.group) == (0o640, "root", "redis"), path
        text = conf.content_string
        assert secrets["vault_celery_broker_password"] not in text
        assert secrets["vault_celery_broker_admin_password"] not in text
    assert "requirepass" not in host.file("/etc/redis/redis.conf").content_string
    users = host.file("/etc/redis/users.acl").content_string.splitlines()
    assert users[0].startswith("user default off") and any(line.startswith("user celery on #") for line in users)


def test_redis_cannot_write_its_configuration(host):
    """Even the admin's CONFIG REWRITE fails: the unit's drop-in takes /etc/redis off Redis's writable paths."""
    out = redis_cli(host, "config", "rewrite")
    assert "Read-only file system" in out.stdout + out.stderr, out.stdout
    assert "ReadWritePaths=-/var/lib/redis -/var/log/redis" in host.file(
        "/etc/systemd/system/redis-server.service.d/10-celery-fleet.conf").content_string


def test_the_workers_user_is_refused_what_would_wipe_copy_or_reconfigure_redis():
    """As user celery on a worker host, with the credentials celery.env gives it."""
    web1 = lab_host("web1")
    env = web1.file("/etc/celery-fleet/celery.env").content_string
    url = next(line.split("=", 1)[1].strip('"') for line in env.splitlines() if line.startswith("CELERY_BROKER_URL="))
    script = ("import os, sys, redis\n"
              "client = redis.Redis.from_url(os.environ['URL'])\n"
              "for command in sys.argv[1:]:\n"
              "    try:\n"
              "        client.execute_command(*command.split())\n"
              "        print(command, 'ALLOWED')\n"
              "    except redis.exceptions.NoPermissionError:\n"
              "        print(command, 'NOPERM')\n"
              "print('PING', client.ping())\n")
    commands = ["FLUSHALL", "FLUSHDB", "CONFIG GET *", "REPLICAOF 127.0.0.1 1", "MONITOR", "ACL LIST", "KEYS *",
                "SHUTDOWN", "SAVE"]
    out = web1.run(f"cd /tmp && URL='{url}' runuser -u celery -- /opt/celery-fleet/current/venv/bin/python -c "
                   f"\"{script}\" " + " ".join(f"'{command}'" for command in commands))
    assert out.rc == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[-1] == "PING True", out.stdout
    assert lines[:-1] == [f"{command} NOPERM" for command in commands], out.stdout
