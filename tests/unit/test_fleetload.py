"""The oracle of the rolling tests and benchmarks (tests/support/fleetload.py): counting, windows, batches."""

from collections import Counter

import fleetload

NODES = {"web-worker@web1": "web", "web-worker@web2": "web", "batch-worker@batch1": "batch"}


def sample(t, *out):
    return {"t": t, "in_service": {node: node not in out for node in NODES}, "depth": {}}


def record(token, node, started, finished, worker_pid=100):
    return {"token": token, "node": node, "started": started, "finished": finished, "worker_pid": worker_pid,
            "release": "1.0.0"}


def sent(*tokens):
    return [{"token": token, "queue": "default", "seconds": 1, "sent": 0.0} for token in tokens]


def test_allowed_out_of_service_is_the_largest_batch_of_each_group():
    hosts = {"web1": "web", "web2": "web", "batch1": "batch", "gpu1": "gpu"}
    assert fleetload.allowed_out_of_service(hosts) == {"web": 1, "batch": 1, "gpu": 1}
    many = {f"web{n}": "web" for n in range(1, 10)} | {"batch1": "batch"}
    assert fleetload.allowed_out_of_service(many) == {"web": 2, "batch": 1}
    assert fleetload.allowed_out_of_service(many, serial=3) == {"web": 3, "batch": 1}


def test_node_host_is_the_short_host_name():
    assert fleetload.node_host("gpu-worker-2@gpu1.lab.example") == "gpu1"


def test_lost_duplicated_restarted_and_unknown_tasks_are_counted():
    records = [record("a", "web-worker@web1", 1, 2), record("b", "web-worker@web1", 1, 2),
               record("b", "web-worker@web2", 3, 4), record("x", "web-worker@web2", 3, 4)]
    report = fleetload.analyse(sent("a", "b", "c"), records, [], NODES, {}, starts=Counter(a=2, b=2, c=0))
    assert (report["lost"], report["lost_tokens"]) == (1, ["c"])
    assert (report["duplicates"], report["duplicated_tokens"]) == (1, ["b"])
    assert (report["started_again"], report["started_again_tokens"]) == (2, ["a", "b"])
    assert report["unknown"] == 1


def test_windows_max_out_and_drain_of_the_old_process_only():
    samples = [sample(0), sample(10, "web-worker@web1"), sample(11, "web-worker@web1", "web-worker@web2"),
               sample(12, "web-worker@web1"), sample(20), sample(30, "batch-worker@batch1")]
    records = [
        record("old", "web-worker@web1", 5, 15, worker_pid=100),  # running when the drain began
        record("new", "web-worker@web1", 19, 19.5, worker_pid=200),  # the restarted process, before the sample
    ]
    report = fleetload.analyse(sent("old", "new"), records, samples, NODES, {}, {"web": 1, "batch": 1})
    assert report["max_out_of_service"] == {"web": 2, "batch": 1}
    assert report["worst_moment"]["web"] == {"t": 11, "out": ["web-worker@web1", "web-worker@web2"]}
    (window,) = report["windows"]["web-worker@web1"]
    assert (window["start"], window["end"], window["seconds"]) == (10, 20, 10)
    assert window["drain_seconds"] == 5 and window["overhead_seconds"] == 5
    assert report["windows"]["web-worker@web2"] == [
        {"start": 11, "end": 12, "seconds": 1, "answers": ['"silent"'], "last_task_finished": None,
         "drain_seconds": 0.0, "overhead_seconds": 1}]
    # Still out at the end: an open window.
    assert report["windows"]["batch-worker@batch1"][0]["end"] is None


def test_throughput_compares_the_roll_with_steady_state():
    records = [record(str(i), "web-worker@web1", i, i + 0.5) for i in range(20)]
    report = fleetload.analyse(sent(*map(str, range(20))), records, [], NODES,
                               {"load_start": 0, "roll_start": 10, "roll_end": 20})
    assert report["throughput"]["steady_per_s"] == 1.0
    assert report["throughput"]["rolling_per_s"] == 1.0
    assert report["throughput"]["rolling_fraction"] == 1.0


def test_a_node_whose_surge_process_serves_in_its_stead_is_not_counted_out_with_surge():
    samples = [dict(sample(0), surge_in_service={}),
               dict(sample(1, "web-worker@web1"), surge_in_service={"web-worker@web1": True}),
               dict(sample(2, "web-worker@web1", "batch-worker@batch1"),
                    surge_in_service={"web-worker@web1": True, "batch-worker@batch1": False})]
    report = fleetload.analyse(sent(), [], samples, NODES, {})
    assert report["max_out_of_service"] == {"web": 1, "batch": 1}
    assert report["max_out_of_service_with_surge"] == {"web": 0, "batch": 1}
    assert report["surged_nodes"] == ["web-worker@web1"]


def silent(t, *nodes, answered=None):
    """A sample where `nodes` answered neither ask (None); `answered`: {node: queues} answered without theirs."""
    answered = answered or {}
    return {"t": t, "depth": {}, "answers": answered,
            "in_service": {node: None if node in nodes else (False if node in answered else True) for node in NODES}}


def test_a_short_silence_of_the_same_process_is_a_slow_reply_not_an_outage():
    node = "web-worker@web1"
    samples = [silent(0), silent(1, node), silent(2, node), silent(3)]
    records = [record("a", node, 0.1, 0.5, worker_pid=100), record("b", node, 3.2, 3.5, worker_pid=100)]
    report = fleetload.analyse(sent("a", "b"), records, samples, NODES, {})
    assert report["windows"][node] == []
    assert report["slow_replies"] == {node: [[1, 3]]}
    assert report["max_out_of_service"] == {"web": 0, "batch": 0}


def test_a_silence_that_restarted_the_process_or_lasted_or_cannot_be_told_is_out_of_service():
    node = "web-worker@web1"
    cases = {
        # A new process after it: the node stopped and started.
        "restarted": ([silent(0), silent(1, node), silent(2)],
                      [record("a", node, 0.1, 0.5, worker_pid=100), record("b", node, 2.1, 2.5, worker_pid=200)]),
        # Longer than a slow reply: a frozen process (kill -STOP) keeps its PID.
        "long": ([silent(0), silent(1, node), silent(4.5, node), silent(5)],
                 [record("a", node, 0.1, 0.5), record("b", node, 5.1, 5.5)]),
        # No task of the node on one side: nothing says it was the same process.
        "unknown": ([silent(0), silent(1, node), silent(2)], [record("a", node, 0.1, 0.5)]),
        # Silent at the start of the run: no in-service sample before it.
        "first": ([silent(0, node), silent(1)], [record("b", node, 1.1, 1.5)]),
    }
    for name, (samples, records) in cases.items():
        report = fleetload.analyse(sent(), records, samples, NODES, {})
        assert len(report["windows"][node]) == 1, name
        assert report["slow_replies"] == {}, name
        assert report["max_out_of_service"]["web"] == 1, name


def test_a_window_says_what_the_node_answered():
    node = "web-worker@web1"
    samples = [silent(0), silent(1, answered={node: []}), silent(2, node), silent(3)]
    report = fleetload.analyse(sent(), [], samples, NODES, {})
    (window,) = report["windows"][node]
    assert (window["start"], window["end"]) == (1, 3)
    assert window["answers"] == ['"silent"', "[]"]
