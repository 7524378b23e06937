#!/usr/bin/python
"""Read what the roles need to know of a host (units, links, marks, listings, accounts, packages) in one run."""

from __future__ import annotations

DOCUMENTATION = r"""
module: celery_fleet_host_state
short_description: Read a host's units, paths, small files, listings, accounts and packages in one module run
description:
  - Read-only. Replaces a stat, slurp, find, getent or systemctl show task each. A module run costs a Python
    start and the import of Ansible's module code (about 0.3 s of CPU on a lab host), so a no-op deploy is mostly
    the count of module runs. Every section is optional; what is not asked is not read.
  - Never returns a secret. Of a running process's environment it returns only the scheme of one URL variable.
options:
  units:
    description: Unit names or patterns for C(systemctl show) (a pattern matches loaded units only).
    type: list
    elements: str
    default: []
  url_scheme_of:
    description: >-
      An environment variable of each active unit's main process whose URL scheme to return (for example
      C(CELERY_BROKER_URL)); its value never leaves the host.
    type: str
  paths:
    description: Paths to describe, never followed (lstat); a link's target as C(lnk_source).
    type: list
    elements: path
    default: []
  read:
    description: Small text files to read whole (at most 1 MiB each); a missing, larger or unreadable file is null.
    type: list
    elements: path
    default: []
  find:
    description: >-
      Listings, each like Ansible's find (paths, glob patterns on the base name, recurse, file_type; hidden names,
      those starting with a dot, left out as find leaves them out).
    type: list
    elements: dict
    default: []
    suboptions:
      paths: {type: list, elements: path, required: true, description: Directories to list.}
      patterns: {type: list, elements: str, default: ["*"], description: Glob patterns on the base name.}
      recurse: {type: bool, default: false, description: Descend into directories.}
      file_type: {type: str, default: file, choices: [file, directory], description: What to list.}
  user:
    description: A user to describe (exists, uid, gid, primary group name, home, shell).
    type: str
  group:
    description: A group to describe (exists, gid).
    type: str
  packages:
    description: Debian packages whose installed version to return (null when not installed).
    type: list
    elements: str
    default: []
  match:
    description: >-
      Files to search line by line, as C(grep --only-matching --extended-regexp '^(...)') would: for each line, the
      part each pattern matches at its start (Python regular expressions), in file order. Only those parts leave the
      host, never the rest of the file (a configuration someone else wrote may hold a password). A missing or
      unreadable file gives null.
    type: list
    elements: dict
    default: []
    suboptions:
      path: {type: path, required: true, description: The file.}
      patterns: {type: list, elements: str, required: true, description: Patterns matched at the start of a line.}
  connect:
    description: >-
      TCP endpoints to try to connect to from the host (at most I(connect_timeout) seconds each): whether each
      accepted a connection, as C(connectable) keyed C(host:port). Nothing is sent.
    type: list
    elements: dict
    default: []
    suboptions:
      host: {type: str, required: true, description: Host name or address.}
      port: {type: int, required: true, description: TCP port.}
  connect_timeout:
    description: Seconds each I(connect) attempt may take.
    type: float
    default: 3
author: celery-fleet
"""

RETURN = r"""
units_show:
  description: >-
    C(systemctl show --timestamp=us+utc) of I(units) with Id, LoadState, ActiveState, ActiveEnterTimestamp, MainPID,
    MemoryCurrent, MemoryMax and UnitFileState: the text the role's filters parse.
  type: str
  returned: always
units:
  description: The same, parsed (unit id to its properties).
  type: dict
  returned: always
url_schemes:
  description: Unit id to the scheme of I(url_scheme_of) in its main process's environment (null when unreadable).
  type: dict
  returned: always
paths:
  description: Path to exists, isdir, islnk, lnk_source, mtime, mode, uid, gid.
  type: dict
  returned: always
contents:
  description: Path to its text, or null.
  type: dict
  returned: always
found:
  description: One list per I(find) entry, of path and mtime, like Ansible's find's files.
  type: list
  returned: always
accounts:
  description: user and group as asked.
  type: dict
  returned: always
packages:
  description: Package name to installed version, or null.
  type: dict
  returned: always
memory_total:
  description: The host's memory in bytes (MemTotal of /proc/meminfo), or null where it cannot be read.
  type: int
  returned: always
matches:
  description: Path to the parts its lines matched (see I(match)), or null for a file that cannot be read.
  type: dict
  returned: always
connectable:
  description: C(host:port) to whether it accepted a TCP connection within I(connect_timeout).
  type: dict
  returned: always
"""

