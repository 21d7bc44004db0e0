"""Redis URLs: one server, a Sentinel-managed master, or a Redis Cluster; and their clients.

Accepted forms (``parse_redis_url``):

- ``redis://[[user]:password@]host[:port][/db]``, ``rediss://`` (TLS), ``unix:///path`` —
  one server, as redis-py's ``from_url`` reads them.
- ``redis+sentinel://[[user]:password@]host1[:26379],host2[:26379]/<master-name>[/<db>]``,
  ``rediss+sentinel://`` (TLS to the sentinels and the master) — the master that the
  sentinels name right now; the password is the master's (and its replicas'). Sentinels
  that need a password of their own take ``?sentinel_password=...`` (and
  ``sentinel_username``).
- ``redis+cluster://[[user]:password@]host1[:6379],host2[:6379][/0]``, ``rediss+cluster://``
  — a Redis Cluster; the hosts are start-up nodes (any of the cluster's nodes), the database
  is always 0.

A malformed URL raises ``RedisUrlError`` (a ``ValueError``) saying what is wrong, never the
password. ``sync_client`` and ``async_client`` build the matching redis-py client
(``Redis``, ``Sentinel(...).master_for``, ``RedisCluster``) with the caller's options.
"""

from dataclasses import dataclass, field
from urllib.parse import parse_qs, unquote, urlsplit

SINGLE, SENTINEL, CLUSTER = "single", "sentinel", "cluster"
_SCHEMES = {
    "redis": (SINGLE, False),
    "rediss": (SINGLE, True),
    "unix": (SINGLE, False),
    "redis+sentinel": (SENTINEL, False),
    "rediss+sentinel": (SENTINEL, True),
    "redis+cluster": (CLUSTER, False),
    "rediss+cluster": (CLUSTER, True),
}
_DEFAULT_PORT = {SENTINEL: 26379, CLUSTER: 6379}
SCHEMES_TEXT = ", ".join(f"{scheme}://" for scheme in _SCHEMES)


class RedisUrlError(ValueError):
    """A Redis URL that cannot be used; the message names the problem, not the password."""


@dataclass(frozen=True)
class RedisTarget:
    """What a Redis URL names: ``kind`` (single, sentinel, cluster) and how to reach it."""

    url: str
    kind: str
    tls: bool = False
    hosts: tuple = ()  # (host, port): the sentinels, or the cluster's start-up nodes
    master: str = ""  # the Sentinel master name
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    sentinel_username: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)

    @property
    def is_cluster(self):
        return self.kind == CLUSTER

    @property
    def is_sentinel(self):
        return self.kind == SENTINEL

    def auth_options(self):
        """``username``/``password`` keyword arguments of the data nodes' connections."""
        options = {}
        if self.username:
            options["username"] = self.username
        if self.password is not None:
            options["password"] = self.password
        return options

    def sentinel_options(self):
        """Connection options for the sentinels themselves (TLS, their own AUTH)."""
        options = {"ssl": True} if self.tls else {}
        if self.sentinel_username:
            options["username"] = self.sentinel_username
        if self.sentinel_password is not None:
            options["password"] = self.sentinel_password
        return options


def _host_port(text, default_port, scheme):
    if not text:
        raise RedisUrlError(f"{scheme}:// URL has an empty host in its host list")
    if text.startswith("["):  # [IPv6]:port
        host, bracket, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
        if not bracket or (rest and not rest.startswith(":")):
            raise RedisUrlError(f"{scheme}:// URL has a malformed IPv6 host {text!r}")
    else:
        host, _, port_text = text.partition(":")
    if not host:
        raise RedisUrlError(f"{scheme}:// URL has a host without a name: {text!r}")
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise RedisUrlError(f"{scheme}:// URL has a bad port {port_text!r} for host {host!r}")
    return host, int(port_text)


def _single(raw, scheme, tls):
    parts = urlsplit(raw)
    if scheme != "unix" and not parts.hostname:
        raise RedisUrlError(f"{scheme}:// URL is missing its host")
    try:
        parts.port  # noqa: B018 - raises ValueError for a malformed port
    except ValueError as exc:
        raise RedisUrlError(f"{scheme}:// URL has a bad port ({exc})") from None
    return RedisTarget(url=raw, kind=SINGLE, tls=tls)


