"""The deploy stack run for real, without Docker: Debian's nginx with deploy/nginx in front of
two daphne instances sharing Redis and PostgreSQL, and Debian's Prometheus with
deploy/prometheus scraping both through the bearer token.

As in tests/test_nginx.py, only what cannot exist outside compose is replaced, each
replacement counted so that a changed file fails loudly: the service names app1/app2 and
the Prometheus self-target by loopback addresses, the mount paths by the temp directory,
the intervals (15 s) by a second so the run takes seconds. The checks: `promtool check
config` and `check rules`; a voice session through nginx (both instances get one); the
client address the apps use is nginx's view, whatever X-Forwarded-For a client forges;
/metrics and /simulator/ are not reachable through nginx; Prometheus reports both targets
up, every alert rule evaluates, and the breaker alert fires once the breaker is tripped;
every query of the Grafana dashboard names only series Prometheus scraped, grouped by
labels they carry, and returns data.

Clients reach nginx from their own loopback addresses (127.0.0.2...), nginx reaches the
apps from 127.0.0.1, their only trusted proxy; one client also comes from 127.0.0.1 itself,
as clients relayed by Docker's userland proxy come from the bridge gateway, inside the
trusted compose subnet. Daphne listens on a port the kernel picks (a socket handed over, no
race); nginx and Prometheus on spare ports below the ephemeral range. Skips without nginx,
prometheus or promtool unless DUCKE_REQUIRE_DEPLOY_TOOLS=1 (CI installs nginx-light and
prometheus): then it fails.
"""

import asyncio
import json
import random
import re
import secrets
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.integration.harness import SIMULATOR_PATH, Refused, Session, random_ip
from tests.test_compose import dashboard_exprs, promql_metric_names
from tests.test_nginx import PLAIN_ONLY, lay_out, replace, require_tool, start_nginx, stop_process

pytestmark = [pytest.mark.redis, pytest.mark.timeout(240)]

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "ducke.json"
PROMETHEUS_PACKAGE = "prometheus"
INTERVAL = "1s"  # replaces the config's 15 s scrape and evaluation intervals
BREAKER_ALERT = "DuckeCircuitBreakerOpen"
# Each client of the test reaches nginx from an address of its own; forged headers name others.
VOICE_CLIENT = "127.0.0.2"
PAGE_CLIENT = "127.0.0.3"
BREAKER_CLIENT = "127.0.0.4"
PROBE_CLIENT = "127.0.0.5"
NGINX_ADDRESS = "127.0.0.1"  # nginx reaches the apps from here: their trusted proxy
FORGED = "203.0.113.9"


def spare_port():
    """A free loopback port below the kernel's ephemeral range (so below 55000 too): no
    outgoing connection takes it between this check and the server's bind."""
    for _ in range(200):
        port = random.randrange(20000, 32768)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no spare loopback port in 20000-32767")


def deploy_tools():
    """nginx, prometheus and promtool (skip or fail as tests/test_nginx.py does)."""
    return (
        require_tool("nginx"),
        require_tool("prometheus", PROMETHEUS_PACKAGE),
        require_tool("promtool", PROMETHEUS_PACKAGE),
    )


# -- Prometheus ------------------------------------------------------------------------------


def prometheus_files(directory, apps, port, token):
    """deploy/prometheus in ``directory`` with only the compose-specific parts replaced:
    targets (``apps`` = (app1, app2) host:port, and the self-scrape), the token file and rule
    file paths, and the 15 s intervals. Returns the config's path."""
    directory.mkdir(parents=True, exist_ok=True)
    token_file = directory / "metrics_token"
    # As the compose entrypoint writes it: umask 077, no newline.
    token_file.touch(mode=0o600)
    token_file.write_text(token)
    alerts = (PROMETHEUS_DIR / "alerts.yml").read_text()
    (directory / "alerts.yml").write_text(alerts)
    text = (PROMETHEUS_DIR / "prometheus.yml").read_text()
    text = replace(text, "scrape_interval: 15s", f"scrape_interval: {INTERVAL}", 1)
    text = replace(text, "evaluation_interval: 15s", f"evaluation_interval: {INTERVAL}", 1)
    text = replace(text, "- /etc/prometheus/alerts.yml", f"- {directory / 'alerts.yml'}", 1)
    text = replace(
        text, "credentials_file: /prometheus/metrics_token", f"credentials_file: {token_file}", 1
    )
    text = replace(
        text, 'targets: ["app1:8000", "app2:8000"]', f'targets: ["{apps[0]}", "{apps[1]}"]', 1
    )
    text = replace(text, 'targets: ["localhost:9090"]', f'targets: ["127.0.0.1:{port}"]', 1)
    directives = re.sub(r"#.*", "", text)
    assert "/etc/prometheus" not in directives and " /prometheus/" not in directives
    config = directory / "prometheus.yml"
    config.write_text(text)
    return config


