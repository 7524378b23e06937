"""celery_fleet_host_state (plugins/modules): one read-only run for what the roles decide from."""

import grp
import os
import pwd

import celery_fleet_host_state as state  # noqa: E402

SHOW = ("Id=celery-worker@web.service\nLoadState=loaded\nActiveState=active\n"
        "ActiveEnterTimestamp=Sun 2026-11-29 10:00:00.000001 UTC\nMainPID={pid}\nUnitFileState=enabled\n\n"
        "Id=celery-beat.service\nLoadState=not-found\nActiveState=inactive\nMainPID=0\nUnitFileState=\n")


def fake_run(show="", dpkg=""):
    calls = []

    def run(argv):
        calls.append(argv)
        return (0, show, "") if argv[0] == "systemctl" else (1, dpkg, "dpkg-query: no packages found")
    return run, calls


def test_paths_are_described_without_following_links(tmp_path):
    release = tmp_path / "releases" / "r1"
    release.mkdir(parents=True)
    (tmp_path / "current").symlink_to(release)
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    paths = state.read_state({"paths": [str(tmp_path / name) for name in ("current", "dangling", "missing")]},
                             fake_run()[0])["paths"]
    current = paths[str(tmp_path / "current")]
    assert current["exists"] and current["islnk"] and not current["isdir"]
    assert current["lnk_source"] == str(release)
    assert paths[str(tmp_path / "dangling")]["exists"] and paths[str(tmp_path / "dangling")]["islnk"]
    assert paths[str(tmp_path / "missing")] == {"exists": False}


def test_small_files_are_read_and_missing_ones_are_none(tmp_path):
    (tmp_path / "mark").write_text("digest pkg\n")
    (tmp_path / "big").write_bytes(b"x" * (state.READ_LIMIT + 10))
    contents = state.read_state({"read": [str(tmp_path / "mark"), str(tmp_path / "nope"), str(tmp_path / "big")]},
                                fake_run()[0])["contents"]
    assert contents[str(tmp_path / "mark")] == "digest pkg\n"
    assert contents[str(tmp_path / "nope")] is None
    # Never half a file: one over the limit reads as none.
    assert contents[str(tmp_path / "big")] is None


def test_listings_are_like_find_with_patterns_recursion_and_types(tmp_path):
    (tmp_path / "instances").mkdir()
    for name in ("web.env", "gpu-1.env", "notes.txt"):
        (tmp_path / "instances" / name).write_text("x")
    (tmp_path / "instances" / "sub").mkdir()
    (tmp_path / "instances" / "sub" / "deep.env").write_text("x")
    (tmp_path / "instances" / "link.env").symlink_to(tmp_path / "instances" / "web.env")
    # Hidden names are left out, as Ansible's find leaves them out (never pruned, never taken for an instance).
    (tmp_path / "instances" / ".hidden.env").write_text("x")
    (tmp_path / ".trash").mkdir()
    found = state.read_state({"find": [
        {"paths": [str(tmp_path / "instances")], "patterns": ["*.env"]},
        {"paths": [str(tmp_path / "instances")], "patterns": ["*.env"], "recurse": True},
        {"paths": [str(tmp_path)], "file_type": "directory"},
        {"paths": [str(tmp_path / "absent")]}]}, fake_run()[0])["found"]
    names = [[os.path.relpath(entry["path"], tmp_path) for entry in listing] for listing in found]
    assert names[0] == ["instances/gpu-1.env", "instances/web.env"]
    assert names[1] == ["instances/gpu-1.env", "instances/web.env", "instances/sub/deep.env"]
    assert names[2] == ["instances"] and names[3] == []
    assert all(isinstance(entry["mtime"], float) for entry in found[0])


def test_units_are_parsed_and_only_the_scheme_of_a_url_leaves_the_host(monkeypatch):
    monkeypatch.setenv("CELERY_FLEET_TEST_URL", "rediss://celery:s3cret@broker1:6379/0")
    run, calls = fake_run(SHOW.format(pid=os.getpid()))
    result = state.read_state({"units": ["celery-worker@*.service", "celery-beat.service"],
                               "url_scheme_of": "CELERY_FLEET_TEST_URL"}, run)
    assert calls[0][:3] == ["systemctl", "show", "--timestamp=us+utc"] and calls[0][-1] == "celery-beat.service"
    assert result["units"]["celery-worker@web.service"]["UnitFileState"] == "enabled"
    assert result["units"]["celery-beat.service"]["LoadState"] == "not-found"
    # /proc/<pid>/environ is the process's environment at its start: the variable set above is not in it.
    assert result["url_schemes"] == {"celery-worker@web.service": ""}
    assert "s3cret" not in repr(result)


