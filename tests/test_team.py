"""pyramid/team.py: shared plan and counters, and an end-of-run wait that never hangs on a dead peer."""

import threading
import time

import torch.distributed as dist

from pyramid.team import Team


def test_team_of_one_counts_locally():
    team = Team()
    assert team.share("plan", [1, 2]) == [1, 2]
    assert team.add("done", 3) == 3 and team.add("done", 0) == 3
    assert team.finish() == []
    assert not team.stop_requested()


def test_share_and_counters_over_a_store():
    store = dist.HashStore()
    main, other = Team(0, 2, store), Team(1, 2, store)
    main.share("plan", {"todo": ["a.png"]})
    assert other.share("plan", None) == {"todo": ["a.png"]}
    main.add("done", 2)
    other.add("done", 5)
    assert main.add("done", 0) == 7
    other.request_stop()
    assert main.stop_requested()


def test_finish_waits_for_a_live_peer():
    store = dist.HashStore()
    main, other = Team(0, 2, store), Team(1, 2, store)
    result = {}
    waiter = threading.Thread(target=lambda: result.update(gone=main.finish(poll_seconds=0.01)))
    waiter.start()
    waiter.join(0.3)
    assert waiter.is_alive()  # the peer has not finished yet
    assert other.finish(poll_seconds=0.01) == []
    waiter.join(5)
    assert result["gone"] == []


def test_finish_gives_up_on_a_peer_whose_heartbeat_stopped():
    store = dist.HashStore()
    main = Team(0, 2, store)
    assert main.finish(stale_after=0.2, poll_seconds=0.01) == [1]


def test_finish_stops_waiting_soon_for_a_silent_peer_once_a_signal_came():
    store = dist.HashStore()
    main = Team(0, 2, store)
    signalled = threading.Event()
    result = {}
    waiter = threading.Thread(target=lambda: result.update(gone=main.finish(
        stale_after=60, poll_seconds=0.01, stopping=signalled.is_set, stopping_stale_after=0.2)))
    waiter.start()
    waiter.join(0.5)
    assert waiter.is_alive()  # no signal yet: a silent peer is waited for up to stale_after
    signalled.set()  # as SIGTERM from a launcher tearing the team down, arriving during the wait
    waiter.join(5)
    assert not waiter.is_alive() and result["gone"] == [1]


def test_finish_gives_up_on_a_peer_that_beats_but_finishes_nothing():
    """A stuck peer's heartbeat thread beats on: its done count, not moving, is what gives it away."""
    store = dist.HashStore()
    main, stuck = Team(0, 2, store), Team(1, 2, store)
    beating = threading.Event()

    def beat():
        while not beating.is_set():
            stuck.add("beat/1")
            time.sleep(0.01)

    beater = threading.Thread(target=beat)
    beater.start()
    try:
        started = time.monotonic()
        assert main.finish(idle_after=0.5, poll_seconds=0.01) == [1]
        assert 0.5 <= time.monotonic() - started < 5
    finally:
        beating.set()
        beater.join()


def test_once_stopping_nobody_is_waited_for_past_the_stopping_wait():
    store = dist.HashStore()
    main, peer = Team(0, 2, store), Team(1, 2, store)
    peer.start_heartbeat()  # alive and beating, but never finishing
    try:
        started = time.monotonic()
        assert main.finish(poll_seconds=0.01, stopping=lambda: True, stopping_wait=0.5) == [1]
        assert time.monotonic() - started < 5
    finally:
        peer.stop_heartbeat()


def test_a_process_that_leaves_is_not_waited_for_and_its_posts_reach_the_main_process():
    store = dist.HashStore()
    main, failing = Team(0, 2, store), Team(1, 2, store)
    failing.post("errors", "process 1 on node3: RuntimeError: boom")
    failing.post("notes", "process 1 on node3: out of GPU memory at batch 64; going on at batch 32")
    failing.leave()
    assert main.finish(poll_seconds=0.01) == []
    assert main.posts("errors") == ["process 1 on node3: RuntimeError: boom"]
    assert main.posts("notes") == ["process 1 on node3: out of GPU memory at batch 64; going on at batch 32"]
    alone = Team()
    alone.post("notes", "a")
    alone.post("notes", "b")
    assert alone.posts("notes") == ["a", "b"] and alone.posts("errors") == []


def test_each_launcher_attempt_has_keys_of_its_own():
    """torchrun's restart may keep its store: the restarted team must not read the failed attempt's plan
    or continue its chunk claims."""
    store = dist.HashStore()
    first, restarted = Team(0, 2, store, attempt=0), Team(0, 2, store, attempt=1)
    first.share("plan", "the first attempt's plan")
    first.add("next_chunk", 5)
    assert restarted.add("next_chunk") == 1
    restarted.share("plan", "the restart's plan")
    assert Team(1, 2, store, attempt=1).share("plan", None) == "the restart's plan"
