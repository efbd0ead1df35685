"""LatencyTable against a real PostgreSQL server (the session's throwaway server: `pg_server` and
`pg_url` in conftest.py, which says when these tests skip)."""

from __future__ import annotations

import math
import random
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import pytest

from mnv3.latency import LatencyError
from mnv3.latency.protocol import Timing
from mnv3.latency.table import LatencyTable


@pytest.fixture
def tables():
    """Open LatencyTables by URL; their connection pools are closed after the test."""
    opened: list[LatencyTable] = []

    def open_table(url: str) -> LatencyTable:
        table = LatencyTable(url)
        opened.append(table)
        return table

    yield open_table
    for table in opened:
        table.engine.dispose()


@pytest.fixture
def both(pg_url, tmp_path, tables):
    """A SQLite table and a PostgreSQL table, to be given the same operations."""
    return {"sqlite": tables(f"sqlite:///{tmp_path / 'lut.sqlite'}"), "postgresql": tables(pg_url)}


ENV = "AMD EPYC 7B13 64-Core Processor|2c|onnxruntime-1.20.1|t1|b1|r224|float32"
OTHER_ENV = "Apple M2 (Ünïcödé ®)|8c|torch-2.5.0|t4|b1|r160|float32"


def timings(n: int, seed: int = 0) -> list[tuple[str, Timing]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        median = rng.uniform(0.01, 50.0)
        out.append((f"block:s{112 >> (i % 4)}:i{16 + i}:e{3 * 16}:o24:k{3 + 2 * (i % 3)}:st1:d1:se{i % 2}:relu",
                    Timing(median, median * rng.uniform(0.8, 1.0), median * rng.uniform(1.0, 1.3), 50 + i)))
    # values that a lossy float column would change
    out.append(("stem:exact", Timing(0.1 + 0.2, 1 / 3, math.pi * 1e6, 2 ** 31 - 1)))
    out.append(("head:tiny", Timing(5e-324, 2.2250738585072014e-308, 1.7976931348623157e308, 50)))
    return out


def count_rows(table: LatencyTable, env: str | None = None) -> int:
    import sqlalchemy as sa

    query = sa.select(sa.func.count()).select_from(table.entries)
    if env is not None:
        query = query.where(table.entries.c.env == env)
    with table.engine.connect() as conn:
        return conn.execute(query).scalar_one()


# -- the same answers as SQLite -----------------------------------------------------------------------

def test_server_is_postgresql(pg_url, tables):
    import sqlalchemy as sa

    table = tables(pg_url)
    assert table.engine.dialect.name == "postgresql"
    with table.engine.connect() as conn:
        version = conn.execute(sa.text("show server_version")).scalar_one()
        kinds = dict(conn.execute(sa.text(
            "select column_name, data_type from information_schema.columns "
            "where table_name = 'latency_entries'")).all())
    assert version and kinds["median_ms"] == "double precision"     # not a 4-byte real


def test_entries_round_trip_like_sqlite(both):
    items = timings(40)
    for table in both.values():
        table.put(ENV, items[:25])
        table.put(ENV, items[25:])
        table.put(OTHER_ENV, items[:3])
    sqlite, pg = both["sqlite"], both["postgresql"]
    assert pg.get(ENV) == sqlite.get(ENV) == dict(items)                  # exact floats, every key
    assert pg.get(OTHER_ENV) == sqlite.get(OTHER_ENV) == dict(items[:3])  # non-ASCII env kept
    wanted = [items[5][0], items[-1][0], "block:not-there"]
    assert pg.get(ENV, wanted) == sqlite.get(ENV, wanted) == {k: v for k, v in items if k in wanted}
    assert pg.get(ENV, []) == sqlite.get(ENV, []) == {}
    assert pg.get("no such env") == sqlite.get("no such env") == {}
    assert count_rows(pg) == count_rows(sqlite) == len(items) + 3


def test_put_existing_entries_is_idempotent_and_replaces(both):
    items = timings(10)
    newer = Timing(1.5, 1.25, 2.0, 60)
    for table in both.values():
        table.put(ENV, items)
        table.put(ENV, items)                                              # the same batch again
        table.put(ENV, [])                                                 # nothing: no-op
        table.put(ENV, [(items[0][0], newer), ("stem:new", newer)])       # one old key, one new
        table.put(ENV, [("head:twice", items[1][1]), ("head:twice", newer)])  # the last one counts
    expected = {**dict(items), items[0][0]: newer, "stem:new": newer, "head:twice": newer}
    for table in both.values():
        assert table.get(ENV) == expected
        assert count_rows(table) == len(items) + 2                         # no duplicate rows


def test_put_without_replace_keeps_the_first_value(both):
    """The reference entry that fixes a table's units: the first writer wins, on both databases."""
    first, second = Timing(1.0, 0.9, 1.1, 50), Timing(2.0, 1.8, 2.2, 50)
    for table in both.values():
        table.put(ENV, [("block:ref", first)], replace=False)
        table.put(ENV, [("block:ref", second), ("block:new", second)], replace=False)
        assert table.get(ENV) == {"block:ref": first, "block:new": second}


def test_repeats_are_not_stored_on_either(both):
    t = Timing(1.0, 0.9, 1.1, 50, repeats=2)
    for table in both.values():
        table.put(ENV, [("k", t)])
        assert table.get(ENV)["k"] == Timing(1.0, 0.9, 1.1, 50, repeats=0)


def test_calibrations_like_sqlite(both):
    data = {"a": 0.1 + 0.2, "b": -1e-9, "c": 0.25, "n": 12, "seed": 1234}
    for table in both.values():
        assert table.calibration(ENV, "space-1") is None
        table.set_calibration(ENV, "space-1", data)
        table.set_calibration(ENV, "space-1", data)                        # idempotent
        table.set_calibration(ENV, "space-2", {"a": 1.0, "b": 0.0})
        table.set_calibration(ENV, "space-2", {"a": 2.0, "b": 0.5})       # replaced
    for table in both.values():
        assert table.calibration(ENV, "space-1") == data
        assert table.calibration(ENV, "space-2") == {"a": 2.0, "b": 0.5}
        assert table.calibration(OTHER_ENV, "space-1") is None


def test_over_long_keys_are_refused_on_both(both):
    """VARCHAR lengths are enforced by PostgreSQL and ignored by SQLite: the table checks them itself,
    so that a long name fails the same way everywhere, before anything is written."""
    for table in both.values():
        with pytest.raises(LatencyError, match="env"):
            table.put("x" * 401, [("k", Timing(1.0, 1.0, 1.0, 50))])
        with pytest.raises(LatencyError, match="key"):
            table.put(ENV, [("ok", Timing(1.0, 1.0, 1.0, 50)), ("k" * 201, Timing(1.0, 1.0, 1.0, 50))])
        with pytest.raises(LatencyError, match="space"):
            table.set_calibration(ENV, "s" * 201, {"a": 1.0})
        assert table.get(ENV) == {} and count_rows(table) == 0
        table.put("e" * 400, [("k" * 200, Timing(1.0, 1.0, 1.0, 50))])     # the limits themselves fit
        assert table.get("e" * 400) == {"k" * 200: Timing(1.0, 1.0, 1.0, 50)}


# -- a shared table: reopening, several machines ----------------------------------------------------

def test_reopen_resumes_from_the_server(pg_url, tables):
    items = timings(12)
    first = tables(pg_url)
    first.put(ENV, items[:6])
    first.set_calibration(ENV, "space", {"a": 1.0, "b": 0.0})
    first.engine.dispose()                                                 # the first run is gone
    again = tables(pg_url)                                                 # tables exist: reused
    assert again.get(ENV) == dict(items[:6])
    have = again.get(ENV, [k for k, _ in items])
    again.put(ENV, [(k, v) for k, v in items if k not in have])            # what build_table does
    assert again.get(ENV) == dict(items) and count_rows(again) == len(items)
    assert again.calibration(ENV, "space") == {"a": 1.0, "b": 0.0}


def test_two_machines_share_one_database(pg_url, tables):
    a, b = tables(pg_url), tables(pg_url)                                 # both open before writing
    items = timings(20)
    a.put(ENV, items[:10])
    assert b.get(ENV) == dict(items[:10])
    b.put(ENV, items[10:])
    b.put(OTHER_ENV, items[:2])
    assert a.get(ENV) == b.get(ENV) == dict(items)
    assert a.get(OTHER_ENV) == dict(items[:2])
    b.set_calibration(ENV, "space", {"a": 1.1, "b": 0.2})
    assert a.calibration(ENV, "space") == {"a": 1.1, "b": 0.2}


def _blocked_on_lock(server, database: str, timeout: float = 20.0) -> None:
    """Wait until some session of `database` waits for a lock held by another transaction."""
    import sqlalchemy as sa

    deadline = time.monotonic() + timeout
    with server.admin.connect() as conn:
        while time.monotonic() < deadline:
            waiting = conn.execute(sa.text(
                "select count(*) from pg_stat_activity where datname = :db and wait_event_type = 'Lock'"),
                {"db": database}).scalar_one()
            if waiting:
                return
            time.sleep(0.02)
    raise AssertionError("the second writer never waited for the first")


def _in_thread(fn) -> Future:
    """Run fn on a thread of its own: future.result() is its value, or raises its error."""
    pool = ThreadPoolExecutor(1)
    try:
        return pool.submit(fn)
    finally:
        pool.shutdown(wait=False)


def test_two_machines_write_the_same_entries_at_once(pg_server, tables):
    """Two machines of the same kind (same env key) measuring the same parts: the second writer finds
    the first one's uncommitted rows and must end up replacing them, not fail on the primary key."""
    import sqlalchemy as sa

    database = pg_server.new_database()
    url = pg_server.url(database)
    a, b = tables(url), tables(url)
    items = timings(6)
    newer = [(k, Timing(v.median_ms * 2, v.p10_ms * 2, v.p90_ms * 2, v.runs)) for k, v in items]
    for existing in ([], items):                       # new keys, then keys already in the table
        if existing:
            a.put(ENV, existing)
        with a.engine.connect() as conn:               # machine A, in the middle of its put
            trans = conn.begin()
            conn.execute(a.entries.delete().where(a.entries.c.env == ENV))
            conn.execute(sa.insert(a.entries), [
                {"env": ENV, "key": k, "median_ms": v.median_ms, "p10_ms": v.p10_ms, "p90_ms": v.p90_ms,
                 "runs": v.runs, "measured_at": "now"} for k, v in items])
            b_put = _in_thread(lambda: b.put(ENV, newer))              # machine B writes the same keys
            _blocked_on_lock(pg_server, database)
            trans.commit()
        b_put.result(timeout=30)
        assert a.get(ENV) == b.get(ENV) == dict(newer)                # the last writer wins
        assert count_rows(a) == len(items)


def test_two_machines_calibrate_at_once(pg_server, tables):
    import sqlalchemy as sa

    database = pg_server.new_database()
    url = pg_server.url(database)
    a, b = tables(url), tables(url)
    with a.engine.connect() as conn:
        trans = conn.begin()
        conn.execute(sa.insert(a.calibrations).values(env=ENV, space="space", data='{"a": 1.0, "b": 0.0}'))
        b_set = _in_thread(lambda: b.set_calibration(ENV, "space", {"a": 2.0, "b": 0.0}))
        _blocked_on_lock(pg_server, database)
        trans.commit()
    b_set.result(timeout=30)
    assert a.calibration(ENV, "space") == {"a": 2.0, "b": 0.0}


def test_two_machines_create_the_tables_at_once(pg_server, tables):
    """Both find no tables and create them: the second must use the first one's, not fail."""
    import sqlalchemy as sa

    database = pg_server.new_database()
    url = pg_server.url(database)
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:                 # machine A, creating the tables
            trans = conn.begin()
            conn.execute(sa.text(
                "create table latency_entries (env varchar(400), key varchar(200), median_ms float not null, "
                "p10_ms float not null, p90_ms float not null, runs integer not null, "
                "measured_at varchar(40) not null, primary key (env, key))"))
            b_open = _in_thread(lambda: tables(url))
            _blocked_on_lock(pg_server, database)
            trans.commit()
    finally:
        engine.dispose()
    table = b_open.result(timeout=30)
    table.put(ENV, timings(2))
    assert table.get(ENV) == dict(timings(2))


def test_concurrent_writers_stress(pg_url, tables):
    """Four machines putting overlapping batches as fast as they can: no errors, one row per key."""
    writers = [tables(pg_url) for _ in range(4)]
    items = timings(30)
    barrier = threading.Barrier(len(writers))

    def work(i: int, table: LatencyTable) -> None:
        rng = random.Random(i)
        barrier.wait(10)
        for _ in range(15):
            table.put(ENV, rng.sample(items, 12))

    for future in [_in_thread(lambda i=i, t=t: work(i, t)) for i, t in enumerate(writers)]:
        future.result(timeout=60)                                          # raises a writer's error
    got = writers[0].get(ENV)
    assert set(got) <= set(dict(items)) and count_rows(writers[0]) == len(got)


# -- PostgreSQL's own refusals -----------------------------------------------------------------------

def test_user_without_create_privilege(pg_server, tables):
    """PostgreSQL 15 lets only the owner create tables in `public`: a plain user gets a LatencyError
    that says so, and once the owner made the tables, the same user can read and write them."""
    import sqlalchemy as sa

    database = pg_server.new_database()
    with pg_server.admin.connect() as conn:
        conn.execute(sa.text("do $$ begin if not exists (select from pg_roles where rolname = 'machine') "
                             "then create role machine login; end if; end $$"))
    owner_engine = sa.create_engine(pg_server.url(database), isolation_level="AUTOCOMMIT")
    try:
        with owner_engine.connect() as conn:
            conn.execute(sa.text("revoke create on schema public from public"))
        with pytest.raises(LatencyError, match="cannot create the tables.*permission denied"):
            tables(pg_server.url(database, user="machine"))
        owner = tables(pg_server.url(database))
        owner.put(ENV, timings(3))
        with owner_engine.connect() as conn:
            conn.execute(sa.text("grant select, insert, update, delete on all tables in schema public "
                                 "to machine"))
    finally:
        owner_engine.dispose()
    machine = tables(pg_server.url(database, user="machine"))
    assert machine.get(ENV) == dict(timings(3))
    machine.put(ENV, timings(5))
    machine.set_calibration(ENV, "space", {"a": 1.0})
    assert owner.get(ENV) == dict(timings(5)) and owner.calibration(ENV, "space") == {"a": 1.0}


def test_missing_database_is_a_latency_error(pg_server):
    with pytest.raises(LatencyError, match="cannot open"):
        LatencyTable(pg_server.url("no_such_database"))


# -- the builder and the predictor on the server -------------------------------------------------------

def test_build_resume_and_predict_on_postgresql(pg_url, tables):
    """mnv3's own use: build a (tiny) table on the server, lose some entries, resume measuring only
    those; a second machine's Predictor reads it."""
    import mnv3
    from mnv3.latency import get_runtime
    from mnv3.latency.lut import Predictor, build_table, network_parts, space_parts
    from mnv3.space import SearchSpace

    space = SearchSpace(mnv3.preset("mobilenet_v3_small", width=0.35, resolution=32), kernels=(3,),
                        expansion_ratios=(3.0,), se=(False,), activations=("relu",), widths=(1.0,),
                        depth_deltas=(0,))
    runtime = get_runtime("torch")
    table = tables(pg_url)
    first = build_table(space, runtime, table, chunk=4, calibration_networks=2, progress=False,
                        log=lambda s: None)
    keys = {p.key for p in space_parts(space)}
    stored = table.get(first["env"])
    assert first["measured"] == len(keys) and set(stored) == keys
    lost = sorted(keys)[::2]
    with table.engine.begin() as conn:
        conn.execute(table.entries.delete().where(table.entries.c.key.in_(lost)))
    again = build_table(space, runtime, table, chunk=4, calibration_networks=2, progress=False,
                        log=lambda s: None)
    assert again["measured"] == len(lost) and set(table.get(first["env"])) == keys
    assert {k: v for k, v in table.get(first["env"]).items() if k not in lost} == \
        {k: v for k, v in stored.items() if k not in lost}                 # the rest untouched

    predictor = Predictor(space, runtime, tables(pg_url))                  # another machine
    spec = space.sample(random.Random(0))
    entries = table.get(first["env"])
    assert predictor.sum_of_parts(spec) == pytest.approx(sum(entries[p.key].median_ms
                                                             for p in network_parts(spec)))
    assert predictor.calibration == table.calibration(first["env"], space.key()) == again["calibration"]
    assert predictor.predict(spec) > 0
    # what the database holds, as error messages list it: the table and its space, readable back
    held = {t["env"]: t for t in table.tables()}[first["env"]]
    assert held["entries"] == len(keys) and list(held["calibrations"]) == [space.key()]
    assert SearchSpace.from_dict(held["calibrations"][space.key()]["space"]) == space
