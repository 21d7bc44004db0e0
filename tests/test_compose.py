"""The docker compose deployment, validated by parsing (no Docker engine in CI).

Checks that every referenced file exists, that services name each other consistently
(depends_on, nginx upstreams, Prometheus targets, Grafana datasource, Redis password,
trusted-proxy subnet), that health checks and restart policies are set, that nginx's outer
ring of limits sits above the apps' own rules, that the TLS override (deploy/compose.tls.yml)
fits the base file, and that dashboards and alert rules query only metrics the app exports.
test_nginx.py runs `nginx -t` on the same files.
"""

import ipaddress
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ducke.policies import DEFAULT_RULES
from quotas.clientip import parse_trusted_proxies
from quotas.defaults import DEFAULT_BUDGET

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DEPLOY = ROOT / "deploy"
COMPOSE_TLS = DEPLOY / "compose.tls.yml"
NGINX = DEPLOY / "nginx"
LOCATIONS_INCLUDE = "/etc/nginx/ducke-locations.conf"
APPS = ("app1", "app2")
LONG_RUNNING = ("redis", "postgres", *APPS, "nginx", "prometheus", "grafana")

# The metrics contract (DESIGN.md "Names the operator sees"): declared name -> (type, labels).
CONTRACT = {
    "rate_limit_exceeded_total": ("counter", ["endpoint"]),
    "rate_limit_check_duration_seconds": ("histogram", ["endpoint"]),
    "api_cost_total_usd": ("counter", ["model"]),
    "active_sessions_total": ("gauge", []),
    "session_duration_seconds": ("histogram", ["status"]),
    "token_usage_total": ("counter", ["model", "type"]),
    "budget_exceeded_total": ("counter", ["reason"]),
    "circuit_breaker_open": ("gauge", []),
    "hourly_cost_usd": ("gauge", []),
    "quotas_redis_available": ("gauge", []),
}
# django_prometheus series the dashboard may use.
DJANGO_PROMETHEUS = {
    "django_http_requests_total_by_view_transport_method_total",
    "django_http_responses_total_by_status_total",
    "django_http_requests_latency_seconds_by_view_method_bucket",
    "django_http_requests_latency_seconds_by_view_method_sum",
    "django_http_requests_latency_seconds_by_view_method_count",
}

PROMQL_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
    "unless", "offset", "inf", "nan",
}  # fmt: skip


def exposed_names():
    """Sample names prometheus_client itself writes for the contract's metrics."""
    registry = CollectorRegistry()
    kinds = {"counter": Counter, "gauge": Gauge, "histogram": Histogram}
    for name, (kind, labels) in CONTRACT.items():
        metric = kinds[kind](name, "contract", labels, registry=registry)
        child = metric.labels(*["x"] * len(labels)) if labels else metric
        child.observe(1) if kind == "histogram" else child.inc()
    return {
        sample.name
        for family in registry.collect()
        for sample in family.samples
        if not sample.name.endswith("_created")
    }


ALLOWED_METRICS = exposed_names() | DJANGO_PROMETHEUS


