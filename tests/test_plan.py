"""Unit tests for the three-way planner (src/tether/plan.py): statuses, actions, safety checks."""

from __future__ import annotations

import hashlib

import pytest

from tether.errors import ExitCode, RefusedError, UsageError
from tether.manifest import Entry, Manifest
from tether.paths import sort_key
from tether.plan import (
    Action,
    Change,
    Direction,
    MaxDelete,
    Mode,
    Plan,
    PlanOptions,
    Side,
    Status,
    agreed_base,
    classify,
    decide,
    make_plan,
    merge3,
    replan,
)

PUSH, PULL = Direction.PUSH, Direction.PULL


def ent(path: str, content: str = "A", mtime_ns: int = 0) -> Entry:
    """An entry whose size and digest follow from ``content`` (same content => same entry data)."""
    data = content.encode()
    return Entry(path, len(data), mtime_ns, hashlib.sha256(data).hexdigest())


def man(*entries: Entry) -> Manifest:
    return Manifest.from_entries(entries)


def plan_for(
    local: list[Entry] | tuple[Entry, ...] = (),
    remote: list[Entry] | tuple[Entry, ...] = (),
    base: list[Entry] | tuple[Entry, ...] = (),
    **opts: object,
) -> Plan:
    return make_plan(man(*local), man(*remote), man(*base), PlanOptions(**opts))  # type: ignore[arg-type]


def only_change(plan: Plan) -> Change:
    assert len(plan.changes) == 1, plan.changes
    return plan.changes[0]


# --------------------------------------------------------------------------------------------
# classify
# --------------------------------------------------------------------------------------------

A, B, C = ent("f", "A"), ent("f", "BB"), ent("f", "CCC")


@pytest.mark.parametrize(
    ("local", "remote", "base", "expected"),
    [
        pytest.param(A, None, None, Status.LOCAL_ONLY, id="local_only"),
        pytest.param(None, A, None, Status.REMOTE_ONLY, id="remote_only"),
        pytest.param(B, A, A, Status.MODIFIED_LOCAL, id="modified_local"),
        pytest.param(A, B, A, Status.MODIFIED_REMOTE, id="modified_remote"),
        pytest.param(None, A, A, Status.DELETED_LOCAL, id="deleted_local"),
        pytest.param(A, None, A, Status.DELETED_REMOTE, id="deleted_remote"),
        pytest.param(B, C, A, Status.CONFLICT, id="conflict_both_modified"),
        pytest.param(B, None, A, Status.CONFLICT, id="conflict_local_modified_remote_deleted"),
        pytest.param(None, B, A, Status.CONFLICT, id="conflict_local_deleted_remote_modified"),
        pytest.param(A, B, None, Status.DIFFERS, id="differs_no_base"),
        pytest.param(A, A, None, Status.UNCHANGED, id="unchanged_no_base"),
        pytest.param(A, A, A, Status.UNCHANGED, id="unchanged"),
        pytest.param(B, B, A, Status.UNCHANGED, id="same_change_on_both_sides"),
        pytest.param(None, None, A, None, id="only_in_base"),
        pytest.param(None, None, None, None, id="nowhere"),
    ],
)
def test_classify(
    local: Entry | None, remote: Entry | None, base: Entry | None, expected: Status | None
) -> None:
    assert classify(local, remote, base) == expected


def test_classify_ignores_mtime() -> None:
    old, new = ent("f", "A", mtime_ns=1), ent("f", "A", mtime_ns=999_999_999)
    assert classify(old, new, None) == Status.UNCHANGED
    assert classify(new, old, old) == Status.UNCHANGED
    # A touched file whose content is the base content is not "modified".
    assert classify(new, ent("f", "BB"), old) == Status.MODIFIED_REMOTE
    assert classify(new, None, old) == Status.DELETED_REMOTE


def test_classify_compares_size_and_digest() -> None:
    a = Entry("f", 1, 0, "d")
    same_digest_other_size = Entry("f", 2, 0, "d")
    same_size_other_digest = Entry("f", 1, 0, "e")
    assert classify(a, same_digest_other_size, None) == Status.DIFFERS
    assert classify(a, same_size_other_digest, None) == Status.DIFFERS
    assert classify(a, same_digest_other_size, a) == Status.MODIFIED_REMOTE


