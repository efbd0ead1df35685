"""Shared test set-up: nothing a test converts or downloads lands in the user's cache; a throwaway
PostgreSQL server for the tests of shared storage (lookup tables, search studies).

The server is a cluster (initdb + pg_ctl) started once per session on a free port of 127.0.0.1, with
its socket and data in a temporary directory, stopped and removed at the end. It runs as the
`postgres` OS user when the tests run as root (PostgreSQL refuses to run as root). Without
PostgreSQL's server binaries its tests skip, except in CI (CI=true), where .ci/run installs them and
their absence is a failure; when .ci/run could not install them (no apt) it says so in
MNV3_PG_UNAVAILABLE and the tests skip with that reason."""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path

import pytest


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    os.environ["MNV3_CACHE"] = str(tmp_path_factory.mktemp("mnv3-cache"))


# -- PostgreSQL ------------------------------------------------------------------------------------
SUPERUSER = "postgres"


def _unavailable(reason: str) -> None:
    why_not_installed = os.environ.get("MNV3_PG_UNAVAILABLE")
    if why_not_installed:
        pytest.skip(f"PostgreSQL tests: {reason}; .ci/run could not install it: {why_not_installed}")
    if os.environ.get("CI") == "true":
        pytest.fail(f"PostgreSQL tests: {reason}, but CI=true and CI must provide it "
                    "(.ci/run installs Debian's postgresql with apt)", pytrace=False)
    pytest.skip(f"PostgreSQL tests: {reason} (apt-get install postgresql to run them)")


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(".") if p.isdigit())


def _bindir() -> Path | None:
    """Server binaries: the newest /usr/lib/postgresql/<version>/bin (Debian), else pg_ctl on PATH."""
    found = [p.parent for p in Path("/usr/lib/postgresql").glob("*/bin/pg_ctl")
             if (p.parent / "initdb").exists()]
    if found:
        return max(found, key=lambda d: _version(d.parent.name))
    on_path = shutil.which("pg_ctl")
    if on_path and (Path(on_path).parent / "initdb").exists():
        return Path(on_path).parent
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    bindir: Path
    base: Path
    as_user: list[str]
    port: int = 0
    admin: object = None                       # an AUTOCOMMIT engine on the `postgres` database
    _names: count = field(default_factory=lambda: count(1))

    @property
    def data(self) -> Path:
        return self.base / "data"

    @property
    def log(self) -> Path:
        return self.base / "server.log"

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self.as_user and self.as_user[0] == "su":
            cmd = [*self.as_user, shlex.join(cmd)]
        else:
            cmd = [*self.as_user, *cmd]
        proc = subprocess.run(cmd, check=False, cwd=self.base, capture_output=True, text=True,
                              timeout=120, env={**os.environ, "LC_ALL": "C"})
        if check and proc.returncode != 0:
            tail = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            pytest.fail(f"{args[0]} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}\n"
                        f"server log:\n{tail}", pytrace=False)
        return proc

    def url(self, database: str = "postgres", user: str = SUPERUSER) -> str:
        return f"postgresql+psycopg://{user}@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        import sqlalchemy as sa

        name = f"t{next(self._names)}"
        with self.admin.connect() as conn:
            conn.execute(sa.text(f"CREATE DATABASE {name}"))
        return name


@pytest.fixture(scope="session")
def pg_server():
    bindir = _bindir()
    if bindir is None:
        _unavailable("PostgreSQL server binaries (initdb, pg_ctl) not found under /usr/lib/postgresql/*/bin "
                     "or on PATH")
    try:
        import psycopg  # noqa: F401
        import sqlalchemy as sa
    except ModuleNotFoundError as e:
        _unavailable(f"driver missing ({e}); pip install 'psycopg[binary]'")
    as_user: list[str] = []
    owner = None
    if os.geteuid() == 0:                      # the server refuses to run as root
        import pwd

        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            _unavailable("running as root and there is no `postgres` OS user to run the server as")
        as_user = (["runuser", "-u", "postgres", "--"] if shutil.which("runuser")
                   else ["su", "postgres", "-s", "/bin/sh", "-c"])
    # Not pytest's tmp_path: its parent is private to root, and the server user must reach its files.
    base = Path(tempfile.mkdtemp(prefix="mnv3-pg-", dir="/tmp" if Path("/tmp").is_dir() else None))
    sock = base / "sock"
    sock.mkdir()
    if owner is not None:
        for path in (base, sock):
            os.chown(path, owner.pw_uid, owner.pw_gid)
    server = Server(bindir, base, as_user)
    started = False
    try:
        server.run("initdb", "-D", str(server.data), "-U", SUPERUSER, "--auth=trust", "-E", "UTF8",
                   "--locale=C", "--no-sync")
        for attempt in range(3):               # the free port may be taken before the server binds it
            server.port = _free_port()
            options = f"-F -p {server.port} -k {sock} -c listen_addresses=127.0.0.1"
            proc = server.run("pg_ctl", "-D", str(server.data), "-l", str(server.log), "-w", "-t", "60",
                              "-o", options, "start", check=attempt == 2)
            if proc.returncode == 0:
                started = True
                break
        server.admin = sa.create_engine(server.url(), isolation_level="AUTOCOMMIT")
        yield server
    finally:
        if server.admin is not None:
            server.admin.dispose()
        if started:
            stop = server.run("pg_ctl", "-D", str(server.data), "-m", "fast", "-w", "-t", "60", "stop",
                              check=False)
            if stop.returncode != 0:
                server.run("pg_ctl", "-D", str(server.data), "-m", "immediate", "stop", check=False)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def pg_url(pg_server) -> str:
    """A fresh, empty database of the session's server."""
    return pg_server.url(pg_server.new_database())
