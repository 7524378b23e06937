#!/usr/bin/python
"""Ensure many directories, files and absent paths on a host in one module run."""

from __future__ import annotations

DOCUMENTATION = r"""
module: celery_fleet_files
short_description: Ensure many directories, files and absent paths on a host in one run
description:
  - The roles' files and directories in one module execution per host instead of one per file (two per template).
    On a host reached by docker exec or SSH, a module run costs a Python start and the import of Ansible's module
    code from the payload (about 0.3 s of CPU in the lab), so a no-op deploy is mostly the count of module runs.
  - Paths are handled in this order. I(absent) first (removed, recursively for a directory), then
    I(directories) (created with their parents, then owner, group and mode set), then I(files).
  - A file is written only when its content differs (atomically, through a temporary file in the same
    directory given its owner, group and mode, then renamed over the old one), so its modification time changes only
    with its content. Owner, group and mode are corrected in place otherwise.
  - Check mode reports what would change and changes nothing; an owner or group that does not exist yet is
    then reported as a change (the run creates the user before this task), not as an error.
  - Diff mode shows each changed file's old and new text, except for files marked I(secret).
  - Content given here travels in the module's arguments. A secret file's content goes in I(secret_contents), a
    C(no_log) argument (Ansible masks it in every result and log), so that one task, without C(no_log), writes
    secret and ordinary files and still shows the ordinary ones' diffs; a task that puts secret text in I(files)
    sets C(no_log) itself.
options:
  directories:
    description: Directories to ensure.
    type: list
    elements: dict
    default: []
    suboptions:
      path: {type: path, required: true, description: Absolute path.}
      owner: {type: str, default: root, description: Owner name.}
      group: {type: str, default: root, description: Group name.}
      mode: {type: str, required: true, description: Octal mode as a string, for example C("0750").}
  files:
    description: Regular files to ensure, with their whole content.
    type: list
    elements: dict
    default: []
    suboptions:
      path: {type: path, required: true, description: Absolute path; its directory must exist.}
      content:
        type: str
        description: The file's text (UTF-8). Required, except for a I(secret) file whose text is in I(secret_contents).
      owner: {type: str, default: root, description: Owner name.}
      group: {type: str, default: root, description: Group name.}
      mode: {type: str, required: true, description: Octal mode as a string.}
      secret: {type: bool, default: false, description: Never show this file's content in a diff.}
      validate:
        type: str
        description:
          - A command run on the new content before it replaces the file, C(%s) standing for the temporary file's
            path (as the template module's I(validate)); a non-zero exit fails the run and leaves the file as it was.
            Run only when the content differs, never in check mode. Split like a shell's words, run without a shell
            (no C($VAR) or C(~) expanded). Not allowed on a I(secret) file (its output reaches the error message).
  secret_contents:
    description:
      - "The text of I(secret) files, by path: {path: content}. A C(no_log) argument: never shown in a result, a log
        or a diff. Each path must be a file of I(files) marked I(secret) and without its own I(content)."
    type: dict
    default: {}
  absent:
    description: Paths to remove (a directory with everything in it).
    type: list
    elements: path
    default: []
author: celery-fleet
"""

RETURN = r"""
changed_paths:
  description: Every path this run changed (or would change, in check mode), in the order handled.
  type: list
  elements: str
  returned: always
"""

import grp
import os
import pwd
import shlex
import shutil
import stat
import tempfile

from ansible.module_utils.basic import AnsibleModule