def test_plan_ignores_mtime_only_changes() -> None:
    local = [ent("x", "A", mtime_ns=5), ent("y", "B", mtime_ns=7)]
    remote = [ent("x", "A", mtime_ns=1), ent("y", "B", mtime_ns=2)]
    base = [ent("x", "A", mtime_ns=3)]
    for direction in Direction:
        plan = plan_for(local, remote, base, direction=direction, mode=Mode.MIRROR)
        assert plan.in_sync
        assert plan.unchanged_files == 2


# --------------------------------------------------------------------------------------------
# The action table: status x direction x mode x prefer
# --------------------------------------------------------------------------------------------

# Each case: (local, remote, base) contents for one path "f" (None = absent), the status it has,
# and the expected push action per mode (new, update, mirror) and per prefer (None, local, remote).
# Codes: U = send (upload on push), D = delete at the destination, R = refuse, S = skip, N = none.
CASES: dict[str, tuple[tuple[str | None, str | None, str | None], Status, str]] = {
    #                          local  remote  base        status                 new update mirror
    "unchanged": (("A", "A", "A"), Status.UNCHANGED, "NNN NNN NNN"),
    "local_only": (("A", None, None), Status.LOCAL_ONLY, "UUU UUU UUU"),
    "remote_only": ((None, "A", None), Status.REMOTE_ONLY, "SSS SSS DDD"),
    "modified_local": (("B", "A", "A"), Status.MODIFIED_LOCAL, "SSS UUU UUU"),
    "modified_remote": (("A", "B", "A"), Status.MODIFIED_REMOTE, "RSS RUS RUS"),
    "deleted_local": ((None, "A", "A"), Status.DELETED_LOCAL, "SSS SSS DDD"),
    "deleted_remote": (("A", None, "A"), Status.DELETED_REMOTE, "SUS SUS UUU"),
    "conflict_both_modified": (("B", "C", "A"), Status.CONFLICT, "RSS RUS RUS"),
    "conflict_local_modified_remote_deleted": (("B", None, "A"), Status.CONFLICT, "RUS RUS RUS"),
    "conflict_local_deleted_remote_modified": ((None, "B", "A"), Status.CONFLICT, "RSS RSS RDS"),
    "differs": (("A", "B", None), Status.DIFFERS, "SSS UUS UUS"),
}
MODES = [Mode.NEW, Mode.UPDATE, Mode.MIRROR]
PREFERS: list[Side | None] = [None, Side.LOCAL, Side.REMOTE]
SWAP_STATUS = {
    Status.LOCAL_ONLY: Status.REMOTE_ONLY,
    Status.REMOTE_ONLY: Status.LOCAL_ONLY,
    Status.MODIFIED_LOCAL: Status.MODIFIED_REMOTE,
    Status.MODIFIED_REMOTE: Status.MODIFIED_LOCAL,
    Status.DELETED_LOCAL: Status.DELETED_REMOTE,
    Status.DELETED_REMOTE: Status.DELETED_LOCAL,
    Status.CONFLICT: Status.CONFLICT,
    Status.DIFFERS: Status.DIFFERS,
    Status.UNCHANGED: Status.UNCHANGED,
}
SWAP_SIDE = {None: None, Side.LOCAL: Side.REMOTE, Side.REMOTE: Side.LOCAL}


def _code_action(code: str, direction: Direction) -> Action:
    push = direction == PUSH
    return {
        "U": Action.UPLOAD if push else Action.DOWNLOAD,
        "D": Action.DELETE_REMOTE if push else Action.DELETE_LOCAL,
        "R": Action.REFUSE,
        "S": Action.SKIP,
        "N": Action.NONE,
    }[code]


def _entries(contents: tuple[str | None, ...]) -> list[list[Entry]]:
    return [[] if c is None else [ent("f", c)] for c in contents]


TABLE = [
    pytest.param(name, mode, prefer, id=f"{name}-{mode}-{prefer}")
    for name in CASES
    for mode in MODES
    for prefer in PREFERS
]


