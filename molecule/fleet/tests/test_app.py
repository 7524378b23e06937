"""Operators' own apps on the lab (last in this scenario: they replace the example app).

The acme fixture (tests/fixtures/apps/acme: distribution acme-tasks, module acme_tasks, tabulate from its
lock) sets nothing about delivery. Deployed with only the app variables changed, every node must run it
with the fleet's guarantees (the runtime applies them), and a variant that declares a task acks_late=False
must be refused by the check before any instance changes. Then acme is rolled under load (nothing lost, nothing
run twice), and a Django project is deployed to batch1 (a task that reads Django's settings runs there).
"""

import json
import shutil
import time

import fleetlab
import fleetload
from fleet import INVENTORY, PROJECT, control, lab_host, run_python

ACME = PROJECT / "tests" / "fixtures" / "apps" / "acme"
SHOP = PROJECT / "tests" / "fixtures" / "apps" / "django_shop"
WORKER_HOSTS = ["web1", "web2", "batch1", "gpu1"]
# The rolling scenario's load: tasks of 0-5 s at about 40% of the fleet's slots (web 16, batch 4, gpu 2).
ACME_RATES = {"default": 1.5, "priority": 1.0, "batch": 0.6, "ml": 0.3}


def acme_vars(source, release):
    # Each group's hosts in one batch: capacity under a roll is the rolling scenario's subject, not this one's.
    return json.dumps({"celery_worker_app_source": str(source), "celery_worker_app_package": "acme-tasks",
                       "celery_worker_app_module": "acme_tasks", "celery_worker_release": release,
                       "celery_worker_rolling_serial": ["100%"]})


def deployed_state():
    """What a refused deploy must leave as it was: where current points, the files instances start with,
    and the running instances' PIDs."""
    state = {}
    for name in WORKER_HOSTS:
        host = lab_host(name)
        state[name] = host.check_output(
            "readlink /opt/celery-fleet/current; sha256sum /etc/celery-fleet/celery.env "
            "/etc/celery-fleet/instances/*.env /etc/systemd/system/celery-worker@.service; "
            "systemctl show -p MainPID --value 'celery-worker@*.service' | sort")
    return state


def test_a_task_declared_acks_late_false_stops_the_deploy_before_any_instance_changes(tmp_path):
    source = shutil.copytree(ACME, tmp_path / "acme", ignore=shutil.ignore_patterns("build", "*.egg-info",
                                                                                     "__pycache__"))
    module = source / "src" / "acme_tasks" / "__init__.py"
    module.write_text(module.read_text() + "\n\n@app.task(acks_late=False)\ndef report_fast(numbers):\n"
                      "    return sum(numbers)\n")
    before = deployed_state()
    # One host is enough to show the check (each host runs it before its own switch); the others are watched.
    rc, output = fleetload.run_playbook("site.yml", "--extra-vars", acme_vars(source, "acme-3.1.0-refused"),
                                        "--limit", "web1", inventory=INVENTORY, timeout=600)
    assert rc != 0, output[-3000:]
    message = " ".join(output.split())
    assert ("acme_tasks: task acme_tasks.report_fast runs with acks_late=False (declared on the task or its base "
            "class, or bound while the app's configuration loaded: then set it True in the app's own settings "
            "too): a task whose worker dies or is killed while it runs is lost.") in message, output[-3000:]
    assert "TASK [celery_worker : Refuse an application that breaks a guarantee of the fleet]" in output
    assert "PLAY [Roll" not in output
    assert deployed_state() == before


