"""Processes and clients for the integration tests.

A PostgreSQL database of the run's own, clusters of daphne instances (one serving the
simulator, the others the product) sharing a private redis-server, a pausable TCP proxy in
front of PostgreSQL, WebSocket sessions as a browser opens them, and ledger queries.
"""

import asyncio
import contextlib
import json
import os
import re
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import psycopg
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.fixtures.live_server import DaphneServer, start_daphne_server
from tests.fixtures.relay import UPSTREAM_EVENT_TYPES, user_text

SIMULATOR_PATH = "/simulator/v1/realtime"
UPSTREAM_ALLOWED = UPSTREAM_EVENT_TYPES


def require_services():
    """Skip (or fail under ``QUOTAS_REQUIRE_REDIS=1``) unless PostgreSQL and Redis are named."""
    database = os.environ.get("DATABASE_URL", "")
    problems = []
    if urlsplit(database).scheme not in ("postgres", "postgresql", "pgsql"):
        problems.append("DATABASE_URL (PostgreSQL)")
    if not os.environ.get("REDIS_URL"):
        problems.append("REDIS_URL")
    if problems:
        message = f"integration tests need {' and '.join(problems)}"
        if os.environ.get("QUOTAS_REQUIRE_REDIS") == "1":
            pytest.fail(f"QUOTAS_REQUIRE_REDIS=1 but {message}")
        pytest.skip(message)
    return database


# -- the run's database -------------------------------------------------------------------------


@dataclass
class Database:
    """A PostgreSQL database created for this run; raw SQL helpers for the ledger."""

    url: str

    @property
    def host(self):
        return urlsplit(self.url).hostname or "127.0.0.1"

    @property
    def port(self):
        return urlsplit(self.url).port or 5432

    def via(self, host, port):
        """This database's URL through another host and port (a proxy)."""
        parts = urlsplit(self.url)
        auth = parts.netloc.rpartition("@")[0]
        netloc = f"{auth}@{host}:{port}" if auth else f"{host}:{port}"
        return urlunsplit(parts._replace(netloc=netloc))

    def rows(self, sql, params=()):
        with psycopg.connect(self.url, autocommit=True) as conn:
            return conn.execute(sql, params).fetchall()

    def execute(self, *statements):
        """Run ``(sql, params)`` statements in one transaction."""
        with psycopg.connect(self.url) as conn:
            with conn.transaction():
                for sql, params in statements:
                    conn.execute(sql, params)

    def edit_policy(self, sql, params=()):
        """Change a policy table and bump ``PolicyVersion`` in one transaction, as a save does."""
        self.execute(
            (sql, params),
            ("UPDATE quotas_policyversion SET version = version + 1, changed_at = now()", ()),
        )

    def set_budget(self, **values):
        """Update the active budget policy (every process reloads within a second)."""
        assignments = ", ".join(f'"{name}" = %s' for name in values)
        self.edit_policy(
            f"UPDATE quotas_budgetpolicy SET {assignments} WHERE active", tuple(values.values())
        )

    def set_rule(self, name, **values):
        assignments = ", ".join(f'"{column}" = %s' for column in values)
        self.edit_policy(
            f"UPDATE quotas_ratelimitrule SET {assignments} WHERE name = %s",
            (*values.values(), name),
        )

    def response_ids(self, session_ids):
        """Ledger response ids (kind ``response``) of the given sessions."""
        if not session_ids:
            return []
        rows = self.rows(
            "SELECT r.response_id FROM quotas_usagerecord r "
            "WHERE r.kind = 'response' AND r.session_id = ANY(%s)",
            ([uuid.UUID(s) for s in session_ids],),
        )
        return [row[0] for row in rows]

    def sessions_of(self, clients):
        """(id, client, end_reason, ended_at) of the ledger sessions of these client addresses."""
        return self.rows(
            "SELECT id::text, client, end_reason, ended_at FROM quotas_quotasession "
            "WHERE client = ANY(%s)",
            (list(clients),),
        )


def maintenance_url(server_url):
    """The server's ``postgres`` database: the one ``DATABASE_URL`` names may not exist yet."""
    return urlunsplit(urlsplit(server_url)._replace(path="/postgres"))