def _check_case(direction: Direction, name: str, mode: Mode, prefer: Side | None) -> None:
    (lo, re_, ba), status, codes = CASES[name]
    code = codes.split()[MODES.index(mode)][PREFERS.index(prefer)]
    if direction == PUSH:
        local, remote, base = _entries((lo, re_, ba))
        opts_prefer, want_status = prefer, status
    else:  # the mirror image: swap the sides and the preference
        local, remote, base = _entries((re_, lo, ba))
        opts_prefer, want_status = SWAP_SIDE[prefer], SWAP_STATUS[status]
    plan = plan_for(local, remote, base, direction=direction, mode=mode, prefer=opts_prefer)
    want = _code_action(code, direction)
    if want == Action.NONE:
        assert plan.changes == []
        assert plan.unchanged_files == 1
        return
    change = only_change(plan)
    assert (change.status, change.action) == (want_status, want), change.reason
    assert change.reason


@pytest.mark.parametrize(("name", "mode", "prefer"), TABLE)
def test_action_table_push(name: str, mode: Mode, prefer: Side | None) -> None:
    _check_case(PUSH, name, mode, prefer)


@pytest.mark.parametrize(("name", "mode", "prefer"), TABLE)
def test_action_table_pull(name: str, mode: Mode, prefer: Side | None) -> None:
    _check_case(PULL, name, mode, prefer)


# Explicit spot checks of the rules in the spec, written out in full for each direction.


@pytest.mark.parametrize("mode", [Mode.NEW, Mode.UPDATE, Mode.MIRROR])
def test_push_uploads_local_only(mode: Mode) -> None:
    change = only_change(plan_for([ent("f")], [], [], direction=PUSH, mode=mode))
    assert (change.status, change.action) == (Status.LOCAL_ONLY, Action.UPLOAD)
    assert not change.overwrites


@pytest.mark.parametrize("mode", [Mode.UPDATE, Mode.MIRROR])
def test_push_uploads_modified_local(mode: Mode) -> None:
    change = only_change(plan_for([B], [A], [A], direction=PUSH, mode=mode))
    assert (change.status, change.action) == (Status.MODIFIED_LOCAL, Action.UPLOAD)
    assert change.overwrites


@pytest.mark.parametrize("mode", [Mode.NEW, Mode.UPDATE, Mode.MIRROR])
def test_pull_downloads_remote_only(mode: Mode) -> None:
    change = only_change(plan_for([], [ent("f")], [], direction=PULL, mode=mode))
    assert (change.status, change.action) == (Status.REMOTE_ONLY, Action.DOWNLOAD)


@pytest.mark.parametrize("mode", [Mode.UPDATE, Mode.MIRROR])
def test_pull_downloads_modified_remote(mode: Mode) -> None:
    change = only_change(plan_for([A], [B], [A], direction=PULL, mode=mode))
    assert (change.status, change.action) == (Status.MODIFIED_REMOTE, Action.DOWNLOAD)


@pytest.mark.parametrize("direction", [PUSH, PULL])
@pytest.mark.parametrize("prefer", PREFERS)
def test_mode_new_never_replaces_an_existing_file(direction: Direction, prefer: Side | None) -> None:
    local = [ent("same"), ent("differs", "L"), ent("mod_l", "L2"), ent("mod_r", "R1"), ent("both", "L2")]
    remote = [ent("same"), ent("differs", "R"), ent("mod_l", "R1"), ent("mod_r", "R2"), ent("both", "R2")]
    base = [ent("mod_l", "R1"), ent("mod_r", "R1"), ent("both", "B")]
    plan = plan_for(local, remote, base, direction=direction, mode=Mode.NEW, prefer=prefer)
    assert plan.transfers == []
    assert plan.deletes == []
    assert plan.overwrites == []


def test_mode_new_creates_missing_files_only() -> None:
    local = [ent("new"), ent("exists", "L")]
    remote = [ent("exists", "R")]
    plan = plan_for(local, remote, [], direction=PUSH, mode=Mode.NEW)
    assert [(c.path, c.action) for c in plan.changes] == [("exists", Action.SKIP), ("new", Action.UPLOAD)]


@pytest.mark.parametrize("mode", [Mode.NEW, Mode.UPDATE])
def test_only_mirror_deletes(mode: Mode) -> None:
    for direction in (PUSH, PULL):
        plan = plan_for(
            [ent("lo"), ent("keep")],
            [ent("re"), ent("keep"), ent("gone_l")],
            [ent("keep"), ent("gone_l")],
            direction=direction,
            mode=mode,
            max_delete=MaxDelete.parse("100%"),
        )
        assert plan.deletes == []


