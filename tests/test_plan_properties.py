"""Property-based tests for the three-way planner (hypothesis), plus its bounded-memory invariant."""

from __future__ import annotations

import tracemalloc
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tether.errors import RefusedError
from tether.manifest import Entry, Manifest
from tether.paths import sort_key
from tether.plan import (
    Action,
    Direction,
    Growth,
    MaxDelete,
    Mode,
    Plan,
    PlanOptions,
    Side,
    agreed_base,
    make_plan,
)

# A small universe: nested paths, and "a.b" / "a-b" / "a/b" whose string order differs from
# manifest order. (No path is both a file and a directory prefix of another.)
PATHS = ["a.b", "a/b", "a/c/d", "a-b", "b", "c/d"]
DIGESTS = ["d0", "d1", "d2"]
SIZES = {"d0": 10, "d1": 20, "d2": 30}  # same digest => same size

SETTINGS = settings(max_examples=300, deadline=None, database=None)

entries_st = st.dictionaries(
    st.sampled_from(PATHS),
    st.tuples(st.sampled_from(DIGESTS), st.integers(min_value=0, max_value=2)),
    max_size=len(PATHS),
).map(lambda d: Manifest.from_entries(Entry(p, SIZES[dg], mt, dg) for p, (dg, mt) in d.items()))
modes = st.sampled_from(list(Mode))
directions = st.sampled_from(list(Direction))
prefers = st.sampled_from([None, Side.LOCAL, Side.REMOTE])
max_deletes = st.one_of(
    st.integers(min_value=0, max_value=7).map(lambda n: MaxDelete.parse(str(n))),
    st.sampled_from(["0%", "10%", "33.3%", "50%", "66%", "100%"]).map(MaxDelete.parse),
)
ALL = MaxDelete.parse("100%")


def plan_of(local: Manifest, remote: Manifest, base: Manifest, **opts: object) -> Plan:
    return make_plan(local, remote, base, PlanOptions(**opts))  # type: ignore[arg-type]


def is_safe(plan: Plan) -> bool:
    try:
        plan.check_safe()
    except RefusedError:
        return False
    return True


def apply(plan: Plan, local: Manifest, remote: Manifest) -> tuple[Manifest, Manifest]:
    """Simulate executing a plan: a pure dict update of the destination side."""
    lo, re_ = local.by_path(), remote.by_path()
    for c in plan.changes:
        if c.action == Action.UPLOAD:
            assert c.local is not None
            re_[c.path] = c.local
        elif c.action == Action.DOWNLOAD:
            assert c.remote is not None
            lo[c.path] = c.remote
        elif c.action == Action.DELETE_REMOTE:
            del re_[c.path]
        elif c.action == Action.DELETE_LOCAL:
            del lo[c.path]
    return Manifest.from_entries(lo.values()), Manifest.from_entries(re_.values())


def contents(m: Manifest) -> dict[str, tuple[int, str]]:
    return {e.path: (e.size, e.digest) for e in m}


def sync(
    local: Manifest, remote: Manifest, base: Manifest, **opts: object
) -> tuple[Plan, Manifest, Manifest, Manifest]:
    """Plan; an unsafe plan is refused (nothing changes), else apply it and record the agreed base."""
    plan = plan_of(local, remote, base, **opts)
    if not is_safe(plan):
        return plan, local, remote, base
    new_local, new_remote = apply(plan, local, remote)
    new_base = Manifest.from_entries(agreed_base(new_local, new_remote, base))
    return plan, new_local, new_remote, new_base


# --------------------------------------------------------------------------------------------
# Property 1: safety. No unseen destination change is ever overwritten or deleted.
# --------------------------------------------------------------------------------------------


def unseen_destination_change(dst: Entry | None, src: Entry | None, base: Entry | None) -> bool:
    """The destination changed since the base in a way the source has not seen."""
    if base is None:
        return False  # nothing to judge by: `differs`, an overwrite the user confirms
    if dst is not None:
        return not dst.same_content(base)
    return src is not None and not src.same_content(base)  # deleted at dst, changed at src


