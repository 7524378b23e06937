"""The source digest that makes release ids immutable (roles/celery_worker/files/build_wheelhouse.py)."""

import shutil
from pathlib import Path

import pytest

import build_wheelhouse

APP = Path(__file__).resolve().parents[2] / "app"


def copy_app(tmp_path, name="app"):
    return shutil.copytree(APP, tmp_path / name, ignore=shutil.ignore_patterns(*build_wheelhouse.IGNORED))


def digest(source):
    return build_wheelhouse.source_digest(str(source), str(Path(source) / "requirements.lock"))


def test_a_copy_has_the_same_digest_wherever_it_lies(tmp_path):
    assert digest(copy_app(tmp_path, "one")) == digest(copy_app(tmp_path, "two"))


def test_build_output_and_bytecode_do_not_count(tmp_path):
    source = copy_app(tmp_path)
    before = digest(source)
    (source / "build" / "lib").mkdir(parents=True)
    (source / "build" / "lib" / "x.py").write_text("x = 1\n")
    (source / "src" / "celery_fleet_app" / "__pycache__").mkdir(exist_ok=True)
    (source / "src" / "celery_fleet_app" / "__pycache__" / "tasks.cpython-311.pyc").write_bytes(b"\0")
    (source / "src" / "celery_fleet_app.egg-info").mkdir()
    assert digest(source) == before


def test_a_changed_source_file_a_new_file_or_a_changed_lock_changes_it(tmp_path):
    source = copy_app(tmp_path)
    seen = {digest(source)}
    tasks = source / "src" / "celery_fleet_app" / "tasks.py"
    tasks.write_text(tasks.read_text() + "\n# changed\n")
    seen.add(digest(source))
    (source / "src" / "celery_fleet_app" / "extra.py").write_text("")
    seen.add(digest(source))
    lock = source / "requirements.lock"
    lock.write_text(lock.read_text().replace("celery==5.7.0", "celery==5.6.0"))
    seen.add(digest(source))
    assert len(seen) == 4


def test_local_wheels_offered_by_find_links_count_in_the_digest(tmp_path):
    source = copy_app(tmp_path)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    lock = str(source / "requirements.lock")
    empty = build_wheelhouse.source_digest(str(source), lock, [str(wheels)])
    assert empty == digest(source)
    (wheels / "acme_common-1.0-py3-none-any.whl").write_bytes(b"one")
    (wheels / "notes.txt").write_text("not a wheel")
    one = build_wheelhouse.source_digest(str(source), lock, [str(wheels)])
    (wheels / "acme_common-1.0-py3-none-any.whl").write_bytes(b"two")  # rebuilt under the same version
    assert len({empty, one, build_wheelhouse.source_digest(str(source), lock, [str(wheels)])}) == 3


def test_a_find_links_directory_that_does_not_exist_is_named(tmp_path):
    source = copy_app(tmp_path)
    with pytest.raises(SystemExit, match="celery_worker_wheelhouse_find_links: /nowhere is not a directory"):
        build_wheelhouse.source_digest(str(source), str(source / "requirements.lock"), ["/nowhere"])


# --- The lookup the roles compute it with (plugins/lookup): the builder's own function, no module run -----------

BUILDER = Path(build_wheelhouse.__file__)


def lookup(source, **options):
    """The plugin as a play loads it (its documented options), run as lookup('celery_fleet_source_digest', ...)."""
    from ansible.plugins.loader import lookup_loader

    lookup_loader.add_directory(str(Path(__file__).resolve().parents[2] / "plugins" / "lookup"))
    plugin = lookup_loader.get("celery_fleet_source_digest")
    return plugin.run([str(source)], variables={}, builder=str(BUILDER), **options)


def test_the_lookup_gives_the_builders_digest_as_its_digest_flag_prints_it(tmp_path):
    import subprocess
    import sys

    source = copy_app(tmp_path)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "extra-1.0-py3-none-any.whl").write_bytes(b"wheel")
    printed = subprocess.run([sys.executable, str(BUILDER), "--app-source", str(source), "--lock",
                              str(source / "requirements.lock"), "--digest", f"--find-links={wheels}"],
                             capture_output=True, text=True, check=True).stdout.strip()
    assert lookup(source, lock=str(source / "requirements.lock"), find_links=[str(wheels)]) == [printed]
    assert lookup(source, lock=str(source / "requirements.lock")) == [digest(source)] != [printed]


def test_the_lookup_names_what_it_cannot_read(tmp_path):
    from ansible.errors import AnsibleLookupError

    source = copy_app(tmp_path)
    with pytest.raises(AnsibleLookupError, match="celery_worker_wheelhouse_find_links: .*missing is not a directory"):
        lookup(source, lock=str(source / "requirements.lock"), find_links=[str(tmp_path / "missing")])
    with pytest.raises(AnsibleLookupError, match="No such file"):
        lookup(source, lock=str(tmp_path / "no.lock"))
