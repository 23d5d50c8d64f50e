"""Run, runner and callback verbs on a real APSW file, through the store's writer."""

import pytest

from store import callbacks, runners, runs
from store.db import Database
from store.errors import Conflict, NotFound, Rejected
from store.models import Runner
from store.sessions import create_session, get_session, update_session
from store.stamps import now_ts

STARTED = now_ts()  # the coordinator's start, for the verbs that count from it


@pytest.fixture
def db(tmp_path):
    database = Database(tmp_path / "observability.db")
    yield database
    database.close()


def runner(hostname="h", project_dir="/p", executor_type="x", tags=()) -> Runner:
    return Runner("lnch_t", "t", "t", hostname, project_dir, executor_type, list(tags), "online", 0.0)


def queue(db, session_id="s", type_="start_session", demands=None, **fields) -> runs.Run:
    run = runs.new_run(session_id, type_, "go", demands=demands, **fields)
    return db.write_sync(runs.create_run, run, no_match_timeout=300)[0]


def set_run(db, run_id, **columns):
    assignments = ", ".join(f"{name} = ?" for name in columns)
    db.write_sync(lambda c: c.execute(f"UPDATE runs SET {assignments} WHERE run_id = ?", (*columns.values(), run_id)))


def status(db, run_id) -> str:
    return db.read_sync(runs.get_run, run_id).status


# -- demands ------------------------------------------------------------------------------


@pytest.mark.parametrize("blueprint, additional, merged", [
    (None, None, None),
    ({"tags": []}, {"hostname": None, "tags": []}, None),
    ({"hostname": "a", "tags": ["x"]}, {"hostname": "b", "project_dir": "/p", "tags": ["y", "x"]},
     {"hostname": "a", "project_dir": "/p", "tags": ["x", "y"]}),
    ({"hostname": ""}, {"hostname": "b"}, {"hostname": "b", "tags": []}),
    (None, {"executor_type": ""}, {"executor_type": "", "tags": []}),
])
def test_merge_demands(blueprint, additional, merged):
    assert runs.merge_demands(blueprint, additional) == merged


@pytest.mark.parametrize("demands, met", [
    (None, True),
    ({"tags": []}, True),
    ({"hostname": "h", "tags": ["a"]}, True),
    ({"hostname": "", "project_dir": "", "tags": []}, True),
    ({"hostname": "other", "tags": []}, False),
    ({"executor_type": "x", "tags": ["a", "b"]}, True),
    ({"tags": ["A"]}, False),
    ({"tags": ["a", "c"]}, False),
])
def test_demands_met(demands, met):
    assert runs.demands_met(demands, runner(tags=["a", "b"])) is met


# -- queue --------------------------------------------------------------------------------


def test_start_run_creates_its_session_in_the_same_write(db):
    run = queue(db, "s", agent_name="a", project_dir="/p", execution_mode="async_callback", demands={"tags": ["t"]})
    session = db.read_sync(get_session, "s")
    assert (session.status, session.agent_name, session.execution_mode) == ("pending", "a", "async_callback")
    assert run.timeout_at > run.created_at
    assert db.read_sync(runs.get_run, run.run_id) == run
    with pytest.raises(Conflict, match="Session 's' already exists"):
        queue(db, "s")
    assert len(db.read_sync(runs.list_runs)) == 1


def test_resume_run_needs_its_session_and_inherits_from_it(db):
    with pytest.raises(NotFound, match="Session not found"):
        queue(db, "ghost", "resume_session")
    assert db.read_sync(runs.list_runs) == []
    queue(db, "s", agent_name="a", project_dir="/p")
    inherited = queue(db, "s", "resume_session")
    assert (inherited.agent_name, inherited.project_dir, inherited.timeout_at) == ("a", "/p", None)