import fnmatch
import grp
import os
import pwd
import re
import socket
import stat

from ansible.module_utils.basic import AnsibleModule

SHOW_PROPERTIES = ["Id", "LoadState", "ActiveState", "ActiveEnterTimestamp", "MainPID", "MemoryCurrent", "MemoryMax",
                   "UnitFileState"]
READ_LIMIT = 1024 * 1024


def _describe(path):
    try:
        info = os.lstat(path)
    except OSError:
        return {"exists": False}
    islnk = stat.S_ISLNK(info.st_mode)
    return {"exists": True, "isdir": stat.S_ISDIR(info.st_mode), "islnk": islnk,
            "lnk_source": os.path.realpath(path) if islnk else None, "mtime": info.st_mtime,
            "mode": f"{stat.S_IMODE(info.st_mode):04o}", "uid": info.st_uid, "gid": info.st_gid}


def _read(path):
    try:
        with open(path, "rb") as handle:
            data = handle.read(READ_LIMIT + 1)
    except OSError:
        return None
    # Never a truncated text: a caller would parse half a file.
    return None if len(data) > READ_LIMIT else data.decode("utf-8", "replace")


def _find(spec):
    wanted = stat.S_ISDIR if spec["file_type"] == "directory" else stat.S_ISREG
    found = []
    for top in spec["paths"]:
        for root, dirs, files in os.walk(top):
            dirs[:] = [name for name in dirs if not name.startswith(".")]
            for name in sorted(dirs + [name for name in files if not name.startswith(".")]):
                path = os.path.join(root, name)
                try:
                    info = os.lstat(path)
                except OSError:
                    continue
                if wanted(info.st_mode) and any(fnmatch.fnmatch(name, pattern) for pattern in spec["patterns"]):
                    found.append({"path": path, "mtime": info.st_mtime})
            if not spec["recurse"]:
                break
    return found


def _parse_show(text):
    units = {}
    for block in text.strip().split("\n\n"):
        fields = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
        if fields.get("Id"):
            units[fields["Id"]] = fields
    return units


def _url_scheme(pid, variable):
    try:
        with open(f"/proc/{pid}/environ", "rb") as handle:
            entries = handle.read().split(b"\0")
    except OSError:
        return None
    prefix = variable.encode() + b"="
    for entry in entries:
        if entry.startswith(prefix):
            value = entry[len(prefix):].decode("utf-8", "replace")
            return value.split("://", 1)[0] if "://" in value else ""
    return ""


def _accounts(user, group):
    accounts = {}
    if user:
        try:
            entry = pwd.getpwnam(user)
            try:
                group_name = grp.getgrgid(entry.pw_gid).gr_name
            except KeyError:
                group_name = None
            accounts["user"] = {"exists": True, "uid": entry.pw_uid, "gid": entry.pw_gid, "group": group_name,
                                "home": entry.pw_dir, "shell": entry.pw_shell}
        except KeyError:
            accounts["user"] = {"exists": False}
    if group:
        try:
            accounts["group"] = {"exists": True, "gid": grp.getgrnam(group).gr_gid}
        except KeyError:
            accounts["group"] = {"exists": False}
    return accounts


def _packages(run_command, names):
    if not names:
        return {}
    versions = dict.fromkeys(names)
    # (Exit 1 when some are not installed: the others are still listed.)
    _rc, out, _err = run_command(["dpkg-query", "-W", "-f", "${Package}\t${db:Status-Abbrev}\t${Version}\n", *names])
    for line in out.splitlines():
        name, status, version = (line.split("\t") + ["", ""])[:3]
        if name in versions and status.startswith("ii"):
            versions[name] = version
    return versions