def promql_metric_names(expr):
    """Metric identifiers in a PromQL expression (not functions, labels, keywords or numbers)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', "", expr)  # strings
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges and subqueries
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\$\{?\w+\}?", "", expr)  # Grafana variables
    names = set()
    for match in re.finditer(r"(?<![\w.])([A-Za-z_:][\w:]*)\s*(\()?", expr):
        name, call = match.groups()
        if call or name.lower() in PROMQL_KEYWORDS:
            continue
        names.add(name)
    return names


def interpolated_vars(text):
    """Names of the ``${VAR...}`` variables compose interpolates in ``text``."""
    return set(re.findall(r"(?<!\$)\$\{([A-Z_][A-Z0-9_]*)", text))


def interpolate(text, values):
    """Substitute ``${VAR}``, ``${VAR:-default}`` and ``${VAR:?message}`` as compose does."""

    def value(match):
        name, operator, rest = match.groups()
        if values.get(name):
            return values[name]
        if operator == ":?":
            raise KeyError(f"{name}: {rest}")
        return rest if operator == ":-" else ""

    return re.sub(r"(?<!\$)\$\{([A-Z_][A-Z0-9_]*)(?:(:[-?])([^}]*))?\}", value, text)


SECRETS = {
    "REDIS_PASSWORD": "redispw0123",
    "POSTGRES_PASSWORD": "pgpw0123",
    "DJANGO_SECRET_KEY": "k" * 50,
    "GRAFANA_ADMIN_PASSWORD": "grafanapw0123",
}


def container_port(daphne_command):
    return int(daphne_command[daphne_command.index("-p") + 1])


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose):
    return compose["services"]


@pytest.fixture(scope="module")
def subnet(compose):
    (config,) = compose["networks"]["ducke"]["ipam"]["config"]
    return ipaddress.ip_network(config["subnet"])


@pytest.fixture(scope="module")
def nginx_conf():
    return (NGINX / "nginx.conf").read_text()


@pytest.fixture(scope="module")
def locations_conf():
    """The locations both servers include (ducke-locations.conf)."""
    return (NGINX / "ducke-locations.conf").read_text()


@pytest.fixture(scope="module")
def tls_conf():
    return (NGINX / "tls.conf").read_text()


@pytest.fixture(scope="module")
def tls_override():
    return yaml.safe_load(COMPOSE_TLS.read_text())


@pytest.fixture(scope="module")
def dashboard():
    return json.loads((DEPLOY / "grafana" / "dashboards" / "ducke.json").read_text())


def bind_mounts(service):
    """(host path, container path) of each ./relative bind mount."""
    mounts = []
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            mounts.append((ROOT / source, target))
    return mounts


def test_the_stack_has_every_service(services):
    assert set(services) == {*LONG_RUNNING, "migrate"}


def test_every_referenced_file_exists(services):
    checked = 0
    for name, service in services.items():
        build = service.get("build")
        if build:
            context = ROOT / build["context"]
            assert context.is_dir(), name
            assert (context / build.get("dockerfile", "Dockerfile")).is_file(), name
            checked += 1
        for host_path, _ in bind_mounts(service):
            assert host_path.exists(), f"{name} mounts missing {host_path}"
            checked += 1
        env_files = service.get("env_file", [])
        for env_file in [env_files] if isinstance(env_files, str) else env_files:
            path = env_file if isinstance(env_file, str) else env_file["path"]
            assert (ROOT / path).is_file() or env_file.get("required") is False, name
    assert checked >= 8


def test_dependencies_name_existing_services(services):
    conditions = {"service_started", "service_healthy", "service_completed_successfully"}
    for name, service in services.items():
        depends = service.get("depends_on", {})
        for target, spec in depends.items() if isinstance(depends, dict) else []:
            assert target in services, f"{name} depends on unknown {target}"
            assert spec["condition"] in conditions
    for app in APPS:
        depends = services[app]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully"
        assert depends["postgres"]["condition"] == "service_healthy"
        assert depends["redis"]["condition"] == "service_healthy"
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert {"app1", "app2"} <= set(services["nginx"]["depends_on"])


def test_health_checks_and_restart_policies(services):
    for name in LONG_RUNNING:
        assert services[name]["restart"] == "unless-stopped", name
        assert services[name]["healthcheck"]["test"], name
    # The one-shot migration must not be restarted after it exits successfully.
    assert services["migrate"]["restart"] == "no"
    for app in APPS:
        check = " ".join(services[app]["healthcheck"]["test"])
        assert f"http://127.0.0.1:{container_port(services[app]['command'])}/status" in check
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])


def test_migrations_run_once_before_the_apps(services):
    assert services["migrate"]["command"][-3:] == ["manage.py", "migrate", "--noinput"]
    for app in APPS:
        command = services[app]["command"]
        assert "migrate" not in command
        assert command[0] == "daphne" and command[-1] == "ducke.asgi:application"
        assert command[command.index("-b") + 1] == "0.0.0.0"
        assert services[app]["image"] == services["migrate"]["image"]


def test_redis_is_protected_persistent_and_never_evicts(services):
    command = services["redis"]["command"]
    option = {command[i]: command[i + 1] for i in range(1, len(command) - 1, 2)}
    assert option["--appendonly"] == "yes"
    assert option["--maxmemory"] == "256mb"
    assert option["--maxmemory-policy"] == "noeviction"
    password = interpolate(option["--requirepass"], SECRETS)
    assert password == SECRETS["REDIS_PASSWORD"]
    with pytest.raises(KeyError, match="REDIS_PASSWORD"):  # compose refuses to start without it
        interpolate(option["--requirepass"], {})
    for app in APPS:
        url = urlsplit(interpolate(services[app]["environment"]["REDIS_URL"], SECRETS))
        assert url.scheme == "redis" and url.hostname == "redis" and url.port == 6379
        assert url.password == password
    assert interpolate(services["redis"]["environment"]["REDISCLI_AUTH"], SECRETS) == password


def test_database_url_matches_postgres(services):
    postgres = services["postgres"]["environment"]
    for app in APPS:
        url = urlsplit(interpolate(services[app]["environment"]["DATABASE_URL"], SECRETS))
        assert url.scheme == "postgres" and url.hostname == "postgres" and url.port == 5432
        assert url.username == postgres["POSTGRES_USER"]
        assert url.path == f"/{postgres['POSTGRES_DB']}"
        assert url.password == interpolate(postgres["POSTGRES_PASSWORD"], SECRETS)
    assert services["postgres"]["image"].startswith("postgres:15")


def test_trusted_proxies_and_metrics_allowlist_are_the_network_subnet(services, subnet):
    for name, service in services.items():
        assert service["networks"] == ["ducke"], name
    for app in APPS:
        env = services[app]["environment"]
        assert [ipaddress.ip_network(env["QUOTAS_TRUSTED_PROXIES"])] == [subnet]
        assert [ipaddress.ip_network(env["DUCKE_METRICS_ALLOWED_CIDRS"])] == [subnet]
        hosts = interpolate(env["DJANGO_ALLOWED_HOSTS"], {}).split(",")
        # nginx keeps the public Host; Prometheus and the health check use these names.
        assert {"127.0.0.1", *APPS} <= set(hosts)
        assert interpolated_vars(env["OPENAI_API_KEY"]) == {"OPENAI_API_KEY"}


def test_every_variable_is_documented_and_no_secret_is_committed():
    used = interpolated_vars(COMPOSE.read_text()) | interpolated_vars(COMPOSE_TLS.read_text())
    example = (DEPLOY / ".env.example").read_text()
    documented = dict(
        line.split("=", 1) for line in example.splitlines() if line and not line.startswith("#")
    )
    assert used == set(documented)
    readme = (DEPLOY / "README.md").read_text()
    for name in used:
        assert f"`{name}`" in readme, name
    secret = re.compile(r"KEY|PASSWORD|TOKEN|WEBHOOK|EMAIL_URL")
    assert all(value == "" for name, value in documented.items() if secret.search(name))
    assert not (ROOT / ".env").exists() or ".env" in (ROOT / ".gitignore").read_text()


def test_dockerfile(services):
    dockerfile = (ROOT / services["app1"]["build"]["dockerfile"]).read_text()
    assert re.search(r"^FROM python:3\.11-slim$", dockerfile, re.M)
    assert "pip install -r requirements.txt" in dockerfile
    assert "manage.py collectstatic --noinput" in dockerfile
    users = re.findall(r"^USER (\S+)$", dockerfile, re.M)
    assert users and users[-1] not in {"root", "0"}
    assert (ROOT / "requirements.txt").is_file()


def nginx_locations(conf):
    return dict(re.findall(r"location\s+(=?\s*\S+)\s*\{([^}]*)\}", conf))


def directives(body, name):
    """Arguments of each ``name ...;`` directive in a block body."""
    return [m.split() for m in re.findall(rf"^\s*{name}\s+([^;]*);", body, re.M)]


def test_nginx_balances_both_apps(nginx_conf, locations_conf, services):
    (upstream,) = re.findall(r"upstream\s+(\w+)\s*\{([^}]*)\}", nginx_conf)
    name, body = upstream
    servers = re.findall(r"^\s*server\s+([\w.-]+):(\d+)", body, re.M)
    assert {(app, container_port(services[app]["command"])) for app in APPS} == {
        (host, int(port)) for host, port in servers
    }
    (listen,) = re.findall(r"^\s*listen\s+(\d+);", nginx_conf, re.M)
    assert services["nginx"]["ports"] == ["${DUCKE_HTTP_PORT:-8080}:" + listen]
    assert listen == "8080"
    mounts = dict(bind_mounts(services["nginx"]))
    assert mounts[NGINX / "nginx.conf"] == "/etc/nginx/conf.d/default.conf"
    # Not under conf.d/: the locations are included in a server, not in the http block.
    assert mounts[NGINX / "ducke-locations.conf"] == LOCATIONS_INCLUDE
    assert directives(nginx_conf, "include") == [[LOCATIONS_INCLUDE]]

    locations = nginx_locations(locations_conf)
    proxied = {path: body for path, body in locations.items() if "proxy_pass" in body}
    assert set(proxied) == {"/session", "= /admin/login/", "/"}
    for path, body in proxied.items():
        assert f"proxy_pass http://{name};" in body, path
        # A location that sets any header inherits none: each must set the client itself,
        # replacing whatever X-Forwarded-For the client sent (nginx is the edge).
        assert "proxy_set_header X-Forwarded-For $remote_addr;" in body, path
        assert "$proxy_add_x_forwarded_for" not in body, path
        assert "proxy_set_header Host $http_host;" in body, path
        # Always the proxy's own scheme: DJANGO_SECURE_PROXY_SSL_HEADER believes this header.
        assert "proxy_set_header X-Forwarded-Proto $scheme;" in body, path


def test_nginx_upgrades_websockets_for_session(nginx_conf, locations_conf):
    session = nginx_locations(locations_conf)["/session"]
    assert "proxy_http_version 1.1;" in session
    assert "proxy_set_header Upgrade $http_upgrade;" in session
    assert "proxy_set_header Connection $connection_upgrade;" in session
    assert re.search(r"map\s+\$http_upgrade\s+\$connection_upgrade\s*\{", nginx_conf)
    timeout = re.search(r"proxy_read_timeout\s+(\d+)s;", session)
    assert int(timeout.group(1)) >= 1800  # the default session duration cap


def test_nginx_keeps_metrics_and_simulator_internal(locations_conf, services):
    locations = nginx_locations(locations_conf)
    assert "return 404;" in locations["= /metrics"]
    assert "return 404;" in locations["/simulator/"]
    check = " ".join(services["nginx"]["healthcheck"]["test"])
    assert "/nginx-health" in check and "return 200" in locations["= /nginx-health"]


def per_minute(rate):
    number, unit = re.fullmatch(r"(\d+)r/([sm])", rate).groups()
    return int(number) * (60 if unit == "s" else 1)


def test_nginx_outer_ring_limits_per_client_address_above_the_app_rules(nginx_conf, locations_conf):
    zones = {}
    for args in directives(nginx_conf, "limit_req_zone"):
        key, zone, rate = args
        zones[zone.removeprefix("zone=").split(":")[0]] = (key, per_minute(rate[5:]))
    conn_zones = {
        zone.removeprefix("zone=").split(":")[0]: key
        for key, zone in directives(nginx_conf, "limit_conn_zone")
    }
    # Keyed by the client address (the login zone by it too, for POSTs only).
    assert {key for key, _ in zones.values()} <= {"$binary_remote_addr", "$ducke_login_key"}
    assert re.search(
        r"map\s+\$request_method\s+\$ducke_login_key\s*\{\s*POST\s+\$binary_remote_addr;",
        nginx_conf,
    )
    assert set(conn_zones.values()) == {"$binary_remote_addr"}
    assert directives(nginx_conf, "limit_req_status") == [["429"]]
    assert directives(nginx_conf, "limit_conn_status") == [["429"]]

    locations = nginx_locations(locations_conf)
    limited = {}
    for path in ("/", "/session", "= /admin/login/"):
        limits = directives(locations[path], "limit_req")
        assert limits, path
        for args in limits:
            options = dict(a.split("=", 1) if "=" in a else (a, True) for a in args)
            assert int(options["burst"]) >= 10 and options.get("nodelay"), (path, args)
            assert options["zone"] in zones, (path, args)
        limited[path] = {dict(a.split("=", 1) for a in args[:1])["zone"] for args in limits}
    ((zone, connections),) = directives(locations["/session"], "limit_conn")
    assert zone in conn_zones
    assert int(connections) > DEFAULT_BUDGET["max_concurrent_sessions_per_client"]

    # The apps' own rules (their 429 JSON, RateLimit-* headers, 4429 closes) decide first.
    rules = {target: limit * 60 / window for _, _, target, _, limit, window in DEFAULT_RULES}
    (session_zone,) = limited["/session"]
    assert zones[session_zone][1] > rules["/session"]
    (page_zone,) = limited["/"]
    assert zones[page_zone][1] > max(rules["/"], rules["*"])
    assert page_zone in limited["= /admin/login/"] and len(limited["= /admin/login/"]) == 2


def test_tls_override_fits_the_base_file(services, tls_override, tls_conf, locations_conf):
    overridden = tls_override["services"]
    assert set(overridden) <= set(services)
    nginx = overridden["nginx"]
    assert nginx["ports"] == ["${DUCKE_HTTPS_PORT:-443}:443"]
    assert directives(tls_conf, "listen") == [["443", "ssl"]]
    # Paths in an override file are relative to the first file's directory (the repo root).
    mounts = dict(bind_mounts(nginx))
    assert mounts[NGINX / "tls.conf"] == "/etc/nginx/conf.d/tls.conf"
    assert (NGINX / "tls.conf").is_file()
    (cert_mount,) = [v for v in nginx["volumes"] if v.startswith("${DUCKE_TLS_CERT_DIR:?")]
    with pytest.raises(KeyError, match="DUCKE_TLS_CERT_DIR"):  # no certificate, no start
        interpolate(cert_mount, {})
    cert_dir = interpolate(cert_mount, {"DUCKE_TLS_CERT_DIR": "/srv/tls"}).split(":")
    assert cert_dir == ["/srv/tls", "/etc/nginx/tls", "ro"]
    for name in ("ssl_certificate", "ssl_certificate_key"):
        ((path,),) = directives(tls_conf, name)
        assert Path(path).parent == Path(cert_dir[1]), name
    assert directives(tls_conf, "include") == [[LOCATIONS_INCLUDE]]
    assert "TLSv1 " not in tls_conf and "TLSv1.1" not in tls_conf
    for app in APPS:
        env = overridden[app]["environment"]
        assert env["DJANGO_SECURE_PROXY_SSL_HEADER"] == "HTTP_X_FORWARDED_PROTO,https"
        assert interpolate(env["DJANGO_SECURE_SSL_REDIRECT"], {}) == "true"
        # Every TLS variable the base file passes on, so .env can set them without the override.
        base = services[app]["environment"]
        for name in env:
            assert base[name] == f"${{{name}:-}}", name


def test_the_tls_environment_is_accepted_by_the_settings(services, tls_override):
    env = {**services["app1"]["environment"], **tls_override["services"]["app1"]["environment"]}
    env = {k: interpolate(str(v), SECRETS) for k, v in env.items()}
    env["DJANGO_SECURE_HSTS_SECONDS"] = "3600"
    probe = (
        "import json, ducke.settings as s; print(json.dumps({'errors': s.ENVIRONMENT_ERRORS,"
        "'header': s.SECURE_PROXY_SSL_HEADER, 'redirect': s.SECURE_SSL_REDIRECT,"
        "'cookies': [s.SESSION_COOKIE_SECURE, s.CSRF_COOKIE_SECURE],"
        "'hsts': s.SECURE_HSTS_SECONDS, 'trusted': s.CSRF_TRUSTED_ORIGINS}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        env={"PATH": os.environ.get("PATH", ""), **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded == {
        "errors": [],
        "header": ["HTTP_X_FORWARDED_PROTO", "https"],
        "redirect": True,
        "cookies": [True, True],
        "hsts": 3600,
        "trusted": [],
    }


def test_prometheus_scrapes_both_apps_with_the_token(services):
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "ducke"]
    targets = {t for group in job["static_configs"] for t in group["targets"]}
    assert targets == {f"{app}:{container_port(services[app]['command'])}" for app in APPS}
    assert job["metrics_path"] == "/metrics"
    token_file = job["authorization"]["credentials_file"]
    prometheus = services["prometheus"]
    entrypoint = " ".join(prometheus["entrypoint"])
    assert f'"$$DUCKE_METRICS_TOKEN" > {token_file}' in entrypoint
    assert prometheus["environment"]["DUCKE_METRICS_TOKEN"] == "${DUCKE_METRICS_TOKEN:-}"
    for app in APPS:
        assert services[app]["environment"]["DUCKE_METRICS_TOKEN"] == "${DUCKE_METRICS_TOKEN:-}"
    mounted = {target for _, target in bind_mounts(prometheus)}
    assert "/etc/prometheus/prometheus.yml" in mounted
    assert "--config.file=/etc/prometheus/prometheus.yml" in entrypoint
    for rule_file in config["rule_files"]:
        assert rule_file in mounted


def test_grafana_is_provisioned_against_the_prometheus_service(services, dashboard):
    grafana = services["grafana"]
    mounts = {host: target for host, target in bind_mounts(grafana)}
    provisioning = mounts[DEPLOY / "grafana" / "provisioning"]
    assert provisioning == "/etc/grafana/provisioning"
    datasources = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )["datasources"]
    (source,) = datasources
    url = urlsplit(source["url"])
    assert source["type"] == "prometheus"
    assert url.hostname == "prometheus" and url.hostname in services
    assert f":{url.port}/" in " ".join(services["prometheus"]["healthcheck"]["test"])

    (provider,) = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "dashboards" / "ducke.yml").read_text()
    )["providers"]
    assert mounts[DEPLOY / "grafana" / "dashboards"] == provider["options"]["path"]

    used_uids = {p["datasource"]["uid"] for p in dashboard["panels"]}
    used_uids |= {t["datasource"]["uid"] for p in dashboard["panels"] for t in p["targets"]}
    assert used_uids == {source["uid"]}


def test_promql_extractor_finds_metrics_only():
    expr = (
        'histogram_quantile(0.99, sum by (le, endpoint) (rate(foo_bucket{endpoint="/x"}[5m])))'
        " / on(instance) group_left bar_total * 3600 + vector($cap) or baz offset 1h"
    )
    assert promql_metric_names(expr) == {"foo_bucket", "bar_total", "baz"}


def dashboard_exprs(dashboard):
    return [t["expr"] for p in dashboard["panels"] for t in p["targets"]]


def test_dashboard_queries_only_exported_metrics(dashboard):
    exprs = dashboard_exprs(dashboard)
    assert len(exprs) >= 15
    used = set().union(*(promql_metric_names(e) for e in exprs))
    assert used <= ALLOWED_METRICS, used - ALLOWED_METRICS


def test_dashboard_covers_what_the_operator_watches(dashboard):
    used = set().union(*(promql_metric_names(e) for e in dashboard_exprs(dashboard)))
    for needed in (
        "rate_limit_exceeded_total",  # rate-limit violations
        "api_cost_total_usd_total",  # cost by model
        "active_sessions_total",
        "token_usage_total",
        "hourly_cost_usd",  # hourly spend vs caps
        "circuit_breaker_open",
    ):
        assert needed in used, needed
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"hourly_cap_usd", "breaker_threshold_usd"} <= variables
    for expr in dashboard_exprs(dashboard):
        for variable in re.findall(r"\$\{?(\w+)", expr):
            assert variable in variables


def test_alert_rules_query_only_exported_metrics():
    groups = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert {"DuckeCircuitBreakerOpen", "DuckeRedisUnavailable"} <= {r["alert"] for r in rules}
    for rule in rules:
        assert promql_metric_names(rule["expr"]) <= ALLOWED_METRICS | {"up"}, rule["alert"]


def test_contract_types_match_the_app_metrics():
    """Where quotas.metrics defines a contract metric, its type is the one the dashboard assumes."""
    import prometheus_client

    import quotas.metrics  # noqa: F401 - registers the app's metrics

    declared = {}
    for family in prometheus_client.REGISTRY.collect():
        declared[family.name] = family.type
    compared = 0
    for name, (kind, _) in CONTRACT.items():
        family = name.removesuffix("_total") if kind == "counter" else name
        if family in declared:
            assert declared[family] == kind, name
            compared += 1
    assert compared >= 2  # rate_limit_* exist from the start


def test_the_app_environment_is_accepted_by_the_settings(services):
    """The apps' interpolated environment loads ducke.settings without a single error."""
    env = {k: interpolate(str(v), SECRETS) for k, v in services["app1"]["environment"].items()}
    probe = (
        "import json, ducke.settings as s; print(json.dumps({"
        "'errors': s.ENVIRONMENT_ERRORS, 'db': s.DATABASES['default']['ENGINE'],"
        "'db_host': s.DATABASES['default']['HOST'], 'cache': s.CACHES['default']['BACKEND'],"
        "'hosts': s.ALLOWED_HOSTS, 'proxies': s.QUOTAS_TRUSTED_PROXIES}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        env={"PATH": os.environ.get("PATH", ""), **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded["errors"] == []
    assert loaded["db"] == "django.db.backends.postgresql" and loaded["db_host"] == "postgres"
    assert loaded["cache"] == "django_redis.cache.RedisCache"
    assert loaded["hosts"] == ["localhost", "127.0.0.1", "app1", "app2"]
    assert parse_trusted_proxies(loaded["proxies"]) == (ipaddress.ip_network("172.28.0.0/24"),)


def test_dashboard_layout_is_sane(dashboard):
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        assert panel["targets"], panel["title"]
    assert dashboard["uid"] and dashboard["title"]