def test_claims_are_fifo_demand_filtered_and_once_only(db):
    first, second, third = (queue(db, f"s{i}", demands=d) for i, d in enumerate([{"tags": ["gpu"]}, None, None]))
    # Same created_at: run_id breaks the tie.
    set_run(db, second.run_id, created_at=third.created_at)
    later, earlier = sorted([second, third], key=lambda r: r.run_id, reverse=True)
    claimed = db.write_sync(runs.claim_run, runner())
    assert (claimed.run_id, claimed.status, claimed.runner_id) == (earlier.run_id, "claimed", "lnch_t")
    assert claimed.claimed_at
    assert db.write_sync(runs.claim_run, runner()).run_id == later.run_id
    assert db.write_sync(runs.claim_run, runner()) is None  # the gpu run waits for a gpu runner
    assert db.write_sync(runs.claim_run, runner(tags=["gpu"])).run_id == first.run_id


def test_unclaim_only_by_the_claiming_runner(db):
    run = queue(db)
    db.write_sync(runs.claim_run, runner())
    assert db.write_sync(runs.unclaim_run, run.run_id, "lnch_other") is False
    assert db.write_sync(runs.unclaim_run, run.run_id, "lnch_t") is True
    back = db.read_sync(runs.get_run, run.run_id)
    assert (back.status, back.runner_id, back.claimed_at) == ("pending", None, None)


def test_list_runs_filter(db):
    a, b = queue(db, "a"), queue(db, "b")
    db.write_sync(runs.stop_run, a.run_id)
    assert [r.run_id for r in db.read_sync(runs.list_runs)] == [a.run_id, b.run_id]
    assert [r.run_id for r in db.read_sync(runs.list_runs, "pending")] == [b.run_id]


def test_no_match_timeout_fails_only_expired_pending_runs(db):
    expired, fresh = (queue(db, name, demands={"tags": ["t"]}) for name in "ab")
    plain = queue(db, "c")
    set_run(db, expired.run_id, timeout_at=now_ts(-1))
    [failed] = db.write_sync(runs.fail_timed_out_runs)
    assert (failed.run_id, failed.status, failed.error) == (
        expired.run_id, "failed", "No matching runner available within timeout")
    assert failed.completed_at
    assert status(db, fresh.run_id) == status(db, plain.run_id) == "pending"
    assert db.read_sync(get_session, "a").status == "pending"


# -- registry and stop commands -----------------------------------------------------------


def register(db, hostname="h", tags=None) -> Runner:
    return db.write_sync(runners.register_runner, hostname, "/p", "x", tags, STARTED)


def test_register_duplicate_and_reconnect(db):
    first = register(db, tags=["a"])
    with pytest.raises(runners.DuplicateRunner) as duplicate:
        register(db)
    assert duplicate.value.detail["runner_id"] == first.runner_id
    db.write_sync(lambda c: c.execute("UPDATE runners SET status = 'stale', deregistering = 1"))
    again = register(db)
    assert (again.registered_at, again.tags, again.status) == (first.registered_at, ["a"], "online")
    assert again.last_heartbeat > first.last_heartbeat
    assert db.write_sync(runners.next_for_runner, again.runner_id, STARTED) is None  # flag cleared


def test_heartbeat_and_lifecycle(db):
    quiet, lively = register(db, "quiet"), register(db, "lively")
    with pytest.raises(runners.UnknownRunner):
        db.write_sync(runners.heartbeat, "lnch_nobody")
    old = now_ts(-100)
    db.write_sync(lambda c: c.execute("UPDATE runners SET last_heartbeat = ?", (old,)))
    db.write_sync(runners.heartbeat, lively.runner_id)
    # Silence counts from `since` at the earliest: a recent start protects everyone.
    assert db.write_sync(runners.update_lifecycle, 50, 90, now_ts(-10)) == []
    assert [r.status for r in db.read_sync(runners.list_runners)] == ["online", "online"]
    assert db.write_sync(runners.update_lifecycle, 50, 200, old) == []
    assert [r.status for r in db.read_sync(runners.list_runners)] == ["stale", "online"]
    db.write_sync(runners.heartbeat, quiet.runner_id)
    assert db.read_sync(runners.get_runner, quiet.runner_id).status == "online"
    db.write_sync(lambda c: c.execute("UPDATE runners SET last_heartbeat = ? WHERE hostname = 'quiet'", (old,)))
    assert db.write_sync(runners.update_lifecycle, 50, 90, old) == [quiet.runner_id]
    assert [r.runner_id for r in db.read_sync(runners.list_runners)] == [lively.runner_id]