def test_a_url_scheme_is_read_from_a_process_environment(tmp_path, monkeypatch):
    environ = tmp_path / "environ"
    environ.write_bytes(b"HOME=/x\0CELERY_BROKER_URL=rediss://u:secret@b:6379/0\0")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: real_open(environ if path == "/proc/7/environ"
                                                                          else path, *a, **k))
    assert state._url_scheme("7", "CELERY_BROKER_URL") == "rediss"
    assert state._url_scheme("7", "OTHER") == ""
    assert state._url_scheme("999999999", "CELERY_BROKER_URL") is None


def test_accounts_and_packages():
    user, group = pwd.getpwuid(os.getuid()), grp.getgrgid(os.getgid())
    run, calls = fake_run(dpkg="redis-server\tii \t5:7.0.15-1\nprometheus\tun \t\n")
    result = state.read_state({"user": user.pw_name, "group": group.gr_name,
                               "packages": ["redis-server", "prometheus", "absent-package"]}, run)
    assert result["accounts"]["user"] == {"exists": True, "uid": user.pw_uid, "gid": user.pw_gid,
                                          "group": grp.getgrgid(user.pw_gid).gr_name, "home": user.pw_dir,
                                          "shell": user.pw_shell}
    assert result["accounts"]["group"] == {"exists": True, "gid": group.gr_gid}
    assert result["packages"] == {"redis-server": "5:7.0.15-1", "prometheus": None, "absent-package": None}
    missing = state.read_state({"user": "celery-fleet-no-such-user", "group": "celery-fleet-no-such-group"}, run)
    assert missing["accounts"] == {"user": {"exists": False}, "group": {"exists": False}}


def test_nothing_asked_runs_nothing():
    run, calls = fake_run()
    result = state.read_state({}, run)
    assert result.pop("memory_total") > 0
    assert result == {"units_show": "", "units": {}, "url_schemes": {}, "paths": {}, "contents": {}, "found": [],
                      "accounts": {}, "packages": {}, "matches": {}, "connectable": {}}
    assert calls == []


def test_the_host_memory_is_memtotal_in_bytes(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24683660 kB\nMemFree:         1000 kB\n")
    assert state._memory_total(str(meminfo)) == 24683660 * 1024
    meminfo.write_text("garbage\n")
    assert state._memory_total(str(meminfo)) is None
    assert state._memory_total(str(tmp_path / "absent")) is None


def test_matches_are_the_start_of_lines_as_grep_only_matching_and_nothing_else_of_the_file(tmp_path):
    """As grep -o -E '^(# Redis as a Celery broker with ACL users|tls-port )': the broker's read of redis.conf.
    The rest of a line (a password someone else's configuration holds) never leaves the host."""
    patterns = ["# Redis as a Celery broker with ACL users", "tls-port "]
    ours = tmp_path / "redis.conf"
    ours.write_text("# Redis as a Celery broker with ACL users: durable (AOF), never evicting.\nport 0\n"
                    "tls-port 6379\n  tls-port 1\n# tls-port 2\n")
    theirs = tmp_path / "theirs.conf"
    theirs.write_text("requirepass s3cret-not-to-be-shown\nport 6379\n")
    big = tmp_path / "big.conf"
    big.write_bytes(b"# padding\n" * (state.READ_LIMIT // 5) + b"tls-port 6379\n")
    matches = state.read_state({"match": [{"path": str(path), "patterns": patterns}
                                          for path in (ours, theirs, big, tmp_path / "missing.conf")]},
                               fake_run()[0])["matches"]
    assert matches[str(ours)] == ["# Redis as a Celery broker with ACL users", "tls-port "]
    assert matches[str(theirs)] == [] and "s3cret" not in repr(matches)
    assert matches[str(big)] == ["tls-port "]  # no size limit: read line by line
    assert matches[str(tmp_path / "missing.conf")] is None


def test_connect_says_whether_a_port_accepts_connections(tmp_path):
    import socket

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        open_port = listener.getsockname()[1]
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            closed_port = probe.getsockname()[1]  # bound, never listening: refused
        result = state.read_state({"connect": [{"host": "127.0.0.1", "port": open_port},
                                               {"host": "127.0.0.1", "port": closed_port}], "connect_timeout": 2},
                                  fake_run()[0])["connectable"]
    assert result == {f"127.0.0.1:{open_port}": True, f"127.0.0.1:{closed_port}": False}
