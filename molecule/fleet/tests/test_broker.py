"""The Redis broker: authenticated, durable, never evicting, listening where the workers connect."""

testinfra_hosts = ["ansible://broker1"]


def config(host, key, password):
    out = host.check_output(f"REDISCLI_AUTH='{password}' redis-cli --no-auth-warning config get {key}")
    return out.splitlines()[1]


def password(host):
    return host.ansible.get_variables()["vault_celery_broker_password"]


def test_redis_is_running_and_enabled(host):
    service = host.service("redis-server")
    assert service.is_running and service.is_enabled


def test_unauthenticated_clients_are_refused(host):
    out = host.run("redis-cli ping")
    assert "NOAUTH" in out.stdout + out.stderr


def test_aof_everysec_and_noeviction(host):
    secret = password(host)
    assert config(host, "appendonly", secret) == "yes"
    assert config(host, "appendfsync", secret) == "everysec"
    assert config(host, "maxmemory-policy", secret) == "noeviction"


def test_listens_on_the_address_workers_use(host):
    address = host.check_output("hostname -I").split()[0]
    out = host.check_output(f"REDISCLI_AUTH='{password(host)}' redis-cli --no-auth-warning -h {address} ping")
    assert out == "PONG"


def test_config_holds_the_password_and_is_private(host):
    conf = host.file("/etc/redis/redis.conf")
    assert conf.mode == 0o640 and conf.user == "redis"
