"""The rolls run first, on a fleet no fault has touched yet; then the faults."""

ORDER = ["test_rolling.py", "test_faults.py"]


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: ORDER.index(item.path.name) if item.path.name in ORDER else len(ORDER))
