"""verify runs twice on this scenario's one lab (molecule.yml): on the fresh lab, only the tests that need
nothing deployed (FRESH_LAB); on the deployed fleet, the others, then the worker image's pods
(test_kubernetes_pod.py) and operators' own apps (test_app.py) last, since they add nodes and replace the
example app the other tests use."""

import testinfra

FRESH_LAB = ["test_lab.py", "test_fresh_lab_dry_run.py"]
# The pods of the worker image join the fleet for a while (the monitor's tests count the inventory's nodes, and
# Flower remembers every node it saw): after those; operators' apps replace the example app: last.
LAST = ["test_kubernetes_pod.py", "test_app.py"]


def _deployed(config):
    web1 = testinfra.get_host("ansible://web1", ansible_inventory=config.getoption("ansible_inventory"))
    return web1.file("/etc/celery-fleet/celery.env").exists


def pytest_collection_modifyitems(config, items):
    deployed = _deployed(config)
    keep = [item for item in items if (item.path.name in FRESH_LAB) != deployed]
    dropped = [item for item in items if item not in keep]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    keep.sort(key=lambda item: LAST.index(item.path.name) + 1 if item.path.name in LAST else 0)
    items[:] = keep
