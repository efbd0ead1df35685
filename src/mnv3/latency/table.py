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
            meta.create_all(self.engine)
        except exc.NoSuchModuleError as e:
            raise LatencyError(f"--db {self.url}: unsupported database URL ({e}); use sqlite:///FILE "
                               "or postgresql+psycopg://USER@HOST/DB") from None
        except exc.ArgumentError as e:
            raise LatencyError(f"--db {self.url}: not a database URL ({e}); use sqlite:///FILE "
                               "or postgresql+psycopg://USER@HOST/DB") from None
        except (exc.OperationalError, exc.InterfaceError) as e:
            first = str(e.orig if getattr(e, "orig", None) else e).splitlines()[0]
            raise LatencyError(f"--db {self.url}: cannot open the table database ({first}); check "
                               "that the server runs and the URL is right") from None
        except ModuleNotFoundError as e:
            raise LatencyError(f"--db {self.url}: its driver is not installed ({e}); for PostgreSQL: "
                               "pip install 'psycopg[binary]'") from None
        self._sa = sa

    def get(self, env: str, keys: list[str] | None = None) -> dict[str, Timing]:
        sa, t = self._sa, self.entries
        query = sa.select(t).where(t.c.env == env)
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        wanted = None if keys is None else set(keys)
        return {r.key: Timing(r.median_ms, r.p10_ms, r.p90_ms, r.runs) for r in rows
                if wanted is None or r.key in wanted}

    def put(self, env: str, items: list[tuple[str, Timing]]) -> None:
        """Store measurements in one transaction (replacing older values of the same keys)."""
        if not items:
            return
        sa, t = self._sa, self.entries
        now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        with self.engine.begin() as conn:
            conn.execute(t.delete().where(t.c.env == env, t.c.key.in_([k for k, _ in items])))
            conn.execute(sa.insert(t), [
                {"env": env, "key": k, "median_ms": v.median_ms, "p10_ms": v.p10_ms, "p90_ms": v.p90_ms,
                 "runs": v.runs, "measured_at": now} for k, v in items])

    def calibration(self, env: str, space: str) -> dict | None:
        sa, t = self._sa, self.calibrations
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(t.c.data).where(t.c.env == env, t.c.space == space)).first()
        return None if row is None else json.loads(row.data)

    def set_calibration(self, env: str, space: str, data: dict) -> None:
        sa, t = self._sa, self.calibrations
        with self.engine.begin() as conn:
            conn.execute(t.delete().where(t.c.env == env, t.c.space == space))
            conn.execute(sa.insert(t).values(env=env, space=space, data=json.dumps(data)))
