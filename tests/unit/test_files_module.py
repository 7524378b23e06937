"""celery_fleet_files (plugins/modules): many files in one module run, changed only when they differ."""

import grp
import json
import os
import pwd
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import celery_fleet_files as files  # noqa: E402

OWNER = pwd.getpwuid(os.getuid()).pw_name
GROUP = grp.getgrgid(os.getgid()).gr_name


def params(tmp_path, content="one\n", mode="0640", secret=False, absent=()):
    return {"directories": [{"path": str(tmp_path / "etc" / "app"), "owner": OWNER, "group": GROUP,
                             "mode": "0750"}],
            "files": [{"path": str(tmp_path / "etc" / "app" / "app.env"), "content": content, "owner": OWNER,
                       "group": GROUP, "mode": mode, "secret": secret}],
            "absent": [str(path) for path in absent]}


def test_a_first_run_creates_then_a_second_changes_nothing_and_keeps_the_time(tmp_path):
    changed, diffs = files.run(params(tmp_path), check_mode=False)
    target = tmp_path / "etc" / "app" / "app.env"
    assert changed == [str(tmp_path / "etc" / "app"), str(target)]
    assert target.read_text() == "one\n" and stat.S_IMODE(target.stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "etc" / "app").stat().st_mode) == 0o750
    assert diffs == [{"before_header": str(target), "after_header": str(target), "before": "", "after": "one\n"}]
    mtime = target.stat().st_mtime_ns
    assert files.run(params(tmp_path), check_mode=False) == ([], [])
    assert target.stat().st_mtime_ns == mtime


def test_a_mode_change_alone_is_fixed_in_place_without_rewriting(tmp_path):
    files.run(params(tmp_path), check_mode=False)
    target = tmp_path / "etc" / "app" / "app.env"
    inode, mtime = target.stat().st_ino, target.stat().st_mtime_ns
    changed, diffs = files.run(params(tmp_path, mode="0600"), check_mode=False)
    assert changed == [str(target)] and diffs == []
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert (target.stat().st_ino, target.stat().st_mtime_ns) == (inode, mtime)


def test_check_mode_reports_and_changes_nothing(tmp_path):
    files.run(params(tmp_path), check_mode=False)
    target = tmp_path / "etc" / "app" / "app.env"
    changed, diffs = files.run(params(tmp_path, content="two\n"), check_mode=True)
    assert changed == [str(target)] and diffs[0]["before"] == "one\n" and diffs[0]["after"] == "two\n"
    assert target.read_text() == "one\n"
    # A path not there yet, and an owner the run would create first: reported, no error, nothing made.
    fresh = params(tmp_path / "fresh")
    fresh["files"][0]["owner"] = "celery-fleet-no-such-user"
    changed, _ = files.run(fresh, check_mode=True)
    assert len(changed) == 2 and not (tmp_path / "fresh").exists()


def test_a_secret_file_never_shows_its_content(tmp_path):
    _, diffs = files.run(params(tmp_path, content="password=hunter2\n", secret=True), check_mode=False)
    assert "hunter2" not in repr(diffs)
    _, diffs = files.run(params(tmp_path, content="password=swordfish\n", secret=True), check_mode=False)
    assert "hunter2" not in repr(diffs) and "swordfish" not in repr(diffs) and diffs


def test_absent_paths_go_first_and_a_directory_goes_whole(tmp_path):
    old = tmp_path / "old.service.d"
    old.mkdir()
    (old / "10.conf").write_text("x")
    lone = tmp_path / "old.env"
    lone.write_text("x")
    changed, _ = files.run(params(tmp_path, absent=[old, lone, tmp_path / "never-there"]), check_mode=False)
    assert changed[:2] == [str(old), str(lone)] and not old.exists() and not lone.exists()


