"""One place for each default and each variable's documentation: a role's argument_specs and its
defaults/main.yml agree on every option and value, and the README's variable tables are exactly what
scripts/readme_variables.py generates from the specs (run it after changing a spec)."""

from pathlib import Path

import pytest
import yaml

import readme_variables

PROJECT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("role", ["celery_broker", "celery_worker", "celery_monitor"])
def test_argument_spec_and_defaults_agree(role):
    defaults = yaml.safe_load((PROJECT / "roles" / role / "defaults" / "main.yml").read_text())
    options = readme_variables.spec_options(role)
    assert set(options) == set(defaults), (set(options) ^ set(defaults))
    for name, option in options.items():
        assert option.get("description"), f"{role}: {name} has no description"
        assert "default" in option, f"{role}: {name} has no default in its argument spec"
        assert option["default"] == defaults[name], f"{role}: {name}: spec {option['default']!r} != {defaults[name]!r}"


@pytest.mark.parametrize("role", ["celery_broker", "celery_worker", "celery_monitor"])
def test_every_entry_point_has_the_same_spec(role):
    specs = yaml.safe_load((PROJECT / "roles" / role / "meta" / "argument_specs.yml").read_text())["argument_specs"]
    assert all(spec["options"] == specs["main"]["options"] for spec in specs.values())


def test_readme_variable_tables_are_generated_from_the_specs():
    text = readme_variables.README.read_text()
    assert readme_variables.render(text) == text, "README.md is stale: run python3 scripts/readme_variables.py"


def test_every_worker_setting_has_a_default_and_every_profile_key_is_a_setting():
    options = readme_variables.spec_options("celery_worker")
    settings = options["celery_worker_defaults"]["options"]
    assert set(options["celery_worker_defaults"]["default"]) == set(settings)
    for profile in options["celery_worker_profiles"]["default"].values():
        assert set(profile) <= set(settings)


def test_the_workers_log_in_as_the_broker_s_client_user_by_default():
    """Two roles, one Redis user: the worker's default is the broker's (a mismatch would lock the fleet out)."""
    broker = yaml.safe_load((PROJECT / "roles" / "celery_broker" / "defaults" / "main.yml").read_text())
    worker = yaml.safe_load((PROJECT / "roles" / "celery_worker" / "defaults" / "main.yml").read_text())
    assert worker["celery_worker_broker_user"] == broker["celery_broker_user"]


def test_the_monitor_logs_in_as_the_broker_s_users_by_default():
    broker = yaml.safe_load((PROJECT / "roles" / "celery_broker" / "defaults" / "main.yml").read_text())
    monitor = yaml.safe_load((PROJECT / "roles" / "celery_monitor" / "defaults" / "main.yml").read_text())
    assert monitor["celery_monitor_broker_user"] == broker["celery_broker_user"]
    assert monitor["celery_monitor_redis_user"] == broker["celery_broker_monitor_user"]


def test_the_readme_lists_every_metric_and_every_alert():
    import re

    import celery_fleet_exporter

    text = readme_variables.README.read_text()
    missing = [name for name in celery_fleet_exporter.METRICS if f"`{name}`" not in text]
    assert not missing, missing
    rules = (PROJECT / "roles" / "celery_monitor" / "templates" / "etc" / "prometheus"
             / "celery-fleet.rules.yml.j2").read_text()
    alerts = re.findall(r"- alert: (\w+)", rules)
    assert len(alerts) == 8 and not [alert for alert in alerts if f"| `{alert}` |" not in text], alerts