def parse_redis_url(url):
    """The ``RedisTarget`` of ``url``; ``RedisUrlError`` when it is malformed."""
    raw = (url or "").strip()
    scheme, sep, rest = raw.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in _SCHEMES:
        shown = scheme if sep else raw[:20]
        raise RedisUrlError(f"the URL must start with one of {SCHEMES_TEXT}; got {shown!r}")
    kind, tls = _SCHEMES[scheme]
    if kind == SINGLE:
        return _single(raw, scheme, tls)
    rest = rest.partition("#")[0]
    rest, _, query = rest.partition("?")
    netloc, slash, path = rest.partition("/")
    auth, at, hosts_text = netloc.rpartition("@")
    username = password = None
    if at:
        user_text, colon, password_text = auth.partition(":")
        username = unquote(user_text) or None
        password = unquote(password_text) if colon else None
        if not colon:  # "secret@host": redis-py reads a bare userinfo as the password
            username, password = None, unquote(user_text)
    hosts = tuple(
        _host_port(item.strip(), _DEFAULT_PORT[kind], scheme) for item in hosts_text.split(",")
    )
    options = {key: values[-1] for key, values in parse_qs(query).items()}
    segments = [segment for segment in path.split("/")] if slash else []
    if segments and segments[-1] == "":
        segments.pop()
    if kind == SENTINEL:
        if not segments or not segments[0]:
            raise RedisUrlError(
                f"{scheme}:// URL needs the master name: {scheme}://host:26379/<master>/<db>"
            )
        if len(segments) > 2:
            raise RedisUrlError(
                f"{scheme}:// URL path is /<master>/<db>; got {len(segments)} parts"
            )
        master = unquote(segments[0])
        db_text = segments[1] if len(segments) == 2 else "0"
    else:
        master = ""
        if len(segments) > 1:
            raise RedisUrlError(f"{scheme}:// URL path is at most /0")
        db_text = segments[0] if segments else "0"
    if not db_text.isdigit():
        raise RedisUrlError(f"{scheme}:// URL has a bad database number {db_text!r}")
    db = int(db_text)
    if kind == CLUSTER and db != 0:
        raise RedisUrlError(f"{scheme}:// URL: a Redis Cluster has database 0 only, not {db}")
    unknown = set(options) - {"sentinel_password", "sentinel_username"}
    if unknown or (kind == CLUSTER and options):
        raise RedisUrlError(
            f"{scheme}:// URL has unknown options: {', '.join(sorted(unknown or options))}"
        )
    return RedisTarget(
        url=raw,
        kind=kind,
        tls=tls,
        hosts=hosts,
        master=master,
        db=db,
        username=username,
        password=password,
        sentinel_username=options.get("sentinel_username"),
        sentinel_password=options.get("sentinel_password"),
    )


def sync_client(target, **options):
    """A redis-py client (sync) for ``target``; ``options`` go to every data connection."""
    import redis
    import redis.cluster
    import redis.sentinel

    return _client(target, options, redis.Redis, redis.sentinel.Sentinel, redis.cluster)


def async_client(target, **options):
    """The asyncio twin of ``sync_client`` (bind one to each event loop)."""
    import redis.asyncio
    import redis.asyncio.cluster
    import redis.asyncio.sentinel

    return _client(
        target, options, redis.asyncio.Redis, redis.asyncio.sentinel.Sentinel, redis.asyncio.cluster
    )


def _client(target, options, redis_class, sentinel_class, cluster_module):
    if target.kind == SINGLE:
        return redis_class.from_url(target.url, **options)
    auth = target.auth_options()
    if target.kind == SENTINEL:
        socket_options = {k: v for k, v in options.items() if k.startswith("socket_")}
        sentinel = sentinel_class(
            list(target.hosts),
            sentinel_kwargs={**socket_options, **target.sentinel_options()},
            **({"ssl": True} if target.tls else {}),
        )
        return sentinel.master_for(target.master, db=target.db, **auth, **options)
    nodes = [cluster_module.ClusterNode(host, port) for host, port in target.hosts]
    options = {key: value for key, value in options.items() if key != "health_check_interval"}
    return cluster_module.RedisCluster(startup_nodes=nodes, ssl=target.tls, **auth, **options)