def test_bad_input_is_refused_before_any_change(tmp_path):
    with pytest.raises(ValueError, match="mode '0999' is not an octal mode"):
        files.run(params(tmp_path, mode="0999"), check_mode=False)
    assert not (tmp_path / "etc").exists()  # the directory before the bad file was not made either
    wrong = params(tmp_path)
    wrong["files"][0]["owner"] = "celery-fleet-no-such-user"
    with pytest.raises(ValueError, match="user 'celery-fleet-no-such-user' does not exist"):
        files.run(wrong, check_mode=False)
    (tmp_path / "etc" / "app" / "app.env").mkdir(parents=True)
    with pytest.raises(ValueError, match="exists and is not a regular file"):
        files.run(params(tmp_path), check_mode=False)


def test_a_symlink_in_a_files_place_is_refused_and_its_target_untouched(tmp_path):
    files.run(params(tmp_path), check_mode=False)
    target = tmp_path / "etc" / "app" / "app.env"
    elsewhere = tmp_path / "shadow"
    elsewhere.write_text("root-only\n")
    elsewhere.chmod(0o600)
    target.unlink()
    target.symlink_to(elsewhere)
    with pytest.raises(ValueError, match="exists and is not a regular file"):
        files.run(params(tmp_path), check_mode=False)
    assert elsewhere.read_text() == "root-only\n" and stat.S_IMODE(elsewhere.stat().st_mode) == 0o600


def test_a_failure_still_reports_what_changed_before_it(tmp_path):
    bad = params(tmp_path)
    (tmp_path / "etc" / "app").mkdir(parents=True)
    (tmp_path / "etc" / "app" / "app.env").mkdir()
    bad["directories"].append({"path": str(tmp_path / "var"), "owner": OWNER, "group": GROUP, "mode": "0750"})
    done = []
    with pytest.raises(ValueError):
        files.run(bad, check_mode=False, changed=done)
    assert str(tmp_path / "var") in done


def _run_command(argv, handle_exceptions=True, expand_user_and_vars=True):
    """AnsibleModule.run_command's shape, as the module calls it (a missing command raises)."""
    import subprocess  # noqa: PLC0415
    assert (handle_exceptions, expand_user_and_vars) == (False, False)
    done = subprocess.run(argv, capture_output=True, text=True)
    return done.returncode, done.stdout, done.stderr


def test_validate_checks_the_new_content_before_it_lands_and_a_refusal_leaves_the_old_file(tmp_path):
    """The command sees the new content at %s; a refusal fails the run, keeps the old file and leaves no
    temporary file; the same content is never validated again."""
    seen = tmp_path / "seen"
    check = f"sh -c 'cp \"$1\" {seen} && ! grep -q bad \"$1\"' check %s"
    spec = params(tmp_path)
    spec["files"][0]["validate"] = check
    validate = files.validator(_run_command)
    target = tmp_path / "etc" / "app" / "app.env"
    assert files.run(spec, check_mode=False, validate=validate)[0][-1] == str(target)
    assert seen.read_text() == "one\n" and target.read_text() == "one\n"
    seen.unlink()
    assert files.run(spec, check_mode=False, validate=validate) == ([], [])
    assert not seen.exists()
    spec["files"][0]["content"] = "bad\n"
    with pytest.raises(ValueError, match=r"refused the new content \(exit 1\)"):
        files.run(spec, check_mode=False, validate=validate)
    assert target.read_text() == "one\n"
    assert sorted(path.name for path in target.parent.iterdir()) == ["app.env"]
    assert files.run(spec, check_mode=True, validate=validate)[0] == [str(target)]


@pytest.mark.parametrize("command, secret, refusal", [
    ("true", False, "validate must contain %s"),
    ("check 'unclosed %s", False, "validate is not a command line"),
    ("check %s", True, "a secret file cannot be validated"),
])
def test_a_validate_command_that_cannot_work_is_refused_before_any_change(tmp_path, command, secret, refusal):
    spec = params(tmp_path, secret=secret)
    spec["files"][0]["validate"] = command
    with pytest.raises(ValueError, match=refusal):
        files.run(spec, check_mode=False, validate=files.validator(_run_command))
    assert not (tmp_path / "etc").exists()