def test_push_mirror_deletes_remote_only_and_deleted_local() -> None:
    plan = plan_for(
        [ent("keep")],
        [ent("keep"), ent("remote_only"), ent("deleted_local")],
        [ent("keep"), ent("deleted_local")],
        direction=PUSH,
        mode=Mode.MIRROR,
    )
    assert {(c.path, c.status, c.action) for c in plan.changes} == {
        ("remote_only", Status.REMOTE_ONLY, Action.DELETE_REMOTE),
        ("deleted_local", Status.DELETED_LOCAL, Action.DELETE_REMOTE),
    }


def test_pull_mirror_deletes_local_only_and_deleted_remote() -> None:
    plan = plan_for(
        [ent("keep"), ent("local_only"), ent("deleted_remote")],
        [ent("keep")],
        [ent("keep"), ent("deleted_remote")],
        direction=PULL,
        mode=Mode.MIRROR,
    )
    assert {(c.path, c.status, c.action) for c in plan.changes} == {
        ("local_only", Status.LOCAL_ONLY, Action.DELETE_LOCAL),
        ("deleted_remote", Status.DELETED_REMOTE, Action.DELETE_LOCAL),
    }


@pytest.mark.parametrize("mode", MODES)
def test_unseen_destination_change_is_refused_without_prefer(mode: Mode) -> None:
    # push: modified_remote and the three conflicts are refused
    push = plan_for(
        [ent("mr", "A"), ent("c1", "L"), ent("c2", "L")],
        [ent("mr", "R"), ent("c1", "R"), ent("c3", "R")],
        [ent("mr", "A"), ent("c1", "A"), ent("c2", "A"), ent("c3", "A")],
        direction=PUSH,
        mode=mode,
    )
    assert {c.path: c.action for c in push.changes} == dict.fromkeys(["mr", "c1", "c2", "c3"], Action.REFUSE)
    assert push.refused == push.changes
    # pull: modified_local and the three conflicts are refused
    pull = plan_for(
        [ent("ml", "L"), ent("c1", "L"), ent("c2", "L")],
        [ent("ml", "A"), ent("c1", "R"), ent("c3", "R")],
        [ent("ml", "A"), ent("c1", "A"), ent("c2", "A"), ent("c3", "A")],
        direction=PULL,
        mode=mode,
    )
    assert {c.path: c.action for c in pull.changes} == dict.fromkeys(["ml", "c1", "c2", "c3"], Action.REFUSE)


def test_prefer_destination_keeps_it_and_prefer_source_replaces_it() -> None:
    local, remote, base = [ent("f", "L")], [ent("f", "R")], [ent("f", "A")]
    kept = only_change(plan_for(local, remote, base, direction=PUSH, prefer=Side.REMOTE))
    assert (kept.status, kept.action) == (Status.CONFLICT, Action.SKIP)
    replaced = only_change(plan_for(local, remote, base, direction=PUSH, prefer=Side.LOCAL))
    assert (replaced.action, replaced.overwrites) == (Action.UPLOAD, True)
    kept = only_change(plan_for(local, remote, base, direction=PULL, prefer=Side.LOCAL))
    assert kept.action == Action.SKIP
    replaced = only_change(plan_for(local, remote, base, direction=PULL, prefer=Side.REMOTE))
    assert (replaced.action, replaced.overwrites) == (Action.DOWNLOAD, True)


@pytest.mark.parametrize("direction", [PUSH, PULL])
def test_differs_is_an_overwrite_in_update_and_mirror_and_skipped_in_new(direction: Direction) -> None:
    send = Action.UPLOAD if direction == PUSH else Action.DOWNLOAD
    for mode, want in [(Mode.NEW, Action.SKIP), (Mode.UPDATE, send), (Mode.MIRROR, send)]:
        change = only_change(plan_for([ent("f", "L")], [ent("f", "R")], [], direction=direction, mode=mode))
        assert (change.status, change.action) == (Status.DIFFERS, want)
        assert change.overwrites == (want == send)


