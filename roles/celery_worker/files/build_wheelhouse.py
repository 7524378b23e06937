#!/usr/bin/env python3
"""Build a release's wheelhouse on the controller: the application wheel plus every pinned dependency.

Writes <output>.tar atomically: a wheelhouse/ folder with the wheels and requirements.lock.
Runs with the controller's Python; downloads binary wheels for the hosts' platform, not the controller's.

Package sources, for projects that do not live on PyPI alone: --find-links DIR (repeatable) adds local
wheels (their names and contents count in the digest), and --index-from-stdin reads
{"index_url": "...", "extra_index_urls": [...]} as JSON on stdin, so that an index URL with credentials never
appears on a command line; pip gets them through its environment (PIP_INDEX_URL, PIP_EXTRA_INDEX_URL) and
redacts passwords in its own messages. The index options apply to the application's build dependencies too.
"""

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile


def pinned_requirements(lock_path):
    """The name==version lines of a lock file, without comments or environment markers."""
    pins = []
    with open(lock_path, encoding="utf-8") as lock:
        for line in lock:
            requirement = line.split("#", 1)[0].split(";", 1)[0].strip()
            if requirement:
                if "==" not in requirement:
                    raise SystemExit(f"{lock_path}: {requirement!r} is not pinned with ==")
                pins.append(requirement)
    return pins


IGNORED = ("build", "*.egg-info", "__pycache__", "*.pyc")


def local_wheels(find_links):
    """[(name, path)] of the wheels in the --find-links directories, sorted; an error for a missing one."""
    wheels = []
    for directory in find_links or []:
        if not os.path.isdir(directory):
            raise SystemExit(f"celery_worker_wheelhouse_find_links: {directory} is not a directory on the controller")
        wheels += [(name, os.path.join(directory, name)) for name in os.listdir(directory) if name.endswith(".whl")]
    return sorted(wheels)


def source_digest(app_source, lock_path, find_links=None):
    """sha256 of the lock, of every source file (relative path and content), build output left out, and of
    every local wheel (name and content) that --find-links offers.

    A release id is immutable: the same id built from other sources is refused on hosts that have it.
    """
    digest = hashlib.sha256()
    for name, path in local_wheels(find_links):
        with open(path, "rb") as handle:
            digest.update(b"wheel\0" + name.encode() + b"\0" + hashlib.sha256(handle.read()).digest())
    ignore = shutil.ignore_patterns(*IGNORED)
    for top, dirs, files in os.walk(app_source):
        dirs[:] = sorted(set(dirs) - ignore(top, dirs))
        for name in sorted(set(files) - ignore(top, files)):
            path = os.path.join(top, name)
            digest.update(os.path.relpath(path, app_source).encode() + b"\0")
            with open(path, "rb") as handle:
                digest.update(hashlib.sha256(handle.read()).digest())
    with open(lock_path, "rb") as lock:
        digest.update(b"lock\0" + hashlib.sha256(lock.read()).digest())
    return digest.hexdigest()


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--app-source", required=True)
    parser.add_argument("--lock", required=True)
    parser.add_argument("--digest", action="store_true", help="only print the sources' digest")
    parser.add_argument("--python-version", help="of the hosts, e.g. 3.11")
    parser.add_argument("--platform", action="append", help="pip --platform tag, repeatable")
    parser.add_argument("--output", help="path of the .tar to write")
    parser.add_argument("--find-links", action="append", default=[], help="directory of local wheels, repeatable")
    parser.add_argument("--index-from-stdin", action="store_true",
                        help='read {"index_url": ..., "extra_index_urls": [...]} as JSON on stdin')
    args = parser.parse_args()
    digest = source_digest(args.app_source, args.lock, args.find_links)
    if args.digest:
        print(digest)
        return
    if not (args.python_version and args.platform and args.output):
        parser.error("--python-version, --platform and --output are required to build")

    with tempfile.TemporaryDirectory(prefix="celery-fleet-wheelhouse-") as work:
        wheelhouse = os.path.join(work, "wheelhouse")
        os.mkdir(wheelhouse)
        pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
        local = [option for directory in args.find_links for option in ("--find-links", directory)]
        environment = dict(os.environ)
        if args.index_from_stdin:
            indexes = json.load(sys.stdin)
            if indexes.get("index_url"):
                environment["PIP_INDEX_URL"] = indexes["index_url"]
            if indexes.get("extra_index_urls"):
                environment["PIP_EXTRA_INDEX_URL"] = " ".join(indexes["extra_index_urls"])
        # Build from a copy: setuptools writes build/ and *.egg-info next to the sources it builds.
        source = shutil.copytree(args.app_source, os.path.join(work, "app-source"),
                                 ignore=shutil.ignore_patterns(*IGNORED))
        subprocess.run(pip + ["wheel", *local, "--quiet", "--no-deps", "--wheel-dir", wheelhouse, source], check=True,
                       env=environment)
        platforms = [option for tag in args.platform for option in ("--platform", tag)]
        # pip judges environment markers by the controller's interpreter, not the hosts': fetch every
        # pinned wheel whatever its marker (the lock is complete, hence --no-deps); the hosts' pip
        # evaluates the markers when it installs.
        subprocess.run(pip + ["download", *local, "--quiet", "--no-deps", "--only-binary=:all:",
                              "--implementation", "cp",
                              "--python-version", args.python_version, *platforms,
                              "--dest", wheelhouse, *pinned_requirements(args.lock)], check=True, env=environment)
        shutil.copy(args.lock, os.path.join(wheelhouse, "requirements.lock"))
        with open(os.path.join(wheelhouse, "SOURCE_DIGEST"), "w", encoding="utf-8") as marker:
            marker.write(digest + "\n")
        partial = args.output + ".partial"
        with tarfile.open(partial, "w") as archive:
            archive.add(wheelhouse, arcname="wheelhouse")
        os.replace(partial, args.output)
    print(args.output)


if __name__ == "__main__":
    main()
