"""celery_fleet_runtime with operators' own apps (no mocks): the check's report on the fixture apps, judged by
the role's filter, and real Celery workers started through the runtime on a loopback Redis.

Fixtures (tests/fixtures/apps): acme (a plain app of its own, one extra dependency) and django_shop (a Django
project whose Celery app reads Django settings). Neither sets anything about delivery: the fleet does.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from celery import Celery

import celery_fleet as cf
import localredis

ROOT = Path(__file__).resolve().parents[2]
RUNTIME = ROOT / "roles" / "celery_worker" / "files"
FIXTURES = ROOT / "tests" / "fixtures" / "apps"
# The lab's groups (inventories/lab) and a fleet transport option set as the role computes them.
GROUP_QUEUES = {"batch": ["batch"], "gpu": ["ml"], "web": ["default", "priority"]}
TRANSPORT = cf.transport_options(360, 0, 600, 30)

assert shutil.which("redis-server"), "redis-server is needed: run ./fleet setup"


def fleet_env(source, app, **extra):
    """The environment a worker gets from celery.env: the runtime and the app on the path, fleet settings."""
    return dict(os.environ, PYTHONPATH=f"{RUNTIME}{os.pathsep}{source}", CELERY_FLEET_APP=app,
                CELERY_BROKER_TRANSPORT_OPTIONS=json.dumps(TRANSPORT), CELERY_TASK_ACKS_LATE="true",
                CELERY_TASK_REJECT_ON_WORKER_LOST="true", CELERY_RESULT_EXPIRES="600", **extra)


def check(source, app, environment=None):
    """`python -m celery_fleet_runtime check` as the role runs it (request on stdin: the app, the fleet's
    settings but no broker URL, the operator's extra environment); the parsed report."""
    request_env = {name: value for name, value in fleet_env(source, app).items()
                   if name.startswith("CELERY_") and name not in os.environ}
    result = subprocess.run(
        [sys.executable, "-P", "-m", "celery_fleet_runtime", "check"],
        input=json.dumps({"app": app, "environment": {**request_env, **(environment or {})}}),
        capture_output=True, text=True,
        env=dict(os.environ, PYTHONPATH=f"{RUNTIME}{os.pathsep}{source}"), timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def copy_of(tmp_path, name):
    return shutil.copytree(FIXTURES / name / "src", tmp_path / name / "src")


def test_a_plain_app_gets_every_guarantee_and_its_routes_match_the_groups():
    report = check(FIXTURES / "acme" / "src", "acme_tasks")
    assert report["main"] == "acme"
    assert {name: (task["acks_late"], task["reject_on_worker_lost"], task["queue"])
            for name, task in report["tasks"].items()} == {
        "acme_tasks.table": (True, True, "default"), "acme_tasks.urgent_ping": (True, True, "priority"),
        "acme_tasks.report_total": (True, True, "batch"), "acme_tasks.score_mean": (True, True, "ml"),
        "acme_tasks.settle": (True, True, "default")}
    assert cf.app_findings(report, GROUP_QUEUES, TRANSPORT) == {"errors": [], "warnings": []}


def test_a_task_declared_acks_late_false_is_an_error_naming_it(tmp_path):
    source = copy_of(tmp_path, "acme")
    module = source / "acme_tasks" / "__init__.py"
    module.write_text(module.read_text() + "\n\n@app.task(acks_late=False)\ndef report_fast(numbers):\n"
                      "    return sum(numbers)\n")
    findings = cf.app_findings(check(source, "acme_tasks:app"), GROUP_QUEUES, TRANSPORT, app="acme_tasks:app")
    assert len(findings["errors"]) == 1
    assert findings["errors"][0].startswith("acme_tasks:app: task acme_tasks.report_fast runs with acks_late=False "
                                            "(declared on the task or its base class, or bound while")


def test_an_app_finalized_at_import_with_its_own_acks_late_false_is_refused(tmp_path):
    source = copy_of(tmp_path, "acme")
    module = source / "acme_tasks" / "__init__.py"
    module.write_text(module.read_text() + "\n\napp.conf.task_acks_late = False\napp.finalize()\n")
    findings = cf.app_findings(check(source, "acme_tasks"), GROUP_QUEUES, TRANSPORT)
    assert len(findings["errors"]) == 10  # acks_late and reject_on_worker_lost (Celery's None) for each of 5 tasks
    assert all("the app was finalized when imported" in error for error in findings["errors"])


def test_an_app_level_visibility_timeout_below_the_fleet_s_is_an_error_and_odd_routes_warnings(tmp_path):
    source = copy_of(tmp_path, "acme")
    module = source / "acme_tasks" / "__init__.py"
    module.write_text(module.read_text() + "\n\napp.conf.broker_transport_options = {'visibility_timeout': 600, "
                      "'global_keyprefix': 'acme:'}\napp.conf.task_routes['acme_tasks.score_*'] = "
                      "{'queue': 'gpu-large'}\n")
    report = check(source, "acme_tasks")
    assert report["app_visibility_timeout"] == 600 and report["visibility_timeout"] == 3600
    findings = cf.app_findings(report, GROUP_QUEUES, TRANSPORT, app="acme_tasks")
    assert findings["errors"] == [
        "acme_tasks: broker_transport_options['visibility_timeout'] is 600 s in the app's own settings, below the "
        "fleet's 3600 s: any client of the app outside the fleet puts back tasks still running longer than that, "
        "and a second worker runs them. Remove it or set it to at least 3600."]
    assert findings["warnings"] == [
        "acme_tasks: queue gpu-large (task acme_tasks.score_mean) is consumed by no group: its tasks would wait "
        "there. Groups consume: batch: batch; gpu: ml; web: default, priority",
        "acme_tasks: group gpu consumes ml, where none of the app's tasks is routed (tasks sent by name with an "
        "explicit queue still arrive)."]


def test_tasks_bound_while_the_app_configures_and_prints_at_import_still_get_the_guarantees(tmp_path):
    """Celery's documented add_periodic_task in on_after_configure binds the task while the configuration
    loads; an app that prints at import must not break the report."""
    source = copy_of(tmp_path, "acme")
    module = source / "acme_tasks" / "__init__.py"
    module.write_text(module.read_text() + "\n\nprint('hello from acme')\n\n@app.on_after_configure.connect\n"
                      "def _periodic(sender, **kwargs):\n    sender.add_periodic_task(10.0, table.s([[1]]))\n")
    report = check(source, "acme_tasks")
    assert report["tasks"]["acme_tasks.table"]["acks_late"] is True
    assert cf.app_findings(report, GROUP_QUEUES, TRANSPORT)["errors"] == []


def test_an_app_that_cannot_be_loaded_fails_the_check_with_its_error():
    result = subprocess.run([sys.executable, "-P", "-m", "celery_fleet_runtime", "check"],
                            input=json.dumps({"app": "no_such_app:app"}), capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=str(RUNTIME)), timeout=60, check=False)
    assert result.returncode != 0 and "No module named 'no_such_app'" in result.stderr


def test_django_project_check_sees_autodiscovered_tasks_and_its_routes():
    report = check(FIXTURES / "django_shop" / "src", "shop.celery:app", {"SHOP_CURRENCY": "CHF"})
    assert report["tasks"] == {"shop.orders.tasks.price": {"acks_late": True, "reject_on_worker_lost": True,
                                                           "queue": "batch"}}


@pytest.fixture(scope="module")
def broker_url(tmp_path_factory):
    with localredis.redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


def run_worker(env, node, queues):
    return subprocess.Popen(
        [sys.executable, "-P", "-m", "celery", "--app", "celery_fleet_runtime:app", "worker", "--pool=threads",
         "--concurrency=2", f"--hostname={node}", f"--queues={queues}", "--without-mingle", "--without-gossip",
         "--loglevel=WARNING"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.fixture
def client(broker_url):
    app = Celery("test-client", broker=broker_url, backend=broker_url.replace("/0", "/1"))
    yield app
    app.close()


def wait_for(client, node, process):
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read()
        replies = client.control.ping(destination=[node], timeout=0.5)
        if replies:
            return
    pytest.fail(f"{node} never answered ping")


def test_a_plain_app_s_worker_started_through_the_runtime_runs_with_the_fleet_s_settings(broker_url, client):
    node = "acme-worker@localhost"
    env = fleet_env(FIXTURES / "acme" / "src", "acme_tasks", CELERY_BROKER_URL=broker_url,
                    CELERY_RESULT_BACKEND=broker_url.replace("/0", "/1"))
    worker = run_worker(env, node, "default,priority,batch,ml")
    try:
        wait_for(client, node, worker)
        conf = client.control.inspect(destination=[node], timeout=2).conf()[node]
        assert conf["task_acks_late"] is True and conf["task_reject_on_worker_lost"] is True
        assert conf["broker_transport_options"] == TRANSPORT
        sent = {"acme_tasks.table": ([[["a", 1]]], "default"), "acme_tasks.urgent_ping": (["x"], "priority"),
                "acme_tasks.report_total": ([[1, 2, 3]], "batch"), "acme_tasks.score_mean": ([[1, 3]], "ml")}
        for name, (args, queue) in sent.items():
            result = client.send_task(name, args=args, queue=queue).get(timeout=20)
            assert result["acks_late"] is True and result["queue"] == queue and result["node"] == node, name
    finally:
        worker.terminate()
        worker.wait(30)


def test_a_django_task_runs_with_the_project_s_settings_and_the_fleet_s_guarantees(broker_url, client):
    node = "shop-worker@localhost"
    env = fleet_env(FIXTURES / "django_shop" / "src", "shop.celery:app", CELERY_BROKER_URL=broker_url,
                    CELERY_RESULT_BACKEND=broker_url.replace("/0", "/1"), SHOP_CURRENCY="CHF")
    worker = run_worker(env, node, "batch")
    try:
        wait_for(client, node, worker)
        result = client.send_task("shop.orders.tasks.price", args=[1234], queue="batch").get(timeout=20)
        assert result["price"] == "12.34 CHF" and result["django_settings"] == "shop.settings"
        assert result["acks_late"] is True
    finally:
        worker.terminate()
        worker.wait(30)


def test_beat_through_the_runtime_restarted_with_sigterm_sends_no_tick_twice(broker_url, tmp_path):
    """The example app's tick every 1 s from a real celery beat, stopped with SIGTERM (as systemd stops it)
    and started again on the same schedule file: no tick sent twice, the one due during the stop sent once
    at start."""
    import redis

    env = fleet_env(ROOT / "app" / "src", "celery_fleet_app", CELERY_BROKER_URL=broker_url,
                    CELERY_FLEET_APP_TICK_SECONDS="1")
    command = [sys.executable, "-P", "-m", "celery", "--app", "celery_fleet_runtime:app", "beat", "--schedule",
               str(tmp_path / "celerybeat-schedule"), "--loglevel", "WARNING"]
    for _ in range(2):
        beat = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(4.5)
        assert beat.poll() is None, beat.stderr.read()
        beat.terminate()
        assert beat.wait(15) == 0, beat.stderr.read()
        time.sleep(1.5)
    sent = [json.loads(r) for r in redis.Redis.from_url(broker_url).lrange("beat:ticks:sent", 0, -1)]
    assert len({tick["pid"] for tick in sent}) == 2
    times = sorted(tick["at"] for tick in sent)
    gaps = [later - earlier for earlier, later in zip(times, times[1:])]
    assert min(gaps) > 0.5, gaps  # none twice
    assert max(gaps) < 4.0, gaps  # 1.5 s stopped plus beat's start: the tick due meanwhile came at start