def test_a_missing_validate_command_fails_and_still_reports_the_paths_changed_before_it(tmp_path):
    spec = params(tmp_path)
    spec["files"].append({"path": str(tmp_path / "etc" / "app" / "rules.yml"), "content": "x\n", "owner": OWNER,
                          "group": GROUP, "mode": "0644", "secret": False,
                          "validate": "celery-fleet-no-such-checker %s"})
    done = []
    with pytest.raises(OSError):
        files.run(spec, check_mode=False, changed=done, validate=files.validator(_run_command))
    assert done == [str(tmp_path / "etc" / "app"), str(tmp_path / "etc" / "app" / "app.env")]
    assert sorted(path.name for path in (tmp_path / "etc" / "app").iterdir()) == ["app.env"]


def test_secret_contents_write_a_secret_file_beside_ordinary_ones_whose_diffs_show(tmp_path):
    spec = params(tmp_path, content="ordinary\n")
    secret_path = str(tmp_path / "etc" / "app" / "celery.env")
    spec["files"].append({"path": secret_path, "content": None, "owner": OWNER, "group": GROUP, "mode": "0600",
                          "secret": True})
    spec["secret_contents"] = {secret_path: "password=hunter2\n"}
    changed, diffs = files.run(spec, check_mode=False)
    assert changed[-2:] == [str(tmp_path / "etc" / "app" / "app.env"), secret_path]
    assert (tmp_path / "etc" / "app" / "celery.env").read_text() == "password=hunter2\n"
    assert diffs[0]["after"] == "ordinary\n" and "hunter2" not in repr(diffs), diffs
    assert files.run(spec, check_mode=False) == ([], [])


@pytest.mark.parametrize("mistake, refusal", [
    ("not secret", "is for a file marked secret without content of its own"),
    ("both", "is for a file marked secret without content of its own"),
    ("stray", "secret_contents names paths that are not files of this task"),
    ("none", "no content (give it in content, or in secret_contents for a secret file)"),
])
def test_secret_contents_that_do_not_fit_are_refused_naming_the_path_never_the_text(tmp_path, mistake, refusal):
    spec = params(tmp_path, content=None if mistake in ("not secret", "none") else "inline\n",
                  secret=mistake in ("both", "stray"))
    target = spec["files"][0]["path"]
    spec["secret_contents"] = ({} if mistake == "none" else
                               {str(tmp_path / "elsewhere"): "password=hunter2\n"} if mistake == "stray" else
                               {target: "password=hunter2\n"})
    with pytest.raises(ValueError) as refused:
        files.run(spec, check_mode=False)
    assert refusal in str(refused.value) and "hunter2" not in str(refused.value)
    assert not (tmp_path / "etc").exists()


def test_ansible_masks_secret_contents_in_every_output_and_still_shows_the_ordinary_diff(tmp_path):
    """Through Ansible itself (-vvv --diff, the local connection): the secret_contents argument is no_log."""
    project = Path(__file__).resolve().parents[2]
    secret_path, ordinary_path = str(tmp_path / "celery.env"), str(tmp_path / "unit.conf")
    arguments = {"files": [{"path": ordinary_path, "content": "ordinary line\n", "mode": "0644",
                            "owner": OWNER, "group": GROUP},
                           {"path": secret_path, "mode": "0600", "secret": True, "owner": OWNER, "group": GROUP}],
                 "secret_contents": {secret_path: "CELERY_BROKER_URL=redis://:hunter2-secret@broker\n"}}
    result = subprocess.run(
        ["ansible", "localhost", "-c", "local", "-m", "celery_fleet_files", "-a", json.dumps(arguments), "--diff",
         "-vvv"], capture_output=True, text=True, cwd=project, timeout=120,
        env=dict(os.environ, ANSIBLE_CONFIG=str(project / "ansible.cfg"), ANSIBLE_INVENTORY="localhost,",
                 ANSIBLE_PYTHON_INTERPRETER=sys.executable))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "hunter2" not in output, output
    assert "+ordinary line" in output and "(secret: not shown, changed)" in output, output[-3000:]
    assert (tmp_path / "celery.env").read_text() == "CELERY_BROKER_URL=redis://:hunter2-secret@broker\n"