def alert_rules():
    groups = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())["groups"]
    return {rule["alert"]: rule for group in groups for rule in group["rules"]}


def promtool(tool, *args):
    result = subprocess.run([tool, *args], capture_output=True, text=True, timeout=60)
    return result.returncode, result.stdout + result.stderr


class Prometheus:
    """A prometheus process on a spare loopback port, and its HTTP API."""

    def __init__(self, executable, directory, apps, token):
        self.port = spare_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = prometheus_files(directory, apps, self.port, token)
        self.log_path = directory / "prometheus.log"
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    executable,
                    f"--config.file={self.config}",
                    f"--storage.tsdb.path={directory / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--web.enable-lifecycle",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.started = time.monotonic()
        self.http = httpx.Client(base_url=self.url, timeout=5)

    def log_tail(self, limit=3000):
        return self.log_path.read_text(errors="replace")[-limit:]

    def api(self, path, **params):
        response = self.http.get(f"/api/v1/{path}", params=params)
        body = response.json()
        assert body["status"] == "success", (path, params, body)
        return body["data"]

    def query(self, expr):
        return self.api("query", query=expr)["result"]

    def wait(self, what, predicate, timeout):
        """Poll ``predicate()`` (a truthy result ends the wait) for up to ``timeout`` s."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"prometheus exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                last = predicate()
            except (httpx.HTTPError, ValueError) as exc:  # not listening yet
                last = exc
            else:
                if last:
                    return last
            time.sleep(0.1)
        pytest.fail(f"prometheus: {what} not within {timeout}s (last: {last!r})\n{self.log_tail()}")

    def stop(self):
        self.http.close()
        stop_process(self.process)


# -- the stack --------------------------------------------------------------------------------


@dataclass
class Front:
    """nginx's public side, shaped like a DaphneServer for the harness's Session."""

    url: str

    @property
    def ws_url(self):
        return self.url.replace("http://", "ws://", 1)


@dataclass
class Stack:
    cluster: object
    front: Front
    prometheus: Prometheus
    token: str


@pytest.fixture
def stack(tmp_path, cluster_factory, redis_server, budget):
    _, prometheus, _ = deploy_tools()
    token = secrets.token_hex(16)
    budget(max_concurrent_sessions_per_client=2)
    cluster = cluster_factory(
        redis_server.url,
        env={
            # As compose runs the apps: the simulator routes are on (no OpenAI key); the relay
            # talks to the harness's simulator process, which logs every response it sends.
            "DUCKE_SIMULATOR_ENABLED": "1",
            # Only the scraper's address, and the token (compose: the network and the token).
            "DUCKE_METRICS_ALLOWED_CIDRS": "127.0.0.1/32",
            "DUCKE_METRICS_TOKEN": token,
        },
    )
    apps = tuple(f"127.0.0.1:{server.port}" for server in cluster.instances)
    port = spare_port()
    prefix = tmp_path / "nginx"
    prefix.mkdir()
    nginx, paths, _ = lay_out(prefix, PLAIN_ONLY, upstream=apps, ports=(port, None))
    proxy = start_nginx(nginx, paths, prefix, port)
    try:
        server = Prometheus(prometheus, tmp_path / "prometheus", apps, token)
        try:
            yield Stack(cluster, Front(f"http://127.0.0.1:{port}"), server, token)
        finally:
            server.stop()
    finally:
        stop_process(proxy)


# -- the checks -------------------------------------------------------------------------------


def test_promtool_accepts_the_config_and_the_rules(tmp_path):
    _, _, tool = deploy_tools()
    config = prometheus_files(tmp_path, ("127.0.0.1:1", "127.0.0.1:2"), 9090, "token")
    code, output = promtool(tool, "check", "config", str(config))
    assert code == 0, output
    assert "SUCCESS" in output and "rule files found" in output, output
    code, output = promtool(tool, "check", "rules", str(PROMETHEUS_DIR / "alerts.yml"))
    assert code == 0, output
    assert f"SUCCESS: {len(alert_rules())} rules found" in output, output
    # The check can fail: a rule with a broken expression is refused.
    broken = tmp_path / "broken.yml"
    broken.write_text(
        (PROMETHEUS_DIR / "alerts.yml").read_text().replace("== 1", "== (1", 1), "utf-8"
    )
    code, output = promtool(tool, "check", "rules", str(broken))
    assert code != 0 and "FAILED" in output, output


def daphne_access_lines(server, pattern):
    return [line for line in server.log_tail(200_000).splitlines() if pattern in line]


async def wait_ledger_closed(database, clients, count, timeout=20):
    deadline = time.monotonic() + timeout
    while True:
        rows = database.sessions_of(clients)
        if len(rows) >= count and all(row[3] is not None for row in rows):
            return rows
        assert time.monotonic() < deadline, f"sessions not closed in the ledger: {rows}"
        await asyncio.sleep(0.2)


async def check_voice_sessions(stack, database):
    """Two sessions through nginx, one per instance (least_conn), each answered; the ledger
    knows them by the address nginx saw, not by the forged X-Forwarded-For."""
    a, b = stack.cluster.instances
    before = [len(daphne_access_lines(s, "WSCONNECT /session")) for s in (a, b)]
    sessions = [
        await Session.open(stack.front, FORGED, local_addr=(VOICE_CLIENT, 0)) for _ in range(2)
    ]
    dones = await asyncio.gather(*(session.turn() for session in sessions))
    for session in sessions:
        await session.close()
    assert [done["response"]["status"] for done in dones] == ["completed"] * 2, dones
    after = [len(daphne_access_lines(s, "WSCONNECT /session")) for s in (a, b)]
    assert [n - m for n, m in zip(after, before, strict=True)] == [1, 1], (after, before)

    rows = await wait_ledger_closed(database, [VOICE_CLIENT], 2)
    assert len(rows) == 2 and {row[2] for row in rows} == {"client_closed"}, rows
    assert database.sessions_of([FORGED]) == []
    ledger = set(database.response_ids([row[0] for row in rows]))
    answered = {done["response"]["id"] for done in dones}
    assert ledger == answered, (ledger, answered)
    assert answered <= set(stack.cluster.simulator_responses())


async def check_http_client_address(stack):
    """The page rule (30 a minute per client) counts one client for all the forged headers
    it sends through nginx, across both instances: the address nginx saw. Also for a client
    at nginx's own address, a trusted proxy of the apps (in compose, Docker's bridge gateway
    172.28.0.1 is in the trusted subnet, and its userland proxy relays clients from there)."""
    instances = stack.cluster.instances
    for address in (PAGE_CLIENT, NGINX_ADDRESS):
        before = [len(daphne_access_lines(s, '"GET /" ')) for s in instances]
        transport = httpx.AsyncHTTPTransport(local_address=address)
        async with httpx.AsyncClient(transport=transport, timeout=10) as client:
            status = await client.get(
                f"{stack.front.url}/status", headers={"X-Forwarded-For": random_ip()}
            )
            assert status.status_code == 200 and status.json()["redis"] == "ok", status.text
            pages = [
                await client.get(f"{stack.front.url}/", headers={"X-Forwarded-For": random_ip()})
                for _ in range(31)
            ]
        codes = [page.status_code for page in pages]
        assert codes == [200] * 30 + [429], (address, codes)
        after = [len(daphne_access_lines(s, '"GET /" ')) for s in instances]
        served = [n - m for n, m in zip(after, before, strict=True)]
        assert sum(served) == 31 and min(served) > 0, served  # both instances, one count
        remaining = [int(page.headers["RateLimit-Remaining"]) for page in pages[:30]]
        assert remaining == list(range(29, -1, -1)), (address, remaining)
        refused = pages[-1]
        # The app's refusal (JSON, Retry-After), not nginx's outer ring.
        assert refused.headers["content-type"].startswith("application/json"), refused.text
        assert "retry-after" in refused.headers


NGINX_404_METRICS = ("/metrics", "//metrics", "/./metrics", "/%6Detrics", "/metrics?x=1")
APP_404_METRICS = ("/metrics/", "/METRICS", "/metrics%3F")
SIMULATOR_HTTP = (SIMULATOR_PATH, "/simulator/", "//simulator/v1/realtime", "/%73imulator/v1/x")
SIMULATOR_WS = (
    SIMULATOR_PATH,
    "/%73imulator/v1/realtime",
    "//simulator/v1/realtime",
    "/simulator%2Fv1%2Frealtime",
    "/x/../simulator/v1/realtime",
)


async def check_not_reachable(stack):
    """/metrics (even with the token) and the simulator answer 404 at nginx; the apps serve
    both to whom they are meant for (Prometheus, the relay), so nginx is what stops them."""
    auth = {"Authorization": f"Bearer {stack.token}"}
    transport = httpx.AsyncHTTPTransport(local_address=PROBE_CLIENT)
    async with httpx.AsyncClient(transport=transport, timeout=10) as client:
        for path in (*NGINX_404_METRICS, *APP_404_METRICS, *SIMULATOR_HTTP):
            response = await client.get(f"{stack.front.url}{path}", headers=auth)
            assert response.status_code in (403, 404), (path, response.status_code)
            assert "# HELP" not in response.text, path
            if path in NGINX_404_METRICS or path in SIMULATOR_HTTP:
                assert "nginx" in response.text, (path, response.text[:200])
    for path in SIMULATOR_WS:
        with pytest.raises(InvalidStatus) as refused:
            async with connect(
                f"{stack.front.ws_url}{path}?model=gpt-realtime",
                local_addr=(PROBE_CLIENT, 0),
                open_timeout=10,
            ):
                pass
        assert refused.value.response.status_code == 404, path

    a = stack.cluster.instances[0]
    async with httpx.AsyncClient(timeout=10) as direct:
        assert (await direct.get(f"{a.url}/metrics")).status_code == 403  # token required
        scraped = await direct.get(f"{a.url}/metrics", headers=auth)
        assert scraped.status_code == 200 and "circuit_breaker_open" in scraped.text
    async with connect(f"{a.ws_url}{SIMULATOR_PATH}?model=gpt-realtime", open_timeout=10) as ws:
        first = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert first["type"] == "session.created", first


def ducke_targets(prometheus):
    targets = prometheus.api("targets", state="active")["activeTargets"]
    return {t["scrapeUrl"]: t for t in targets if t["labels"]["job"] == "ducke"}


def wait_targets_up(stack):
    prometheus = stack.prometheus
    expected = {f"{s.url}/metrics" for s in stack.cluster.instances}

    def all_up():
        targets = ducke_targets(prometheus)
        return set(targets) == expected and all(t["health"] == "up" for t in targets.values())

    def self_scraped():
        # Prometheus scrapes itself on its own schedule: it may come after both app targets.
        return [r["value"][1] for r in prometheus.query('up{job="prometheus"}')] == ["1"]

    prometheus.wait("ready", lambda: prometheus.http.get("/-/ready").status_code == 200, 30)
    ready = time.monotonic() - prometheus.started
    prometheus.wait("both ducke targets up", all_up, 45)
    all_up_after = time.monotonic() - prometheus.started
    up = prometheus.query('up{job="ducke"}')
    assert sorted(float(r["value"][1]) for r in up) == [1.0, 1.0], up
    prometheus.wait("prometheus scraping itself", self_scraped, 45)
    return ready, all_up_after


def breaker_alert(prometheus):
    alerts = prometheus.api("alerts")["alerts"]
    return next((a for a in alerts if a["labels"]["alertname"] == BREAKER_ALERT), None)


async def trip_breaker(stack, database):
    """A threshold below the hour's spend, then one answer through nginx: the breaker opens
    (the session ends with 4503), the next session is refused; seconds until the alert fires."""
    prometheus = stack.prometheus
    assert breaker_alert(prometheus) is None
    assert "for" not in alert_rules()[BREAKER_ALERT]  # fires on the first evaluation
    database.set_budget(breaker_threshold_usd="0.01")
    await asyncio.sleep(1.0)  # the policy refresh (0.5 s) on both instances
    session = await Session.open(stack.front, FORGED, local_addr=(BREAKER_CLIENT, 0))
    await session.ask()
    code = await session.wait_closed(30)
    tripped = time.monotonic()
    assert code == 4503, [e["type"] for e in session.events][-8:]
    exceeded = [e for e in session.events if e["type"] == "quota.exceeded"]
    assert exceeded and exceeded[-1]["reason"] == "breaker", exceeded
    with pytest.raises(Refused) as refused:
        await Session.open(stack.front, FORGED, local_addr=(BREAKER_CLIENT, 0))
    assert refused.value.code == 4503 and refused.value.event["reason"] == "breaker"

    def firing():
        alert = breaker_alert(prometheus)
        return alert if alert and alert["state"] == "firing" else None

    alert = await asyncio.to_thread(prometheus.wait, f"{BREAKER_ALERT} firing", firing, 30)
    latency = time.monotonic() - tripped
    assert alert["labels"]["severity"] == "critical"
    assert prometheus.query("max(circuit_breaker_open)")[0]["value"][1] == "1"
    return latency


def check_rules_evaluate(prometheus, scraped):
    """Every alert rule is loaded, evaluates without error and names only scraped series."""
    groups = prometheus.api("rules", type="alert")["groups"]
    loaded = {rule["name"]: rule for group in groups for rule in group["rules"]}
    assert set(loaded) == set(alert_rules()), loaded.keys()
    for name, rule in loaded.items():
        assert rule["health"] == "ok" and not rule.get("lastError"), rule
        missing = promql_metric_names(rule["query"]) - scraped
        assert not missing, f"alert {name} queries series never scraped: {missing}"


def grouping_labels(expr):
    """Labels named in ``by (...)`` clauses."""
    return {
        label.strip()
        for clause in re.findall(r"\bby\s*\(([^)]*)\)", expr)
        for label in clause.split(",")
        if label.strip()
    }


def dashboard_queries():
    """(query, legend) of every dashboard target, the Grafana variables set to their current
    values."""
    dashboard = json.loads(DASHBOARD.read_text())
    values = {v["name"]: v["current"]["value"] for v in dashboard["templating"]["list"]}
    queries = []
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for name, value in values.items():
                expr = re.sub(rf"\$\{{{name}\}}|\${name}\b", value, expr)
            assert "$" not in expr, expr
            queries.append((expr, target.get("legendFormat", "")))
    assert len(queries) == len(dashboard_exprs(dashboard))
    return queries


def check_dashboard(prometheus, scraped, timeout=30):
    """Each query names scraped series only, groups by labels those series carry, parses and
    (once rate() has two samples) returns data whose series carry the legend's labels."""
    queries = dashboard_queries()
    assert len(queries) >= 15
    labels_of = {}
    for expr, _ in queries:
        names = promql_metric_names(expr)
        # Only the cap lines (vector($variable)) name no series.
        assert names or re.fullmatch(r"vector\([\d.]+\)", expr), expr
        missing = names - scraped
        assert not missing, f"dashboard query {expr!r} names series never scraped: {missing}"
        for name in names:
            if name not in labels_of:
                series = prometheus.api("series", **{"match[]": name})
                labels_of[name] = set().union(*(set(s) for s in series))
        for label in grouping_labels(expr):
            assert all(label in labels_of[name] for name in names), (expr, label, labels_of)
    pending = dict(queries)
    deadline = time.monotonic() + timeout
    while pending:
        for expr, legend in list(pending.items()):
            result = prometheus.query(expr)
            if not result:
                continue
            del pending[expr]
            for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", legend):
                assert all(label in r["metric"] for r in result), (expr, legend, result)
        if pending and time.monotonic() > deadline:
            pytest.fail(f"dashboard queries without data after {timeout}s: {list(pending)}")
        time.sleep(0.5)
    return queries


async def test_the_deploy_stack_serves_scrapes_and_alerts(stack, it_database):
    prometheus = stack.prometheus
    ready_after, up_after = await asyncio.to_thread(wait_targets_up, stack)

    await check_voice_sessions(stack, it_database)
    await check_http_client_address(stack)
    await check_not_reachable(stack)
    alert_latency = await trip_breaker(stack, it_database)

    # The labelled series (cost by model, refusals by reason...) exist once scraped after the
    # traffic above; two scrapes more give rate() its two samples.
    await asyncio.sleep(2.5)
    scraped = set(prometheus.api("label/__name__/values"))
    check_rules_evaluate(prometheus, scraped)
    queries = await asyncio.to_thread(check_dashboard, prometheus, scraped)
    print(
        f"\ndeploy stack: prometheus ready {ready_after:.2f}s after its start, both ducke "
        f"targets up after {up_after:.2f}s; "
        f"{BREAKER_ALERT} firing {alert_latency:.2f}s after the breaker tripped "
        f"(scrape and evaluation every {INTERVAL}); {len(queries)} dashboard queries "
        f"answered on {len(scraped)} scraped series names"
    )