@SETTINGS
@given(entries_st, entries_st, entries_st, modes, directions, st.sampled_from(["none", "destination"]))
def test_no_unseen_destination_change_is_overwritten_or_deleted(
    local: Manifest, remote: Manifest, base: Manifest, mode: Mode, direction: Direction, prefer_kind: str
) -> None:
    push = direction == Direction.PUSH
    prefer = None if prefer_kind == "none" else (Side.REMOTE if push else Side.LOCAL)
    plan = plan_of(local, remote, base, direction=direction, mode=mode, prefer=prefer, max_delete=ALL)
    writes = {Action.UPLOAD, Action.DELETE_REMOTE} if push else {Action.DOWNLOAD, Action.DELETE_LOCAL}
    for c in plan.changes:
        if c.action not in writes:
            continue
        dst, src = (c.remote, c.local) if push else (c.local, c.remote)
        # The brief's direct statement ...
        assert dst is None or c.base is None or dst.same_content(c.base), c
        # ... and the stronger one, covering a destination-side delete racing a source change.
        assert not unseen_destination_change(dst, src, c.base), c


@SETTINGS
@given(entries_st, entries_st, entries_st, modes, directions)
def test_unseen_destination_changes_are_refused_without_prefer(
    local: Manifest, remote: Manifest, base: Manifest, mode: Mode, direction: Direction
) -> None:
    push = direction == Direction.PUSH
    plan = plan_of(local, remote, base, direction=direction, mode=mode)
    lo, re_, ba = local.by_path(), remote.by_path(), base.by_path()
    changes = {c.path: c for c in plan.changes}
    for path in PATHS:
        dst, src = (re_.get(path), lo.get(path)) if push else (lo.get(path), re_.get(path))
        same_change_on_both_sides = dst is not None and dst.same_content(src)
        if unseen_destination_change(dst, src, ba.get(path)) and not same_change_on_both_sides:
            assert changes[path].action == Action.REFUSE
    if is_safe(plan):
        assert plan.refused == []


# --------------------------------------------------------------------------------------------
# Property 2: convergence.
# --------------------------------------------------------------------------------------------


@SETTINGS
@given(entries_st, entries_st, entries_st, modes, prefers)
def test_push_then_pull_converges(
    local: Manifest, remote: Manifest, base: Manifest, mode: Mode, prefer: Side | None
) -> None:
    push_plan, local2, remote2, base2 = sync(local, remote, base, mode=mode, prefer=prefer, max_delete=ALL)
    assert contents(local2) == contents(local)  # a push never touches the local side
    uploaded = {c.path for c in push_plan.with_action(Action.UPLOAD)} if is_safe(push_plan) else set()
    for path in uploaded:
        assert contents(remote2)[path] == contents(local)[path]
    for pull_mode in Mode:
        pull = plan_of(local2, remote2, base2, direction=Direction.PULL, mode=pull_mode, prefer=prefer)
        assert uploaded.isdisjoint(c.path for c in pull.changes)
    if not is_safe(push_plan):
        assert (local2, remote2, base2) == (local, remote, base)  # a refused run changes nothing
        return
    # Re-running the same push has nothing left to do.
    again = plan_of(local2, remote2, base2, mode=mode, prefer=prefer, max_delete=ALL)
    assert not again.has_work
    if not push_plan.with_action(Action.REFUSE, Action.SKIP):
        assert again.in_sync


@SETTINGS
@given(entries_st, entries_st, entries_st, modes, prefers)
def test_pull_then_push_converges(
    local: Manifest, remote: Manifest, base: Manifest, mode: Mode, prefer: Side | None
) -> None:
    pull_plan, local2, remote2, base2 = sync(
        local, remote, base, direction=Direction.PULL, mode=mode, prefer=prefer, max_delete=ALL
    )
    assert contents(remote2) == contents(remote)
    downloaded = {c.path for c in pull_plan.with_action(Action.DOWNLOAD)} if is_safe(pull_plan) else set()
    push = plan_of(local2, remote2, base2, direction=Direction.PUSH, prefer=prefer)
    assert downloaded.isdisjoint(c.path for c in push.changes)
    if is_safe(pull_plan):
        again = plan_of(
            local2, remote2, base2, direction=Direction.PULL, mode=mode, prefer=prefer, max_delete=ALL
        )
        assert not again.has_work