def test_decide_directly() -> None:
    opts = PlanOptions(direction=PUSH, mode=Mode.UPDATE)
    action, reason = decide(Status.LOCAL_ONLY, opts, local_exists=True, remote_exists=False)
    assert action == Action.UPLOAD
    assert "local" in reason
    action, _ = decide(Status.MODIFIED_REMOTE, opts, local_exists=True, remote_exists=True)
    assert action == Action.REFUSE
    pull = PlanOptions(direction=PULL, mode=Mode.MIRROR)
    assert decide(Status.LOCAL_ONLY, pull, local_exists=True, remote_exists=False)[0] == Action.DELETE_LOCAL
    assert decide(Status.UNCHANGED, pull, local_exists=True, remote_exists=True)[0] == Action.NONE


# --------------------------------------------------------------------------------------------
# Change.overwrites and Change.bytes
# --------------------------------------------------------------------------------------------


def _change(action: Action, local: Entry | None, remote: Entry | None) -> Change:
    return Change("f", Status.DIFFERS, action, local, remote, None, "r")


def test_change_overwrites() -> None:
    lo, re_ = ent("f", "L"), ent("f", "RR")
    assert _change(Action.UPLOAD, lo, re_).overwrites
    assert not _change(Action.UPLOAD, lo, None).overwrites
    assert _change(Action.DOWNLOAD, lo, re_).overwrites
    assert not _change(Action.DOWNLOAD, None, re_).overwrites
    for action in (Action.DELETE_REMOTE, Action.DELETE_LOCAL, Action.REFUSE, Action.SKIP, Action.NONE):
        assert not _change(action, lo, re_).overwrites


def test_change_bytes() -> None:
    lo, re_ = Entry("f", 10, 0, "l"), Entry("f", 300, 0, "r")
    assert _change(Action.UPLOAD, lo, re_).bytes == 10
    assert _change(Action.DOWNLOAD, lo, re_).bytes == 300
    assert _change(Action.DELETE_REMOTE, None, re_).bytes == 300
    assert _change(Action.DELETE_LOCAL, lo, None).bytes == 10
    for action in (Action.REFUSE, Action.SKIP, Action.NONE):
        assert _change(action, lo, re_).bytes == 0


# --------------------------------------------------------------------------------------------
# Plan.check_safe and MaxDelete
# --------------------------------------------------------------------------------------------


def test_check_safe_refuses_refused_paths() -> None:
    plan = plan_for(
        [ent("ok", "new"), ent("x", "A"), ent("y", "L")],
        [ent("ok", "A"), ent("x", "R"), ent("y", "R")],
        [ent("ok", "A"), ent("x", "A"), ent("y", "A")],
        direction=PUSH,
    )
    with pytest.raises(RefusedError) as info:
        plan.check_safe()
    assert info.value.exit_code == ExitCode.REFUSED == 3
    assert info.value.paths == ["x", "y"]
    assert "x" in str(info.value)
    assert info.value.hint


def test_check_safe_refusal_message_summarises_many_paths() -> None:
    names = [f"p{i:02d}" for i in range(8)]
    plan = plan_for([ent(n, "A") for n in names], [ent(n, "R") for n in names], [ent(n, "A") for n in names])
    with pytest.raises(RefusedError) as info:
        plan.check_safe()
    assert info.value.paths == names
    assert "and 3 more" in str(info.value)


@pytest.mark.parametrize("direction", [PUSH, PULL])
def test_check_safe_refuses_mirror_from_empty_source(direction: Direction) -> None:
    files = [ent("a"), ent("b/c")]
    local, remote = ([], files) if direction == PUSH else (files, [])
    plan = plan_for(
        local, remote, files, direction=direction, mode=Mode.MIRROR, max_delete=MaxDelete.parse("100%")
    )
    assert len(plan.deletes) == 2
    assert plan.source_files == 0
    with pytest.raises(RefusedError) as info:
        plan.check_safe()
    assert "empty" in str(info.value)
    assert sorted(info.value.paths) == ["a", "b/c"]
    assert info.value.exit_code == 3


def test_check_safe_empty_source_empty_destination_passes() -> None:
    plan_for([], [], [ent("gone")], mode=Mode.MIRROR).check_safe()