def create_database(server_url):
    """A fresh database ``ducke_it_<random>`` on the server of ``server_url``."""
    name = f"ducke_it_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(maintenance_url(server_url), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return Database(urlunsplit(urlsplit(server_url)._replace(path=f"/{name}")))


def drop_database(server_url, database):
    name = urlsplit(database.url).path.lstrip("/")
    with psycopg.connect(maintenance_url(server_url), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# -- daphne clusters ----------------------------------------------------------------------------


@dataclass
class Cluster:
    """A simulator process plus product instances sharing one Redis and one database."""

    simulator: DaphneServer
    instances: list
    simulator_log: Path
    servers: list = field(default_factory=list)

    def simulator_lines(self):
        try:
            text = self.simulator_log.read_text()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def simulator_responses(self):
        """{response id: status} of every response.done the simulator sent."""
        return {
            line["response_done"]: line["status"]
            for line in self.simulator_lines()
            if "response_done" in line
        }

    def upstream_event_types(self):
        return {line["client_event"] for line in self.simulator_lines() if "client_event" in line}

    def stop(self):
        for server in self.servers:
            server.stop()


def instance_env(database_url, redis_url, simulator, **extra):
    env = {
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "DUCKE_SIMULATOR_ENABLED": "0",
        "QUOTAS_TRUSTED_PROXIES": "127.0.0.1/32",
    }
    if simulator is not None:
        env["DUCKE_REALTIME_URL"] = f"ws://127.0.0.1:{simulator.port}{SIMULATOR_PATH}"
    env.update(extra)
    return env


def start_cluster(
    base_dir, database, redis_url, *, instances=2, instance_db_url=None, pace=1.0, env=None
):
    """Start the simulator (real-time ``pace``) and ``instances`` product servers in parallel;
    ``env`` adds variables to the product servers' environment."""
    base_dir = Path(base_dir)
    log = base_dir / "simulator.jsonl"
    simulator = start_daphne_server(
        base_dir / "simulator",
        {
            "DATABASE_URL": database.url,
            "DUCKE_SIMULATOR_ENABLED": "1",
            "DUCKE_SIMULATOR_PACE": str(pace),
            "DUCKE_SIMULATOR_LOG": str(log),
        },
        migrate=False,
    )
    cluster = Cluster(simulator=simulator, instances=[], simulator_log=log, servers=[simulator])
    env = instance_env(instance_db_url or database.url, redis_url, simulator, **(env or {}))
    try:
        with ThreadPoolExecutor(instances) as pool:
            futures = [
                pool.submit(start_daphne_server, base_dir / f"instance{i}", env, migrate=False)
                for i in range(instances)
            ]
            for future in futures:
                server = future.result()
                cluster.instances.append(server)
                cluster.servers.append(server)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def rss_kib(pid):
    """Resident set size of a process in KiB (from /proc)."""
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmRSS:\s+(\d+) kB", text, re.MULTILINE).group(1))


def status(server, client_ip=None):
    """GET /status through the trusted proxy header; (status code, JSON or None)."""
    headers = {"X-Forwarded-For": client_ip or random_ip()}
    response = httpx.get(f"{server.url}/status", headers=headers, timeout=5)
    try:
        body = response.json()
    except ValueError:
        body = None
    return response.status_code, body


def random_ip():
    """A client address of its own (10.0.0.0/8), so limits never leak between tests."""
    value = uuid.uuid4().int
    return f"10.{value % 250}.{(value >> 8) % 250}.{(value >> 16) % 250 + 1}"


# -- browser sessions ---------------------------------------------------------------------------


class Refused(Exception):
    """The server refused the session: ``code`` and the ``quota.exceeded`` (or error) event."""

    def __init__(self, code, event):
        super().__init__(f"refused with {code}: {event}")
        self.code = code
        self.event = event


class Session:
    """One browser session on ``/session`` of an instance."""

    def __init__(self, ws, client_ip):
        self.ws = ws
        self.client_ip = client_ip
        self.events = []
        self.close_code = None

    @classmethod
    async def open(cls, server, client_ip=None, *, headers=None, timeout=15, **options):
        """Connect and wait for ``session.updated``; raises ``Refused`` on a quota close."""
        client_ip = client_ip or random_ip()
        extra = {"X-Forwarded-For": client_ip} if client_ip else {}
        extra.update(headers or {})
        ws = await connect(
            f"{server.ws_url}/session",
            origin=server.url,  # the page's own origin, port included
            additional_headers=extra,
            open_timeout=timeout,
            max_size=None,
            **options,
        )
        session = cls(ws, client_ip)
        try:
            events = await session.until("session.updated", timeout)
        except ConnectionClosed:
            events = session.events
        if session.close_code is not None:
            first = next((e for e in events if e["type"] in ("quota.exceeded", "error")), None)
            raise Refused(session.close_code, first)
        return session

    async def next(self, timeout):
        try:
            raw = await asyncio.wait_for(self.ws.recv(), timeout)
        except ConnectionClosed:
            self.close_code = self.ws.close_code
            raise
        event = json.loads(raw)
        self.events.append(event)
        return event

    async def until(self, event_type, timeout=20):
        """Events up to the first ``event_type``; on a close, what came before it."""
        seen = []
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"no {event_type} within {timeout}s; saw {[e['type'] for e in seen][-20:]}"
                )
            try:
                event = await self.next(remaining)
            except ConnectionClosed:
                return seen
            seen.append(event)
            if event["type"] == event_type:
                return seen

    async def ask(self, text="Why does my test fail only on CI?"):
        """Send a typed question and ask for a spoken answer."""
        await self.ws.send(json.dumps(user_text(text)))
        await self.ws.send(json.dumps({"type": "response.create"}))

    async def turn(self, text="Why does my test fail only on CI?", timeout=30):
        """One question and its whole answer; returns the ``response.done`` event (or None)."""
        await self.ask(text)
        events = await self.until("response.done", timeout)
        return events[-1] if events and events[-1]["type"] == "response.done" else None

    async def wait_closed(self, timeout=20):
        """Read until the server closes; returns the close code."""
        deadline = time.monotonic() + timeout
        while self.close_code is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"session not closed within {timeout}s")
            with contextlib.suppress(ConnectionClosed):
                try:
                    await self.next(remaining)
                except TimeoutError:
                    raise AssertionError(f"session not closed within {timeout}s") from None
        return self.close_code

    async def close(self):
        await self.ws.close()
        self.close_code = self.close_code or self.ws.close_code