def test_a_plain_app_deployed_runs_on_every_queue_with_the_fleet_s_guarantees():
    rc, output = fleetload.run_playbook("site.yml", "--extra-vars", acme_vars(ACME, "acme-3.1.0"),
                                        inventory=INVENTORY, timeout=900)
    assert rc == 0, output[-3000:]
    for name in WORKER_HOSTS:
        assert lab_host(name).check_output("readlink /opt/celery-fleet/current") == \
            "/opt/celery-fleet/releases/acme-3.1.0"
    web1 = lab_host("web1")
    env = web1.file("/etc/celery-fleet/celery.env").content_string
    line = next(ln for ln in env.splitlines() if ln.startswith("CELERY_BROKER_TRANSPORT_OPTIONS="))
    transport = json.loads(line.split("=", 1)[1].strip("'"))
    confs = control(web1, "conf")
    registered = control(web1, "registered")
    assert sorted(confs) == sorted(registered) and len(confs) == 5, sorted(confs)
    for node, conf in confs.items():
        assert conf["task_acks_late"] is True and conf["task_reject_on_worker_lost"] is True, node
        assert conf["broker_transport_options"] == transport, node
        assert "acme_tasks.table" in registered[node] and "celery_fleet_app.tasks.whoami" not in registered[node]
    # A round trip on every queue, sent by name through the runtime (the client gets the fleet's settings too).
    results = run_python(web1, """
import json
from celery_fleet_runtime import app
sent = {"default": ("acme_tasks.table", [[["a", 1]]]), "priority": ("acme_tasks.urgent_ping", ["x"]),
        "batch": ("acme_tasks.report_total", [[1, 2, 3]]), "ml": ("acme_tasks.score_mean", [[1, 3]])}
print(json.dumps({queue: app.send_task(name, args=args, queue=queue).get(timeout=30)
                  for queue, (name, args) in sent.items()}))
""")
    group_of = {"default": "web-worker", "priority": "web-worker", "batch": "batch-worker", "ml": "gpu-worker"}
    for queue, result in results.items():
        assert result["queue"] == queue and result["acks_late"] is True, result
        assert result["node"].startswith(group_of[queue]), result
    assert results["default"]["payload"] == "a  1" and results["batch"]["payload"] == 6


def test_a_rolling_restart_of_the_plain_app_under_load_loses_nothing():
    """The acme app, which sets nothing about delivery, rolled under load (its own ledger task, `settle`,
    sent to all four queues): every task ran once, no node stopped before it drained, none was killed."""
    fleet = fleetlab.Fleet(rates=ACME_RATES, task="acme_tasks.settle")
    before = fleet.units()
    since = time.time()
    rc, output, report = fleet.roll_under_load("rolling_restart.yml", "--extra-vars",
                                               '{"celery_worker_rolling_order": ["workers"]}')
    assert rc == 0, output[-4000:]
    fleetlab.assert_every_task_ran_exactly_once(fleet, report)
    fleetlab.assert_capacity_kept(report)
    fleetlab.assert_rolled(report, fleet.nodes)
    assert set(report["ran_per_release"]) == {"acme-3.1.0"}, report["ran_per_release"]
    assert all(record["acks_late"] is True for record in report["records"])
    after = fleet.units()
    assert all(after[name][unit] != pid for name, units in before.items() for unit, pid in units.items()), after
    fleetlab.assert_warm_stops_only(since, before)
    fleetlab.assert_drained_before_stop(since, before, report["records"])


def test_a_django_project_deployed_runs_a_task_that_reads_its_settings():
    """The django_shop fixture (`shop.celery:app` as Celery's Django guide writes it, Django from its lock), its
    settings environment through celery_worker_extra_environment, deployed to batch1 (the group its task routes
    to; the deploy rolls batch1 onto it): the task reads Django's settings and runs with the fleet's guarantees."""
    extra = {"celery_worker_app_source": str(SHOP), "celery_worker_app_package": "shop-project",
             "celery_worker_app_module": "shop.celery:app", "celery_worker_release": "shop-2.0.0",
             "celery_worker_extra_environment": {"DJANGO_SETTINGS_MODULE": "shop.settings", "SHOP_CURRENCY": "CHF"}}
    rc, output = fleetload.run_playbook("site.yml", "--extra-vars", json.dumps(extra), "--limit", "batch1",
                                        inventory=INVENTORY, timeout=900)
    assert rc == 0, output[-3000:]
    batch1 = lab_host("batch1")
    assert batch1.check_output("readlink /opt/celery-fleet/current") == "/opt/celery-fleet/releases/shop-2.0.0"
    result = run_python(batch1, """
import json
from celery_fleet_runtime import app
print(json.dumps(app.send_task("shop.orders.tasks.price", args=[1234]).get(timeout=30)))
""")
    assert result == {"price": "12.34 CHF", "host": "batch1", "acks_late": True, "django_settings": "shop.settings"}, (
        result)
    conf = control(batch1, "conf")["batch-worker@batch1"]
    assert conf["task_acks_late"] is True and conf["task_reject_on_worker_lost"] is True, conf