def _mirror_delete_plan(n_dest_extra: int, max_delete: MaxDelete | None = None) -> Plan:
    """Push mirror: local has one file, remote has it plus ``n_dest_extra`` files to delete."""
    remote = [ent("keep")] + [ent(f"x{i}") for i in range(n_dest_extra)]
    opts: dict[str, object] = {"direction": PUSH, "mode": Mode.MIRROR}
    if max_delete is not None:
        opts["max_delete"] = max_delete
    return plan_for([ent("keep")], remote, [], **opts)


def test_check_safe_default_max_delete_is_half_of_destination() -> None:
    assert PlanOptions().max_delete == MaxDelete(count=None, percent=50.0)
    # 4 destination files: 2 deletes allowed (floor(4 * 50%)), 3 refused.
    ok = plan_for([ent("k1"), ent("k2")], [ent("k1"), ent("k2"), ent("x1"), ent("x2")], mode=Mode.MIRROR)
    assert (len(ok.deletes), ok.destination_files) == (2, 4)
    ok.check_safe()
    too_many = _mirror_delete_plan(3)
    assert (len(too_many.deletes), too_many.destination_files) == (3, 4)
    with pytest.raises(RefusedError) as info:
        too_many.check_safe()
    assert sorted(info.value.paths) == ["x0", "x1", "x2"]
    assert "limit of 2" in str(info.value)


def test_check_safe_max_delete_count() -> None:
    _mirror_delete_plan(3, MaxDelete.parse("3")).check_safe()
    with pytest.raises(RefusedError):
        _mirror_delete_plan(4, MaxDelete.parse("3")).check_safe()
    with pytest.raises(RefusedError):
        _mirror_delete_plan(1, MaxDelete.parse("0")).check_safe()
    _mirror_delete_plan(9, MaxDelete.parse("100%")).check_safe()


def test_check_safe_passes_plans_without_risk() -> None:
    plan_for([ent("a"), ent("b", "L")], [ent("b", "R")], [ent("b", "R")]).check_safe()
    plan_for([], [], []).check_safe()
    # skipped and unchanged paths are fine, even at the default limit
    plan_for([ent("a")], [ent("a"), ent("b")], [], mode=Mode.UPDATE).check_safe()


@pytest.mark.parametrize(
    ("text", "count", "percent"),
    [
        ("10", 10, None),
        ("0", 0, None),
        (" 7 ", 7, None),
        ("25%", None, 25.0),
        ("0%", None, 0.0),
        ("100%", None, 100.0),
    ],
)
def test_max_delete_parse(text: str, count: int | None, percent: float | None) -> None:
    md = MaxDelete.parse(text)
    assert (md.count, md.percent) == (count, percent)


def test_max_delete_limit_and_str() -> None:
    assert MaxDelete.parse("10").limit(1000) == 10
    assert MaxDelete.parse("10").limit(3) == 10
    assert MaxDelete.parse("25%").limit(10) == 2  # floor
    assert MaxDelete.parse("100%").limit(7) == 7
    assert MaxDelete.parse("12.5%").limit(8) == 1
    assert MaxDelete().limit(5) == 2
    assert [str(MaxDelete.parse(t)) for t in ("10", "25%", "12.5%")] == ["10", "25%", "12.5%"]
    assert str(MaxDelete()) == "50%"


@pytest.mark.parametrize("text", ["", "abc", "-1", "1.5", "%", "101%", "-5%", "nan%", "inf%", "ten", "5%%"])
def test_max_delete_parse_rejects_bad_input(text: str) -> None:
    with pytest.raises(UsageError) as info:
        MaxDelete.parse(text)
    assert info.value.exit_code == ExitCode.USAGE
    assert info.value.hint


# --------------------------------------------------------------------------------------------
# agreed_base
# --------------------------------------------------------------------------------------------


def test_agreed_base() -> None:
    local = [ent("agree", "N", mtime_ns=5), ent("disagree", "L"), ent("new_l"), ent("del_r", "A")]
    remote = [ent("agree", "N", mtime_ns=9), ent("disagree", "R"), ent("new_r")]
    base = [ent("agree", "O"), ent("disagree", "A"), ent("del_r", "A"), ent("gone_both")]
    got = {e.path: e for e in agreed_base(man(*local), man(*remote), man(*base))}
    assert set(got) == {"agree", "disagree", "del_r"}
    assert got["agree"].digest == ent("agree", "N").digest  # both sides agree: the new content
    assert got["disagree"] == ent("disagree", "A")  # still disagree: old base kept
    assert got["del_r"] == ent("del_r", "A")  # one side deleted: old base kept
    # "gone_both" is gone from both sides; new_l/new_r have no agreement and no base