@SETTINGS
@given(entries_st, entries_st, entries_st, st.sampled_from([None, Side.LOCAL]))
def test_push_mirror_without_refusals_makes_remote_equal_local(
    local: Manifest, remote: Manifest, base: Manifest, prefer: Side | None
) -> None:
    plan, _, remote2, base2 = sync(local, remote, base, mode=Mode.MIRROR, prefer=prefer, max_delete=ALL)
    assert plan.with_action(Action.SKIP) == []  # mirror skips nothing unless --prefer remote
    if plan.refused or (len(local) == 0 and plan.deletes):
        assert not is_safe(plan)
        return
    assert is_safe(plan)
    assert contents(remote2) == contents(local)
    assert contents(base2) == contents(local)
    for direction in Direction:
        for mode in Mode:
            assert plan_of(local, remote2, base2, direction=direction, mode=mode).in_sync


@SETTINGS
@given(entries_st, entries_st, entries_st)
def test_push_mirror_prefer_remote_differs_from_local_only_where_it_kept_the_remote(
    local: Manifest, remote: Manifest, base: Manifest
) -> None:
    plan, _, remote2, _ = sync(local, remote, base, mode=Mode.MIRROR, prefer=Side.REMOTE, max_delete=ALL)
    assert plan.refused == []
    if len(local) == 0 and plan.deletes:
        assert not is_safe(plan)
        return
    lo, re_, re2 = contents(local), contents(remote), contents(remote2)
    skipped = {c.path for c in plan.with_action(Action.SKIP)}
    for path in set(lo) | set(re2):
        assert re2.get(path) == (re_.get(path) if path in skipped else lo.get(path)), path


@SETTINGS
@given(entries_st, entries_st, entries_st, st.sampled_from([Mode.UPDATE, Mode.MIRROR]))
def test_push_prefer_local_puts_every_local_file_on_the_remote(
    local: Manifest, remote: Manifest, base: Manifest, mode: Mode
) -> None:
    plan = plan_of(local, remote, base, mode=mode, prefer=Side.LOCAL, max_delete=ALL)
    assert plan.refused == []
    _, remote2 = apply(plan, local, remote)
    got = contents(remote2)
    assert all(got.get(path) == value for path, value in contents(local).items())


@SETTINGS
@given(entries_st, entries_st, entries_st, modes, prefers)
def test_a_round_of_push_and_pull_reaches_a_fixed_point(
    local: Manifest, remote: Manifest, base: Manifest, mode: Mode, prefer: Side | None
) -> None:
    push, lo, re_, ba = sync(local, remote, base, mode=mode, prefer=prefer, max_delete=ALL)
    pull, lo, re_, ba = sync(lo, re_, ba, direction=Direction.PULL, mode=mode, prefer=prefer, max_delete=ALL)
    if not (is_safe(push) and is_safe(pull)):
        return  # a refused run changes nothing; the refusal itself is tested elsewhere
    for direction in Direction:
        plan = plan_of(lo, re_, ba, direction=direction, mode=mode, prefer=prefer, max_delete=ALL)
        assert not plan.has_work, plan.changes


# --------------------------------------------------------------------------------------------
# Property 3: symmetry. Swapping sides and directions mirrors every action.
# --------------------------------------------------------------------------------------------

MIRROR_ACTION = {
    Action.UPLOAD: Action.DOWNLOAD,
    Action.DOWNLOAD: Action.UPLOAD,
    Action.DELETE_REMOTE: Action.DELETE_LOCAL,
    Action.DELETE_LOCAL: Action.DELETE_REMOTE,
    Action.REFUSE: Action.REFUSE,
    Action.SKIP: Action.SKIP,
    Action.NONE: Action.NONE,
}
MIRROR_SIDE = {None: None, Side.LOCAL: Side.REMOTE, Side.REMOTE: Side.LOCAL}