def test_stop_commands_dedupe_keep_order_and_go_with_their_runner(db):
    r = register(db)
    assert db.write_sync(runs.queue_stops, "lnch_nobody", ["run_x"]) is False
    assert db.write_sync(runs.queue_stops, r.runner_id, ["run_b", "run_a", "run_b"]) is True
    db.write_sync(runs.queue_stops, r.runner_id, ["run_a", "run_c"])
    assert db.write_sync(runs.take_stops, r.runner_id) == ["run_b", "run_a", "run_c"]
    assert db.write_sync(runs.take_stops, r.runner_id) == []
    db.write_sync(runs.queue_stops, r.runner_id, ["run_d"])
    db.write_sync(runners.deregister_runner, r.runner_id, True)
    assert db.read_sync(lambda c: c.execute("SELECT count(*) FROM runner_stops").fetchone()[0]) == 0
    with pytest.raises(NotFound, match="Runner not found"):
        db.write_sync(runners.deregister_runner, r.runner_id, False)


def test_poll_round_order_stops_then_deregistration_then_claim(db):
    r = register(db)
    run = queue(db)
    db.write_sync(runs.queue_stops, r.runner_id, ["run_old"])
    db.write_sync(runners.deregister_runner, r.runner_id, False)
    assert db.write_sync(runners.next_for_runner, r.runner_id, STARTED) == {"stop_runs": ["run_old"]}
    assert db.write_sync(runners.next_for_runner, r.runner_id, STARTED) == {"deregistered": True}
    with pytest.raises(runners.UnknownRunner):
        db.write_sync(runners.next_for_runner, r.runner_id, STARTED)
    assert status(db, run.run_id) == "pending"
    r = register(db)
    assert db.write_sync(runners.next_for_runner, r.runner_id, STARTED)["run"].run_id == run.run_id


# -- stopping -----------------------------------------------------------------------------


def test_stop_run_by_status(db):
    r = register(db)
    pending = queue(db, "a")
    stopped = db.write_sync(runs.stop_run, pending.run_id)
    assert stopped.reply["status"] == "stopped" and stopped.session.status == "stopped" and stopped.runner_id is None
    claimed = queue(db, "b")
    db.write_sync(runs.claim_run, db.read_sync(runners.get_runner, r.runner_id))
    stopping = db.write_sync(runs.stop_run, claimed.run_id)
    assert (stopping.reply["status"], stopping.session.status) == ("stopping", "stopping")
    assert stopping.runner_id == r.runner_id
    assert db.write_sync(runs.take_stops, r.runner_id) == [claimed.run_id]
    with pytest.raises(Rejected, match=r"Run cannot be stopped \(status: stopping\)"):
        db.write_sync(runs.stop_run, claimed.run_id)
    orphan = queue(db, "c")
    set_run(db, orphan.run_id, status="running")
    with pytest.raises(Rejected, match="Run not claimed by any runner"):
        db.write_sync(runs.stop_run, orphan.run_id)


def test_stop_session_settles_a_pending_session_without_runs(db):
    db.write_sync(create_session, "s")
    stopped = db.write_sync(runs.stop_session, "s")
    assert stopped.reply["status"] == "stopped" and stopped.session.status == "stopped"
    with pytest.raises(NotFound):
        db.write_sync(runs.stop_session, "ghost")


# -- callbacks ----------------------------------------------------------------------------


def finished(db, session_id, **fields):
    db.write_sync(create_session, session_id, **fields)
    db.write_sync(update_session, session_id, status="finished")


def callback_runs(db, session_id):
    return [r for r in db.read_sync(runs.list_runs) if r.session_id == session_id and r.type == "resume_session"]