def test_agreed_base_is_sorted_and_streams() -> None:
    local = man(ent("a/b"), ent("a.b"), ent("a-b"))
    out = agreed_base(iter(local), iter(local), iter([]))
    assert not isinstance(out, list)
    paths = [e.path for e in out]
    assert paths == sorted(paths, key=sort_key) == ["a/b", "a-b", "a.b"]


def test_agreed_base_after_push_makes_next_plan_in_sync() -> None:
    local = [ent("a", "L"), ent("b")]
    remote = [ent("a", "L"), ent("b")]
    new_base = list(agreed_base(man(*local), man(*remote), man(ent("a", "OLD"))))
    for direction in Direction:
        plan = make_plan(
            man(*local), man(*remote), new_base, PlanOptions(direction=direction, mode=Mode.MIRROR)
        )
        assert plan.in_sync


# --------------------------------------------------------------------------------------------
# merge3 ordering
# --------------------------------------------------------------------------------------------


def test_sort_key_order_differs_from_string_order() -> None:
    paths = ["a.b", "a/b", "a-b", "a/b/c"]
    assert sorted(paths) == ["a-b", "a.b", "a/b", "a/b/c"]
    assert sorted(paths, key=sort_key) == ["a/b", "a/b/c", "a-b", "a.b"]


def test_merge3_merges_manifest_order() -> None:
    local = man(ent("a.b"), ent("a/b"), ent("z"))
    remote = man(ent("a-b"), ent("a/b/c"), ent("a/b"))
    base = man(ent("a/b/c"), ent("a.b"), ent("a"))
    rows = list(merge3(local, remote, base))
    paths = [r[0] for r in rows]
    assert paths == ["a", "a/b", "a/b/c", "a-b", "a.b", "z"]
    assert len(set(paths)) == len(paths)
    present = {p: (lo is not None, re_ is not None, ba is not None) for p, lo, re_, ba in rows}
    assert present == {
        "a": (False, False, True),
        "a/b": (True, True, False),
        "a/b/c": (False, True, True),
        "a-b": (False, True, False),
        "a.b": (True, False, True),
        "z": (True, False, False),
    }
    for path, lo, re_, ba in rows:
        assert all(e is None or e.path == path for e in (lo, re_, ba))


def test_merge3_empty_inputs() -> None:
    assert list(merge3([], [], [])) == []
    assert [r[0] for r in merge3([], [], man(ent("x")))] == ["x"]


def test_make_plan_mixed_separators() -> None:
    local = [ent("a.b", "L"), ent("a/b", "L"), ent("a-b")]
    remote = [ent("a.b", "R"), ent("a/b", "L"), ent("a/b/c")]
    plan = plan_for(local, remote, [], direction=PUSH, mode=Mode.MIRROR, max_delete=MaxDelete.parse("100%"))
    assert [(c.path, c.status) for c in plan.changes] == [
        ("a/b/c", Status.REMOTE_ONLY),
        ("a-b", Status.LOCAL_ONLY),
        ("a.b", Status.DIFFERS),
    ]
    assert plan.unchanged_files == 1


# --------------------------------------------------------------------------------------------
# fingerprint
# --------------------------------------------------------------------------------------------


def test_fingerprint_changes_when_remote_side_of_acted_on_path_changes() -> None:
    local = [ent("f", "L"), ent("g", "G")]
    before = plan_for(local, [ent("f", "R1")], [])
    after = plan_for(local, [ent("f", "R2")], [])
    # same action on the same path, but the remote copy it would overwrite is different
    assert [(c.path, c.action) for c in before.changes] == [(c.path, c.action) for c in after.changes]
    assert before.fingerprint() != after.fingerprint()
    assert before.fingerprint() == plan_for(local, [ent("f", "R1")], []).fingerprint()