@SETTINGS
@given(entries_st, entries_st, entries_st, modes, directions, prefers, max_deletes)
def test_swapping_sides_and_direction_mirrors_the_plan(
    local: Manifest,
    remote: Manifest,
    base: Manifest,
    mode: Mode,
    direction: Direction,
    prefer: Side | None,
    max_delete: MaxDelete,
) -> None:
    other = Direction.PULL if direction == Direction.PUSH else Direction.PUSH
    plan = plan_of(local, remote, base, direction=direction, mode=mode, prefer=prefer, max_delete=max_delete)
    swapped = plan_of(
        remote, local, base, direction=other, mode=mode, prefer=MIRROR_SIDE[prefer], max_delete=max_delete
    )
    assert [c.path for c in plan.changes] == [c.path for c in swapped.changes]
    for a, b in zip(plan.changes, swapped.changes, strict=True):
        assert MIRROR_ACTION[a.action] == b.action, (a, b)
        assert (a.local, a.remote, a.base) == (b.remote, b.local, b.base)
        assert a.bytes == b.bytes
        assert a.overwrites == b.overwrites
    assert (plan.source_files, plan.destination_files) == (swapped.source_files, swapped.destination_files)
    assert plan.unchanged_files == swapped.unchanged_files
    assert is_safe(plan) == is_safe(swapped)


# --------------------------------------------------------------------------------------------
# Property 4: determinism, one change per path, unchanged paths only counted.
# --------------------------------------------------------------------------------------------


@SETTINGS
@given(entries_st, entries_st, entries_st, modes, directions, prefers)
def test_plan_is_deterministic_and_covers_each_path_once(
    local: Manifest, remote: Manifest, base: Manifest, mode: Mode, direction: Direction, prefer: Side | None
) -> None:
    opts = {"direction": direction, "mode": mode, "prefer": prefer}
    plan = plan_of(local, remote, base, **opts)
    # Same result from fresh iterators over the same entries.
    again = make_plan(iter(list(local)), iter(list(remote)), iter(list(base)), PlanOptions(**opts))  # type: ignore[arg-type]
    assert again == plan
    assert again.fingerprint() == plan.fingerprint()

    lo, re_ = contents(local), contents(remote)
    paths = [c.path for c in plan.changes]
    assert len(paths) == len(set(paths))
    assert paths == sorted(paths, key=sort_key)
    union = set(lo) | set(re_) | set(contents(base))
    assert set(paths) <= union
    unchanged = {p for p in union if p in lo and lo[p] == re_.get(p)}
    assert set(paths) == (set(lo) | set(re_)) - unchanged  # paths only in the base vanish
    assert plan.unchanged_files == len(unchanged)
    assert plan.unchanged_bytes == sum(lo[p][0] for p in unchanged)
    assert all(c.action != Action.NONE for c in plan.changes)
    assert (plan.local_files, plan.remote_files) == (len(local), len(remote))
    present = set(lo) | set(re_)
    assert sum(plan.status_counts().values()) == sum(plan.action_counts().values()) == len(present)


# --------------------------------------------------------------------------------------------
# Property 5: the delete budget and the empty source.
# --------------------------------------------------------------------------------------------


@SETTINGS
@given(entries_st, entries_st, entries_st, modes, directions, prefers, max_deletes)
def test_check_safe_bounds_deletes(
    local: Manifest,
    remote: Manifest,
    base: Manifest,
    mode: Mode,
    direction: Direction,
    prefer: Side | None,
    max_delete: MaxDelete,
) -> None:
    plan = plan_of(local, remote, base, direction=direction, mode=mode, prefer=prefer, max_delete=max_delete)
    safe = is_safe(plan)
    if safe:
        assert len(plan.deletes) <= max_delete.limit(plan.destination_files)
        assert not (plan.source_files == 0 and plan.deletes)
        assert plan.refused == []
    if mode == Mode.MIRROR and plan.source_files == 0 and plan.deletes:
        assert not safe
    if mode != Mode.MIRROR:
        assert plan.deletes == []
    if not plan.refused and not plan.deletes:
        assert safe