def _memory_total(meminfo="/proc/meminfo"):
    try:
        with open(meminfo, encoding="ascii") as stream:
            for line in stream:
                name, _, value = line.partition(":")
                if name == "MemTotal":
                    number, _, unit = value.strip().partition(" ")
                    return int(number) * (1024 if unit.lower() == "kb" else 1)
    except (OSError, ValueError):
        pass
    return None


def _match(path, patterns):
    """The parts of each line that each pattern matches at its start (grep -o -E '^(...)'), or None."""
    compiled = [re.compile(pattern) for pattern in patterns]
    found = []
    try:
        with open(path, "rb") as handle:
            for raw in handle:
                line = raw.rstrip(b"\n").decode("utf-8", "replace")
                found += [match.group(0) for match in (regex.match(line) for regex in compiled) if match]
    except OSError:
        return None
    return found


def _connectable(host, port, timeout):
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def read_state(params, run_command):
    """Everything the parameters ask for; run_command(argv) -> (rc, stdout, stderr) runs systemctl and dpkg-query."""
    units_show, units, schemes = "", {}, {}
    if params.get("units"):
        argv = ["systemctl", "show", "--timestamp=us+utc"]
        for prop in SHOW_PROPERTIES:
            argv += ["-p", prop]
        # No init system (a host being built): nothing runs, nothing is installed.
        _rc, units_show, _err = run_command(argv + list(params["units"]))
        units = _parse_show(units_show)
    if params.get("url_scheme_of"):
        for unit, fields in units.items():
            if fields.get("ActiveState") == "active" and fields.get("MainPID", "0") not in ("", "0"):
                schemes[unit] = _url_scheme(fields["MainPID"], params["url_scheme_of"])
    return {
        "units_show": units_show,
        "units": units,
        "url_schemes": schemes,
        "paths": {path: _describe(path) for path in params.get("paths") or []},
        "contents": {path: _read(path) for path in params.get("read") or []},
        "found": [_find({"patterns": ["*"], "recurse": False, "file_type": "file"} | spec)
                  for spec in params.get("find") or []],
        "accounts": _accounts(params.get("user"), params.get("group")),
        "packages": _packages(run_command, params.get("packages") or []),
        "memory_total": _memory_total(),
        "matches": {spec["path"]: _match(spec["path"], spec["patterns"]) for spec in params.get("match") or []},
        "connectable": {f"{spec['host']}:{spec['port']}": _connectable(spec["host"], spec["port"],
                                                                        params.get("connect_timeout") or 3)
                        for spec in params.get("connect") or []},
    }


def main():
    module = AnsibleModule(
        argument_spec={
            "units": {"type": "list", "elements": "str", "default": []},
            "url_scheme_of": {"type": "str"},
            "paths": {"type": "list", "elements": "path", "default": []},
            "read": {"type": "list", "elements": "path", "default": []},
            "find": {"type": "list", "elements": "dict", "default": [], "options": {
                "paths": {"type": "list", "elements": "path", "required": True},
                "patterns": {"type": "list", "elements": "str", "default": ["*"]},
                "recurse": {"type": "bool", "default": False},
                "file_type": {"type": "str", "default": "file", "choices": ["file", "directory"]}}},
            "user": {"type": "str"},
            "group": {"type": "str"},
            "packages": {"type": "list", "elements": "str", "default": []},
            "match": {"type": "list", "elements": "dict", "default": [], "options": {
                "path": {"type": "path", "required": True},
                "patterns": {"type": "list", "elements": "str", "required": True}}},
            "connect": {"type": "list", "elements": "dict", "default": [], "options": {
                "host": {"type": "str", "required": True},
                "port": {"type": "int", "required": True}}},
            "connect_timeout": {"type": "float", "default": 3},
        },
        supports_check_mode=True,
    )
    def run_command(argv):
        # A host without systemd or dpkg (one being built, a container) has nothing running or installed.
        if module.get_bin_path(argv[0]) is None:
            return 127, "", f"{argv[0]} not found"
        return module.run_command(argv)

    module.exit_json(changed=False, **read_state(module.params, run_command))


if __name__ == "__main__":
    main()
