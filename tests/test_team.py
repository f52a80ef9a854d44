"""pyramid/team.py: shared plan and counters, and an end-of-run wait that never hangs on a dead peer."""

import threading

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