async def try_open(server, client_ip, **kwargs):
    """``("ok", session)`` or ``("refused", Refused)``."""
    try:
        return "ok", await Session.open(server, client_ip, **kwargs)
    except Refused as refused:
        return "refused", refused


# -- a TCP proxy that can pause ------------------------------------------------------------------


class PausableProxy:
    """A loopback TCP proxy in a thread of its own; ``pause()`` drops and refuses connections."""

    def __init__(self, target_host, target_port):
        self.target = (target_host, target_port)
        self.port = None
        self.loop = asyncio.new_event_loop()
        self._server = None
        self._pipes = set()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def start(self):
        self._thread.start()
        self._call(self._listen())
        return self

    def _call(self, coroutine, timeout=10):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    async def _listen(self):
        self._server = await asyncio.start_server(
            self._serve, "127.0.0.1", self.port or 0, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def _serve(self, reader, writer):
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        pipe = (writer, up_writer)
        self._pipes.add(pipe)
        try:
            await asyncio.gather(
                self._pump(reader, up_writer), self._pump(up_reader, writer), return_exceptions=True
            )
        finally:
            self._pipes.discard(pipe)
            for w in pipe:
                w.close()

    @staticmethod
    async def _pump(reader, writer):
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    async def _pause(self):
        self._server.close()
        for pipe in list(self._pipes):
            for writer in pipe:
                writer.transport.abort()
        self._pipes.clear()
        await asyncio.wait_for(self._server.wait_closed(), 5)

    def pause(self):
        """Close every open connection and stop listening: new connections are refused."""
        self._call(self._pause())

    def resume(self):
        """Listen again on the same port."""
        self._call(self._listen())

    def stop(self):
        with contextlib.suppress(Exception):
            self._call(self._pause())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
