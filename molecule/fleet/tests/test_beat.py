"""celery beat on the lab: one unit, on batch1 (inventories/lab), hardened like the workers, sending the example
app's tick every 2 s. Its restart across a roll (no tick twice, none skipped) is measured under load in the
rolling scenario (test_rolling.py); a second beat host is refused in test_bad_input.py."""

import re
import time

import fleetlab
import fleetload
from fleet import INVENTORY, lab_host


def test_beat_runs_on_exactly_one_host_hardened_like_the_workers():
    for name in ("web1", "web2", "gpu1"):
        assert not lab_host(name).file("/etc/systemd/system/celery-beat.service").exists
    batch1 = lab_host("batch1")
    assert batch1.service("celery-beat.service").is_running and batch1.service("celery-beat.service").is_enabled
    # The schedule state (shelve adds its own suffix, .db with Debian's dbm), written by beat as celery.
    state = batch1.check_output("stat -c '%U %n' /var/lib/celery-fleet/beat/celerybeat-schedule*")
    assert state.startswith("celery /var/lib/celery-fleet/beat/celerybeat-schedule"), state
    exposure = batch1.check_output("systemd-analyze security celery-beat.service | grep 'exposure level'")
    assert float(re.search(r"celery-beat.service: ([0-9.]+)", exposure).group(1)) <= 2.0, exposure


def test_beat_sends_the_app_s_tick_and_workers_run_each_once():
    broker = fleetload.lab_client(INVENTORY).redis()
    since = time.time()
    time.sleep(5 * fleetlab.BEAT_TICK)
    sent = fleetlab.beat_ticks_since(broker, since)
    gaps = [later["at"] - earlier["at"] for earlier, later in zip(sent, sent[1:])]
    assert len(sent) >= 4 and all(abs(gap - fleetlab.BEAT_TICK) < 0.5 for gap in gaps), gaps
    ran = [tick["id"] for tick in fleetlab.beat_ticks_since(broker, since, "ran")]
    assert all(ran.count(tick["id"]) == 1 for tick in sent[:-1]), (sent, ran)
