"""celery beat on the lab: one unit on batch1 (inventories/lab), the example app's tick every 2 s, through a
rolling restart of its host; and a second beat host refused."""

import json
import time

import fleetload
from fleet import INVENTORY, lab_host

TICK = 2.0


def ledger():
    """The broker's queue instance, where the example app's tick records go."""
    return fleetload.lab_client(INVENTORY).redis()


def ticks(broker, key):
    return [json.loads(record) for record in broker.lrange(f"beat:ticks:{key}", 0, -1)]


def test_beat_runs_on_exactly_one_host_hardened_like_the_workers():
    for name in ("web1", "web2", "gpu1"):
        assert not lab_host(name).file("/etc/systemd/system/celery-beat.service").exists
    batch1 = lab_host("batch1")
    assert batch1.service("celery-beat.service").is_running and batch1.service("celery-beat.service").is_enabled
    assert batch1.file("/var/lib/celery-fleet/beat/celerybeat-schedule").user == "celery"
    exposure = batch1.check_output("systemd-analyze security celery-beat.service | tail -1")
    score = float(exposure.split("exposure level")[1].split()[0])
    assert score <= 2.0, exposure


def test_a_roll_of_the_beat_host_sends_no_tick_twice_and_skips_none_at_once():
    broker = ledger()
    before = len(ticks(broker, "sent"))
    started = time.time()
    rc, output = fleetload.run_playbook("rolling_restart.yml", "--limit", "batch1", inventory=INVENTORY,
                                        timeout=600)
    assert rc == 0, output[-3000:]
    assert "TASK [celery_worker : Restart celery beat]" in output and "changed: [batch1]" in output
    time.sleep(3 * TICK)
    sent = [tick for tick in ticks(broker, "sent")[before:] if tick["at"] >= started - TICK]
    times = sorted(tick["at"] for tick in sent)
    gaps = [later - earlier for earlier, later in zip(times, times[1:])]
    pids = sorted({tick["pid"] for tick in sent})
    assert len(pids) == 2, f"beat was not restarted once: pids {pids}"
    # No tick sent twice: two sends closer than half the period would be the same tick again.
    assert min(gaps) > TICK / 2, gaps
    # The tick due while beat was stopped is sent once when it is back, not skipped: the longest gap is
    # the stop plus the start, below three periods here.
    print(f"\nbeat across the roll: {len(sent)} ticks in {times[-1] - times[0]:.1f} s, longest gap "
          f"{max(gaps):.2f} s (period {TICK} s), shortest {min(gaps):.2f} s")
    assert max(gaps) < 3 * TICK, gaps
    ran = {tick["id"] for tick in ticks(broker, "ran")}
    assert all(tick["id"] in ran for tick in sent[:-1]), "a sent tick never ran"