def test_fingerprint_content() -> None:
    local = [ent("up", "L", mtime_ns=1)]
    remote = [ent("up", "R"), ent("skipped")]
    plan = plan_for(local, remote, [])
    assert plan.fingerprint() == [("up", "upload", ent("up", "L").digest, ent("up", "R").digest)]
    # an mtime-only difference does not change the fingerprint
    touched = plan_for([ent("up", "L", mtime_ns=2)], remote, [])
    assert touched.fingerprint() == plan.fingerprint()


def test_fingerprint_changes_when_an_unchanged_path_changes_remotely() -> None:
    base = [ent("f", "A")]
    assert plan_for(base, base, base).fingerprint() == []
    assert plan_for(base, [ent("f", "B")], base).fingerprint() != []


# --------------------------------------------------------------------------------------------
# Counters
# --------------------------------------------------------------------------------------------


def test_plan_counters() -> None:
    local = [
        Entry("same", 5, 0, "s"),
        Entry("up", 7, 0, "u"),
        Entry("mod", 11, 0, "m2"),
        Entry("both", 1, 0, "b"),
    ]
    remote = [
        Entry("same", 5, 9, "s"),
        Entry("mod", 3, 0, "m1"),
        Entry("ronly", 13, 0, "r"),
        Entry("both", 1, 0, "b"),
    ]
    base = [Entry("mod", 3, 0, "m1")]
    plan = make_plan(
        man(*local),
        man(*remote),
        man(*base),
        PlanOptions(mode=Mode.MIRROR, max_delete=MaxDelete.parse("100%")),
    )
    assert (plan.local_files, plan.remote_files) == (4, 4)
    assert (plan.source_files, plan.destination_files) == (4, 4)
    assert (plan.unchanged_files, plan.unchanged_bytes) == (2, 6)
    assert plan.status_counts() == {"local_only": 1, "modified_local": 1, "remote_only": 1, "unchanged": 2}
    assert plan.action_counts() == {"delete_remote": 1, "none": 2, "upload": 2}
    assert plan.action_bytes() == {"delete_remote": 13, "upload": 18}
    assert [c.path for c in plan.transfers] == ["mod", "up"]
    assert [c.path for c in plan.deletes] == ["ronly"]
    assert [c.path for c in plan.overwrites] == ["mod"]
    assert plan.has_work and not plan.in_sync
    assert plan.with_action(Action.UPLOAD) == plan.transfers


def test_plan_counters_pull_and_skips() -> None:
    local = [ent("l1"), ent("l2"), ent("l3")]
    remote = [ent("r1", "RR")]
    plan = plan_for(local, remote, [], direction=PULL, mode=Mode.UPDATE)
    assert (plan.source_files, plan.destination_files) == (1, 3)
    assert plan.action_counts() == {"download": 1, "skip": 3}
    assert plan.status_counts() == {"local_only": 3, "remote_only": 1}
    assert plan.action_bytes() == {"download": 2}  # skips carry no bytes
    assert plan.direction == PULL


def test_plan_with_only_skips_has_no_work() -> None:
    plan = plan_for([], [ent("r")], [], direction=PUSH, mode=Mode.UPDATE)
    assert not plan.has_work
    assert not plan.in_sync
    assert plan.action_counts() == {"skip": 1}
    assert plan.action_bytes() == {}


def test_empty_plan_counters() -> None:
    plan = plan_for([], [], [])
    assert plan.in_sync and not plan.has_work
    assert plan.status_counts() == {} == plan.action_counts() == plan.action_bytes()
    assert (plan.local_files, plan.remote_files, plan.unchanged_files) == (0, 0, 0)


@pytest.mark.parametrize("mode", [Mode.NEW, Mode.UPDATE, Mode.MIRROR])
@pytest.mark.parametrize("prefer", [None, Side.LOCAL, Side.REMOTE])
def test_replan_equals_planning_again(mode: Mode, prefer: Side | None) -> None:
    local = Manifest.from_entries([ent("a", "L"), ent("b", "X"), ent("c", "B")])
    remote = Manifest.from_entries([ent("a", "R"), ent("c", "C"), ent("d", "D")])
    base = Manifest.from_entries([ent("a", "R"), ent("c", "A")])
    push = make_plan(local, remote, base, PlanOptions(direction=PUSH, mode=mode, prefer=prefer))
    pull_options = PlanOptions(direction=PULL, mode=mode, prefer=prefer)
    assert replan(push, pull_options) == make_plan(local, remote, base, pull_options)
