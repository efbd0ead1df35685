"""NetAdapt's history in a database (SQLite in the run folder by default, any SQLAlchemy URL such as
PostgreSQL with `--storage`): one row per step (the network kept) and one per proposal (its layer,
channels, spec, predicted latency, fine-tuned accuracy, state). Rows are written as work finishes, so
a killed run resumes from the last finished proposal; proposals are claimed atomically, so several
processes on one storage share a step's fine-tunes, and a claim whose heartbeat stopped (its worker
was killed) is taken over."""

from __future__ import annotations

import datetime as dt
import json
import time

from mnv3.adapt.prune import PruneError


class StoreError(PruneError):
    pass


def _now() -> float:
    return time.time()


class AdaptStore:
    def __init__(self, url: str, run: str) -> None:
        import sqlalchemy as sa
        from sqlalchemy import exc

        self.url, self.run, self.sa = url, run, sa
        meta = sa.MetaData()
        self.steps_t = sa.Table(
            "adapt_steps", meta,
            sa.Column("run", sa.String(200), primary_key=True),
            sa.Column("step", sa.Integer, primary_key=True),
            sa.Column("layer", sa.String(40)),
            sa.Column("channels", sa.Integer),
            sa.Column("spec", sa.Text, nullable=False),
            sa.Column("accuracy", sa.Float, nullable=False),
            sa.Column("predicted_ms", sa.Float, nullable=False),
            sa.Column("measured_ms", sa.Float, nullable=False),
            sa.Column("model", sa.Text, nullable=False),
            sa.Column("config", sa.Text),
            sa.Column("at", sa.String(40), nullable=False))
        self.props_t = sa.Table(
            "adapt_proposals", meta,
            sa.Column("run", sa.String(200), primary_key=True),
            sa.Column("step", sa.Integer, primary_key=True),
            sa.Column("layer", sa.String(40), primary_key=True),
            sa.Column("channels", sa.Integer, nullable=False),
            sa.Column("spec", sa.Text, nullable=False),
            sa.Column("predicted_ms", sa.Float, nullable=False),
            sa.Column("state", sa.String(12), nullable=False),        # pending, running, done
            sa.Column("worker", sa.String(80)),
            sa.Column("heartbeat", sa.Float),
            sa.Column("accuracy", sa.Float),
            sa.Column("loss", sa.Float),
            sa.Column("seconds", sa.Float),
            sa.Column("model", sa.Text))
        try:
            from mnv3.latency.table import create_tables

            self.engine = sa.create_engine(url)
            create_tables(meta, self.engine)
        except (exc.ArgumentError, exc.NoSuchModuleError) as e:
            raise StoreError(f"--storage {url}: not a database URL ({e}); use sqlite:///FILE or "
                             "postgresql+psycopg://USER@HOST/DB") from None
        except exc.DBAPIError as e:
            first = str(e.orig if getattr(e, "orig", None) else e).splitlines()[0]
            raise StoreError(f"--storage {url}: cannot open the history database ({first}); check the "
                             "path or that the server runs and the URL is right") from None

    # -- steps -----------------------------------------------------------------------------------
    def steps(self) -> list[dict]:
        t = self.steps_t
        with self.engine.connect() as conn:
            rows = conn.execute(self.sa.select(t).where(t.c.run == self.run).order_by(t.c.step)).mappings()
            return [dict(r) for r in rows]

    def add_step(self, row: dict) -> dict:
        """Record a step; when another worker recorded it first, theirs stands and is returned."""
        from sqlalchemy import exc

        row = {**row, "run": self.run, "at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        try:
            with self.engine.begin() as conn:
                conn.execute(self.steps_t.insert().values(**row))
        except exc.IntegrityError:
            pass
        return next(s for s in self.steps() if s["step"] == row["step"])

    # -- proposals -------------------------------------------------------------------------------
    def proposals(self, step: int) -> list[dict]:
        t = self.props_t
        with self.engine.connect() as conn:
            rows = conn.execute(self.sa.select(t).where(t.c.run == self.run, t.c.step == step)
                                .order_by(t.c.layer)).mappings()
            return [dict(r) for r in rows]

    def all_proposals(self) -> list[dict]:
        t = self.props_t
        with self.engine.connect() as conn:
            rows = conn.execute(self.sa.select(t).where(t.c.run == self.run).order_by(t.c.step, t.c.layer))
            return [dict(r) for r in rows.mappings()]

    def add_proposals(self, step: int, rows: list[dict]) -> None:
        """Insert a step's proposals once (a worker that raced another keeps the first set)."""
        from sqlalchemy import exc

        try:
            with self.engine.begin() as conn:
                for r in rows:
                    conn.execute(self.props_t.insert().values(run=self.run, step=step, state="pending", **r))
        except exc.IntegrityError:
            pass

    def claim(self, step: int, layer: str, worker: str, grace: float) -> bool:
        """Take a pending proposal, or one whose worker's heartbeat is older than `grace` seconds."""
        t, sa = self.props_t, self.sa
        with self.engine.begin() as conn:
            result = conn.execute(
                t.update().where(t.c.run == self.run, t.c.step == step, t.c.layer == layer,
                                 sa.or_(t.c.state == "pending",
                                        sa.and_(t.c.state == "running", t.c.heartbeat < _now() - grace)))
                .values(state="running", worker=worker, heartbeat=_now()))
            return result.rowcount == 1

    def beat(self, step: int, layer: str, worker: str) -> None:
        t = self.props_t
        with self.engine.begin() as conn:
            conn.execute(t.update().where(t.c.run == self.run, t.c.step == step, t.c.layer == layer,
                                          t.c.worker == worker, t.c.state == "running").values(heartbeat=_now()))

    def finish(self, step: int, layer: str, worker: str, accuracy: float, loss: float, seconds: float,
               model: str) -> None:
        t = self.props_t
        with self.engine.begin() as conn:
            conn.execute(t.update().where(t.c.run == self.run, t.c.step == step, t.c.layer == layer,
                                          t.c.state == "running", t.c.worker == worker)
                         .values(state="done", accuracy=accuracy, loss=loss, seconds=seconds, model=model))


def config_differences(stored: dict, wanted: dict) -> list[str]:
    return [f"{k}: {json.dumps(stored.get(k))} in the run, {json.dumps(wanted.get(k))} now"
            for k in sorted(set(stored) | set(wanted)) if stored.get(k) != wanted.get(k)]
