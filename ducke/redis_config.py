"""DUCK-E's Redis settings from ``REDIS_URL`` and ``QUOTAS_REDIS_URL`` (ducke/settings.py).

``REDIS_URL`` serves the cache (django-redis), the channel layer (channels-redis) and, unless
``QUOTAS_REDIS_URL`` names another, the quota counters. It is one server (``redis://``,
``rediss://``, ``unix://``) or a Sentinel-managed master (``redis+sentinel://``,
``rediss+sentinel://``): then the cache uses django-redis's Sentinel client and the channel
layer channels-redis's sentinel hosts, so all three follow the master the sentinels name.
A Redis Cluster serves the quota counters only (``QUOTAS_REDIS_URL=redis+cluster://...``):
neither django-redis's default client nor channels-redis's core layer speaks the cluster
protocol, so ``REDIS_URL`` keeps naming a non-cluster Redis for them.

Every URL form is parsed by ``quotas.redis_urls``; a bad value raises ``ValueError`` here and
becomes a ``ducke.E001`` message at start-up.
"""

import re

from quotas.redis_urls import SENTINEL, parse_redis_url

# How long the cache waits for Redis; with IGNORE_EXCEPTIONS a cache outage is a cache miss.
CACHE_TIMEOUT_SECONDS = 1
# django-redis reads the Sentinel master name from the host part of a URL (lower-cased).
_CACHE_MASTER_NAME = re.compile(r"^[a-z0-9_-]+$")


def shared_redis_url(raw):
    """``REDIS_URL``: any single-server or Sentinel form; a cluster is refused."""
    raw = (raw or "").strip()
    if not raw:
        return ""
    target = parse_redis_url(raw)
    if target.is_cluster:
        raise ValueError(
            "a Redis Cluster cannot serve the cache and the channel layer; set REDIS_URL to "
            "a single Redis or redis+sentinel://, and QUOTAS_REDIS_URL=redis+cluster://... "
            "for the quota counters"
        )
    if target.kind == SENTINEL and not _CACHE_MASTER_NAME.match(target.master):
        raise ValueError(
            f"Sentinel master name {target.master!r}: use lower-case letters, digits, '-' "
            "and '_' (django-redis reads it as a host name)"
        )
    return raw


def quota_redis_url(raw, shared_url):
    """``QUOTAS_REDIS_URL``: any form, cluster included; empty -> ``REDIS_URL``."""
    raw = (raw or "").strip()
    if not raw:
        return shared_url
    parse_redis_url(raw)
    return raw


def cache_settings(url):
    """``CACHES`` for ``url`` (empty: the local-memory cache)."""
    if not url:
        return {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
    options = {
        "SOCKET_CONNECT_TIMEOUT": CACHE_TIMEOUT_SECONDS,
        "SOCKET_TIMEOUT": CACHE_TIMEOUT_SECONDS,
        "IGNORE_EXCEPTIONS": True,
    }
    target = parse_redis_url(url)
    location = url
    if target.kind == SENTINEL:
        # Reads and writes both on the master (``is_master=1``): a replica may lag.
        location = [f"redis://{target.master}/{target.db}?is_master=1"]
        options.update(
            CLIENT_CLASS="django_redis.client.SentinelClient",
            CONNECTION_FACTORY="django_redis.pool.SentinelConnectionFactory",
            SENTINELS=list(target.hosts),
            SENTINEL_KWARGS={
                "socket_timeout": CACHE_TIMEOUT_SECONDS,
                "socket_connect_timeout": CACHE_TIMEOUT_SECONDS,
                **target.sentinel_options(),
            },
        )
        if target.username:
            options["USERNAME"] = target.username
        if target.password is not None:
            options["PASSWORD"] = target.password
        if target.tls:
            options["CONNECTION_POOL_KWARGS"] = {"ssl": True}
    return {
        "default": {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": location,
            "OPTIONS": options,
        }
    }


def channel_layer_settings(url):
    """``CHANNEL_LAYERS`` for ``url`` (empty: the in-memory layer)."""
    if not url:
        return {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    target = parse_redis_url(url)
    host = url
    if target.kind == SENTINEL:
        host = {
            "sentinels": list(target.hosts),
            "master_name": target.master,
            "sentinel_kwargs": target.sentinel_options() or None,
            "db": target.db,
            **target.auth_options(),
            **({"ssl": True} if target.tls else {}),
        }
    return {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [host]},
        }
    }