def test_child_outcome_rules(db):
    outcome = callbacks.Outcome("child", False, "hi")
    assert db.write_sync(callbacks.child_completed, "ghost", outcome) is None
    finished(db, "child")
    assert db.write_sync(callbacks.child_completed, "child", outcome) is None  # its own parent
    finished(db, "parent", agent_name="a", project_dir="/p")
    run = db.write_sync(callbacks.child_completed, "parent", outcome)
    assert (run.session_id, run.agent_name, run.project_dir, run.execution_mode) == ("parent", "a", "/p", "sync")
    assert run.prompt == callbacks.prompt([outcome])
    # In flight: the next outcome waits for the parent's session_stop, even though it is finished.
    assert db.write_sync(callbacks.child_completed, "parent", callbacks.Outcome("c2", True, None)) is None
    assert len(callback_runs(db, "parent")) == 1
    [flushed] = db.write_sync(callbacks.on_session_stop, "parent")
    assert flushed.prompt.startswith('The child agent session "c2" has failed.\n\n## Error\n\nUnknown error')
    # Still in flight (for the flushed run): the next stop clears the mark, with nothing queued.
    assert db.write_sync(callbacks.on_session_stop, "parent") == []
    assert db.write_sync(callbacks.child_completed, "parent", outcome) is not None


def test_queued_outcomes_for_a_running_parent(db):
    db.write_sync(create_session, "parent")
    db.write_sync(update_session, "parent", status="running")
    for child in ("c1", "c2"):
        assert db.write_sync(callbacks.child_completed, "parent", callbacks.Outcome(child, False, None)) is None
    [run] = db.write_sync(callbacks.on_session_stop, "parent")
    assert "### Child: c1 (completed)\n\n(No result available)\n\n---\n\n### Child: c2 (completed)" in run.prompt


def test_session_stop_of_a_callback_child_uses_its_result(db):
    finished(db, "parent")
    db.write_sync(create_session, "child", parent_session_id="parent", execution_mode="async_callback")
    db.write_sync(update_session, "child", status="finished")
    [run] = db.write_sync(callbacks.on_session_stop, "child")
    assert run.session_id == "parent" and "(No result available)" in run.prompt
    db.write_sync(create_session, "sync-child", parent_session_id="parent")
    assert db.write_sync(callbacks.on_session_stop, "sync-child") == []


# -- recovery -----------------------------------------------------------------------------


def in_flight_runs(db):
    """One run in each in-flight state, old and young, claimed by a registered runner."""
    r = register(db)
    runs_by_name = {name: queue(db, name) for name in
                    ("claimed_old", "claimed_young", "claimed_never", "running_old", "running_young", "stopping")}
    old, young = now_ts(-301), now_ts(-299)
    for name, (state, claimed_at, started_at) in {
        "claimed_old": ("claimed", old, None), "claimed_young": ("claimed", young, None),
        "claimed_never": ("claimed", None, None), "running_old": ("running", old, old),
        "running_young": ("running", old, young), "stopping": ("stopping", old, old),
    }.items():
        set_run(db, runs_by_name[name].run_id, status=state, runner_id=r.runner_id,
                claimed_at=claimed_at, started_at=started_at)
    return r, {name: run.run_id for name, run in runs_by_name.items()}


@pytest.mark.parametrize("mode, expected, error", [
    ("stale", {"claimed_old": "pending", "claimed_young": "claimed", "claimed_never": "pending",
               "running_old": "failed", "running_young": "running", "stopping": "stopped"},
     "Coordinator restarted during execution"),
    ("all", {"claimed_old": "pending", "claimed_young": "pending", "claimed_never": "pending",
             "running_old": "failed", "running_young": "failed", "stopping": "stopped"},
     "Coordinator restarted - execution state unknown"),
    ("none", {"claimed_old": "claimed", "claimed_young": "claimed", "claimed_never": "claimed",
              "running_old": "running", "running_young": "running", "stopping": "stopping"}, None),
])
def test_recover_runs(db, mode, expected, error):
    r, ids = in_flight_runs(db)
    counts = db.write_sync(runs.recover_runs, mode)
    got = {name: db.read_sync(runs.get_run, run_id) for name, run_id in ids.items()}
    assert {name: run.status for name, run in got.items()} == expected
    settled = list(expected.values())
    assert counts == {"stops_requeued": 1, "requeued": settled.count("pending"),
                      "failed": settled.count("failed"), "stopped": settled.count("stopped")}
    for run in got.values():
        if run.status == "pending":
            assert (run.runner_id, run.claimed_at) == (None, None)
        if run.status in ("failed", "stopped"):
            assert run.completed_at and run.error == (error if run.status == "failed" else None)
    # The stop is delivered (again) whatever the mode.
    assert db.write_sync(runs.take_stops, r.runner_id) == [ids["stopping"]]