def _mode(value, path):
    try:
        mode = int(str(value), 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o7777:
        raise ValueError(f"{path}: mode {value!r} is not an octal mode between 0000 and 7777")
    return mode


def _ids(owner, group, check_mode, path):
    """(uid, gid); None for a name that does not exist yet (an error outside check mode)."""
    try:
        uid = pwd.getpwnam(owner).pw_uid
    except KeyError:
        uid = None
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        gid = None
    if not check_mode and (uid is None or gid is None):
        missing = f"user {owner!r}" if uid is None else f"group {group!r}"
        raise ValueError(f"{path}: {missing} does not exist")
    return uid, gid


def _attributes_differ(info, uid, gid, mode):
    return uid is None or gid is None or (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) != (uid, gid, mode)


def ensure_absent(path, check_mode):
    if not os.path.lexists(path):
        return False
    if not check_mode:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    return True


def _set_attributes(path, uid, gid, mode, directory=False):
    """chown and chmod through a descriptor opened without following a link: a path swapped for a symlink (in a
    directory a service user can write) never hands the link's target to that user."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | (os.O_DIRECTORY if directory else 0)
    descriptor = os.open(path, flags)
    try:
        os.fchown(descriptor, uid, gid)
        os.fchmod(descriptor, mode)
    finally:
        os.close(descriptor)


def ensure_directory(spec, check_mode):
    path = spec["path"]
    mode = _mode(spec["mode"], path)
    uid, gid = _ids(spec["owner"], spec["group"], check_mode, path)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        if not check_mode:
            os.makedirs(path, exist_ok=True)
            _set_attributes(path, uid, gid, mode, directory=True)
        return True
    if not stat.S_ISDIR(info.st_mode):
        raise ValueError(f"{path} exists and is not a directory")
    if not _attributes_differ(info, uid, gid, mode):
        return False
    if not check_mode:
        _set_attributes(path, uid, gid, mode, directory=True)
    return True


def _read(path):
    """(lstat result, content) of a regular file read without following a link, or (None, None)."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None, None
    except OSError as error:  # ELOOP: the path is a symlink
        raise ValueError(f"{path} exists and is not a regular file ({error.strerror})") from error
    info = os.fstat(descriptor)
    if not stat.S_ISREG(info.st_mode):
        os.close(descriptor)
        raise ValueError(f"{path} exists and is not a regular file")
    with os.fdopen(descriptor, "rb") as handle:
        return info, handle.read()


def ensure_file(spec, check_mode, validate=None):
    """(changed, diff or None). validate(command, path) checks the temporary file before it is renamed into place
    (raises ValueError when the command refuses it)."""
    path = spec["path"]
    mode = _mode(spec["mode"], path)
    uid, gid = _ids(spec["owner"], spec["group"], check_mode, path)
    wanted = spec["content"].encode("utf-8")
    info, before = _read(path)
    content_differs = before != wanted
    if not content_differs and not _attributes_differ(info, uid, gid, mode):
        return False, None
    if not check_mode:
        if content_differs:
            directory = os.path.dirname(path)
            descriptor, temporary = tempfile.mkstemp(prefix=".celery-fleet-", dir=directory)
            try:
                # Owner and mode set through the descriptor, before the name is renamed into place.
                os.fchown(descriptor, uid, gid)
                os.fchmod(descriptor, mode)
                with os.fdopen(descriptor, "wb") as handle:
                    handle.write(wanted)
                    handle.flush()
                    os.fsync(handle.fileno())
                    written = os.fstat(handle.fileno()).st_ino
                if spec.get("validate"):
                    validate(spec["validate"], temporary)
                os.replace(temporary, path)
            except BaseException:
                if os.path.lexists(temporary):
                    os.unlink(temporary)
                raise
            # The name renamed must have been our file: one swapped in its place by someone who can write the
            # directory is refused loudly (it is now at `path`: the run fails and says so).
            if os.lstat(path).st_ino != written:
                raise ValueError(f"{path}: the file renamed into place was not the one written (the directory is "
                                 "writable by another user); check it by hand")
        else:
            _set_attributes(path, uid, gid, mode)
    diff = None
    if content_differs:
        if spec["secret"]:
            diff = {"before_header": path, "after_header": path,
                    "before": "(secret: not shown)\n" if before is not None else "",
                    "after": "(secret: not shown, changed)\n"}
        else:
            diff = {"before_header": path, "after_header": path,
                    "before": before.decode("utf-8", "replace") if before is not None else "",
                    "after": spec["content"]}
    return True, diff


def validator(run_command):
    """validate(command, path) for ensure_file: the command's words (shell-split, no shell) with %s replaced by the
    path, run through run_command (AnsibleModule.run_command's (rc, stdout, stderr)); a non-zero exit raises."""
    def validate(command, path):
        argv = [word.replace("%s", path) for word in shlex.split(command)]
        # A missing command raises (OSError), reported with the paths changed before it; no $VAR or ~ expanded.
        rc, out, err = run_command(argv, handle_exceptions=False, expand_user_and_vars=False)
        if rc != 0:
            raise ValueError(f"validation {command!r} refused the new content (exit {rc}): "
                             f"{(out + err).strip()[-2000:]}")
    return validate


def with_secret_contents(files, secret_contents):
    """`files` with each secret file's content taken from `secret_contents` ({path: content}). Raises ValueError
    naming the path (never the content) of a file with no content or two, or of a secret content no secret file
    takes."""
    secret_contents = secret_contents or {}
    complete = []
    for spec in files:
        path = spec["path"]
        if path in secret_contents:
            if not spec.get("secret") or spec.get("content") is not None:
                raise ValueError(f"{path}: a content in secret_contents is for a file marked secret without content "
                                 "of its own")
            spec = dict(spec, content=secret_contents[path])
        elif spec.get("content") is None:
            raise ValueError(f"{path}: no content (give it in content, or in secret_contents for a secret file)")
        complete.append(spec)
    stray = sorted(set(secret_contents) - {spec["path"] for spec in files})
    if stray:
        raise ValueError(f"secret_contents names paths that are not files of this task: {stray}")
    return complete


def run(params, check_mode, changed=None, validate=None):
    """(changed paths, diffs). Every mode, owner and group (and every validate command's %s) is checked before
    anything is changed. `changed` (a list) is filled as paths change, so a caller still knows them when a later
    path fails. validate: see ensure_file."""
    params = dict(params, files=with_secret_contents(params["files"], params.get("secret_contents")))
    for spec in params["directories"] + params["files"]:
        _mode(spec["mode"], spec["path"])
        _ids(spec["owner"], spec["group"], check_mode, spec["path"])
    for spec in params["files"]:
        if spec.get("validate"):
            try:
                words = shlex.split(spec["validate"])
            except ValueError as error:
                raise ValueError(f"{spec['path']}: validate is not a command line ({error}): "
                                 f"{spec['validate']!r}") from error
            if not any("%s" in word for word in words):
                raise ValueError(f"{spec['path']}: validate must contain %s (the new file's path): "
                                 f"{spec['validate']!r}")
            # The command's output goes into the error message: a secret file's content must never reach it.
            if spec["secret"]:
                raise ValueError(f"{spec['path']}: a secret file cannot be validated (the command's output would "
                                 "show its content)")
    changed = [] if changed is None else changed
    diffs = []
    for path in params["absent"]:
        if ensure_absent(path, check_mode):
            changed.append(path)
            diffs.append({"before_header": path, "after_header": path, "before": "(present)\n",
                          "after": "(absent)\n"})
    for spec in params["directories"]:
        if ensure_directory(spec, check_mode):
            changed.append(spec["path"])
    for spec in params["files"]:
        file_changed, diff = ensure_file(spec, check_mode, validate)
        if file_changed:
            changed.append(spec["path"])
            if diff:
                diffs.append(diff)
    return changed, diffs


def main():
    owned = {"owner": {"type": "str", "default": "root"}, "group": {"type": "str", "default": "root"},
             "mode": {"type": "str", "required": True}}
    module = AnsibleModule(
        argument_spec={
            "directories": {"type": "list", "elements": "dict", "default": [],
                            "options": {"path": {"type": "path", "required": True}, **owned}},
            "files": {"type": "list", "elements": "dict", "default": [],
                      "options": {"path": {"type": "path", "required": True},
                                  "content": {"type": "str"},
                                  "secret": {"type": "bool", "default": False},
                                  "validate": {"type": "str"}, **owned}},
            "secret_contents": {"type": "dict", "default": {}, "no_log": True},
            "absent": {"type": "list", "elements": "path", "default": []},
        },
        supports_check_mode=True,
    )
    paths = ([spec["path"] for spec in module.params["directories"]]
             + [spec["path"] for spec in module.params["files"]] + list(module.params["absent"]))
    relative = [path for path in paths if not os.path.isabs(path)]
    if relative:
        module.fail_json(msg=f"celery_fleet_files: paths must be absolute: {relative}")
    twice = sorted({path for path in paths if paths.count(path) > 1})
    if twice:
        module.fail_json(msg=f"celery_fleet_files: a path is given more than once: {twice}")
    done = []
    try:
        changed, diffs = run(module.params, module.check_mode, done, validator(module.run_command))
    except (OSError, ValueError) as error:
        # What was changed before the failure is reported: its handlers are still owed.
        module.fail_json(msg=f"celery_fleet_files: {error}", changed=bool(done), changed_paths=done)
    result = {"changed": bool(changed), "changed_paths": changed}
    if module._diff and diffs:
        result["diff"] = diffs
    module.exit_json(**result)


if __name__ == "__main__":
    main()