# --------------------------------------------------------------------------------------------
# Invariant 8: bounded memory. make_plan streams its inputs.
# --------------------------------------------------------------------------------------------

# 100,000 rather than 200,000: tracemalloc slows allocation-heavy code about 5x, and 200,000
# traced entries took 7.5-10 s here. Materialising one input of 100,000 entries takes ~14 MiB,
# all three ~43 MiB; streaming peaks at a few KiB.
N_BIG = 100_000
DIGEST = "0" * 64


def synthetic(n: int) -> Iterator[Entry]:
    """``n`` entries in manifest order, created one at a time."""
    for i in range(n):
        yield Entry(f"d{i // 1000:04d}/f{i % 1000:04d}.bin", 4096, 1, DIGEST)


def test_make_plan_streams_inputs_in_bounded_memory() -> None:
    tracemalloc.start()
    try:
        plan = make_plan(synthetic(N_BIG), synthetic(N_BIG), synthetic(N_BIG), PlanOptions())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert plan.unchanged_files == N_BIG
    assert plan.unchanged_bytes == N_BIG * 4096
    assert (plan.local_files, plan.remote_files) == (N_BIG, N_BIG)
    assert plan.changes == []
    # Well below what holding even one of the three inputs in memory would take.
    assert peak < 4 * 2**20, f"peak {peak / 2**20:.1f} MiB"


def test_make_plan_advances_its_inputs_in_lockstep() -> None:
    """A direct check of streaming: no input is read more than one entry ahead of the others."""
    consumed = [0, 0, 0]
    max_lead = 0

    def tracked(side: int, n: int) -> Iterator[Entry]:
        nonlocal max_lead
        for e in synthetic(n):
            consumed[side] += 1
            max_lead = max(max_lead, max(consumed) - min(consumed))
            yield e

    plan = make_plan(tracked(0, 5000), tracked(1, 5000), tracked(2, 5000), PlanOptions())
    assert consumed == [5000, 5000, 5000]
    assert max_lead <= 1
    assert plan.unchanged_files == 5000


@pytest.mark.parametrize("n", [0, 1, 3])
def test_agreed_base_streams_too(n: int) -> None:
    out = agreed_base(synthetic(n), synthetic(n), synthetic(0))
    assert iter(out) is out  # a generator, not a list
    assert sum(1 for _ in out) == n


# -- append-only ledgers ------------------------------------------------------------------------
growths = st.dictionaries(st.sampled_from(PATHS), st.sampled_from(list(Growth)), max_size=len(PATHS))


@SETTINGS
@given(entries_st, entries_st, entries_st, modes, directions, prefers, growths)
def test_a_ledger_is_only_ever_extended(
    local: Manifest,
    remote: Manifest,
    base: Manifest,
    mode: Mode,
    direction: Direction,
    prefer: Side | None,
    ledgers: dict[str, Growth],
) -> None:
    """Whatever the statuses, mode and --prefer: a ledger whose copies differ is sent only to a
    destination that is a prefix of the source (or, on --prefer, a destination the source is
    longer than after a cut), never deleted by the relation, and a divergence is always refused."""
    plan = make_plan(local, remote, base, PlanOptions(direction, mode, prefer, ALL, ledgers))
    push = direction == Direction.PUSH
    for c in plan.changes:
        growth = ledgers.get(c.path)
        if growth is None or c.local is None or c.remote is None:
            continue
        if growth == Growth.DIVERGED:
            assert c.action == Action.REFUSE
        if c.action in (Action.UPLOAD, Action.DOWNLOAD):
            assert c.action == (Action.UPLOAD if push else Action.DOWNLOAD)
            ahead = Growth.LOCAL_AHEAD if push else Growth.REMOTE_AHEAD
            src, dst = (c.local, c.remote) if push else (c.remote, c.local)
            restored = growth == Growth.REWRITTEN and prefer == (Side.LOCAL if push else Side.REMOTE)
            assert growth == ahead or (restored and src.size > dst.size)
        assert c.action not in (Action.DELETE_LOCAL, Action.DELETE_REMOTE)
