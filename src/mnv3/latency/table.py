"""Latency lookup tables in a database given by URL: a SQLite file by default, or a PostgreSQL URL
shared by several machines. Entries are keyed by runtime environment and configuration; each batch
of measurements is committed as it is made, so an interrupted build loses nothing."""

from __future__ import annotations

import datetime as dt
import json

from mnv3.latency.protocol import Timing
from mnv3.latency.runtimes import LatencyError

DEFAULT_URL = "sqlite:///mnv3-lut.sqlite"


class LatencyTable:
    """Measured entries and fitted calibrations, per runtime environment."""

    def __init__(self, url: str | None = None) -> None:
        import sqlalchemy as sa
        from sqlalchemy import exc

        self.url = url or DEFAULT_URL
        meta = sa.MetaData()
        self.entries = sa.Table(
            "latency_entries", meta,
            sa.Column("env", sa.String(400), primary_key=True),
            sa.Column("key", sa.String(200), primary_key=True),
            sa.Column("median_ms", sa.Float, nullable=False),
            sa.Column("p10_ms", sa.Float, nullable=False),
            sa.Column("p90_ms", sa.Float, nullable=False),
            sa.Column("runs", sa.Integer, nullable=False),
            sa.Column("measured_at", sa.String(40), nullable=False))
        self.calibrations = sa.Table(
            "latency_calibrations", meta,
            sa.Column("env", sa.String(400), primary_key=True),
            sa.Column("space", sa.String(200), primary_key=True),
            sa.Column("data", sa.Text, nullable=False))
        try:
            self.engine = sa.create_engine(self.url)
            self._create_tables(meta)
        except exc.NoSuchModuleError as e:
            raise LatencyError(f"--db {self.url}: unsupported database URL ({e}); use sqlite:///FILE "
                               "or postgresql+psycopg://USER@HOST/DB") from None
        except exc.ArgumentError as e:
            raise LatencyError(f"--db {self.url}: not a database URL ({e}); use sqlite:///FILE "
                               "or postgresql+psycopg://USER@HOST/DB") from None
        except (exc.OperationalError, exc.InterfaceError) as e:
            first = str(e.orig if getattr(e, "orig", None) else e).splitlines()[0]
            self._raise_for_sqlite_file(first)
            raise LatencyError(f"--db {self.url}: cannot open the table database ({first}); check "
                               "that the server runs and the URL is right") from None
        except (exc.ProgrammingError, exc.IntegrityError) as e:
            first = str(e.orig if getattr(e, "orig", None) else e).splitlines()[0]
            raise LatencyError(f"--db {self.url}: cannot create the tables ({first}); let this database "
                               "user create tables (GRANT CREATE ON SCHEMA public), or create them once as "
                               "a user who may and grant this one SELECT, INSERT, UPDATE, DELETE") from None
        except exc.DatabaseError as e:         # SQLite: "file is not a database"
            first = str(e.orig if getattr(e, "orig", None) else e).splitlines()[0]
            self._raise_for_sqlite_file(first)
            raise LatencyError(f"--db {self.url}: the table database refused to open ({first})") from None
        except ModuleNotFoundError as e:
            raise LatencyError(f"--db {self.url}: its driver is not installed ({e}); for PostgreSQL: "
                               "pip install 'psycopg[binary]'") from None
        self._sa = sa

    def _raise_for_sqlite_file(self, sqlite_says: str) -> None:
        """For a SQLite URL, raise the reason its file cannot be opened: there is no server to check,
        and SQLite itself only says "unable to open database file". The reason is the operating
        system's, from opening (or creating, then removing) the file the way SQLite would."""
        import os
        from pathlib import Path

        from sqlalchemy.engine import make_url

        url = make_url(self.url)
        if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:" \
                or url.database.startswith("file:"):
            return
        path = Path(url.database)
        existed = path.exists()
        reason = sqlite_says
        try:
            fd = os.open(path, os.O_RDWR if existed else os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
        except OSError as e:
            reason = e.strerror or sqlite_says
        else:
            os.close(fd)
            if not existed:
                path.unlink()
        raise LatencyError(f"{self.url}: cannot {'open' if existed else 'create'} the database file {path} "
                           f"({reason}); choose another --db") from None

    def _create_tables(self, meta) -> None:
        create_tables(meta, self.engine)

    @staticmethod
    def _check_length(column, value: str) -> None:
        # PostgreSQL enforces VARCHAR lengths and SQLite ignores them: check here, the same everywhere.
        if len(value) > column.type.length:
            raise LatencyError(f"{column.name} is {len(value)} characters, longer than the table's "
                               f"{column.type.length}: {value[:80]}...")

    def _upsert(self, conn, table, rows: list[dict], replace: bool = True) -> None:
        """Insert rows, replacing those with the same primary key (or, with `replace=False`, keeping
        them), by INSERT ... ON CONFLICT DO UPDATE / DO NOTHING (PostgreSQL and SQLite): two machines
        writing the same keys at once then wait for each other, where delete-then-insert fails on
        the primary key on PostgreSQL."""
        name = self.engine.dialect.name
        if name == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        elif name == "sqlite":
            from sqlalchemy.dialects.sqlite import insert
        else:                                               # no portable upsert: replace in place
            keys = list(table.primary_key.columns)
            for row in rows:
                match = [c == row[c.name] for c in keys]
                if replace:
                    conn.execute(table.delete().where(*match))
                elif conn.execute(self._sa.select(*keys).where(*match)).first() is not None:
                    continue
                conn.execute(self._sa.insert(table), [row])
            return
        stmt = insert(table)
        if not replace:
            conn.execute(stmt.on_conflict_do_nothing(index_elements=list(table.primary_key.columns)), rows)
            return
        stmt = stmt.on_conflict_do_update(
            index_elements=list(table.primary_key.columns),
            set_={c.name: stmt.excluded[c.name] for c in table.columns if not c.primary_key})
        conn.execute(stmt, rows)

    def get(self, env: str, keys: list[str] | None = None) -> dict[str, Timing]:
        sa, t = self._sa, self.entries
        query = sa.select(t).where(t.c.env == env)
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        wanted = None if keys is None else set(keys)
        return {r.key: Timing(r.median_ms, r.p10_ms, r.p90_ms, r.runs) for r in rows
                if wanted is None or r.key in wanted}

    def put(self, env: str, items: list[tuple[str, Timing]], replace: bool = True) -> None:
        """Store measurements in one transaction (replacing older values of the same keys, or with
        `replace=False` keeping them; of a key given twice, the last value)."""
        if not items:
            return
        t = self.entries
        latest = dict(items)
        self._check_length(t.c.env, env)
        for key in latest:
            self._check_length(t.c.key, key)
        now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        # Rows in key order: concurrent writers of overlapping batches lock them in the same order
        # (no deadlock on PostgreSQL).
        rows = [{"env": env, "key": k, "median_ms": v.median_ms, "p10_ms": v.p10_ms, "p90_ms": v.p90_ms,
                 "runs": v.runs, "measured_at": now} for k, v in sorted(latest.items())]
        with self.engine.begin() as conn:
            self._upsert(conn, t, rows, replace)

    def tables(self) -> list[dict]:
        """What the database holds, per environment key: {"env", "entries" (how many), "calibrations"
        (space key -> calibration)}, sorted by environment."""
        sa, t, c = self._sa, self.entries, self.calibrations
        with self.engine.connect() as conn:
            counts = dict(conn.execute(sa.select(t.c.env, sa.func.count()).group_by(t.c.env)).all())
            fitted = conn.execute(sa.select(c.c.env, c.c.space, c.c.data)).all()
        found = {env: {"env": env, "entries": n, "calibrations": {}} for env, n in counts.items()}
        for env, space, data in fitted:
            found.setdefault(env, {"env": env, "entries": 0, "calibrations": {}})["calibrations"][space] = \
                json.loads(data)
        return [found[env] for env in sorted(found)]

    def calibration(self, env: str, space: str) -> dict | None:
        sa, t = self._sa, self.calibrations
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(t.c.data).where(t.c.env == env, t.c.space == space)).first()
        return None if row is None else json.loads(row.data)

    def set_calibration(self, env: str, space: str, data: dict) -> None:
        t = self.calibrations
        self._check_length(t.c.env, env)
        self._check_length(t.c.space, space)
        with self.engine.begin() as conn:
            self._upsert(conn, t, [{"env": env, "space": space, "data": json.dumps(data)}])


def create_tables(meta, engine) -> None:
    """Create the tables unless they exist. Two processes starting on a new database at once both
    find none; the one that loses the race sees the other's tables on its next try."""
    from sqlalchemy import exc

    for attempt in range(3):
        try:
            meta.create_all(engine)
            return
        except (exc.IntegrityError, exc.ProgrammingError, exc.OperationalError) as e:
            state = getattr(e.orig, "sqlstate", None)     # psycopg: unique or duplicate-table
            raced = state in ("23505", "42P07") or "already exists" in str(e.orig)
            if attempt == 2 or not raced:
                raise
