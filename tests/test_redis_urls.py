"""Redis URL forms (quotas.redis_urls), their system check, and DUCK-E's cache and channel
layer settings for a Sentinel master (ducke.redis_config)."""

import pytest
from django.core.checks import run_checks

from ducke.redis_config import (
    cache_settings,
    channel_layer_settings,
    quota_redis_url,
    shared_redis_url,
)
from quotas.hash_tags import limiter_key, limiter_owner, spend_prefix
from quotas.redis_urls import CLUSTER, SENTINEL, SINGLE, RedisUrlError, parse_redis_url


def test_single_server_forms_pass_through():
    for url in ("redis://127.0.0.1:6379/3", "rediss://:pw@cache.example:6380/0", "unix:///r.sock"):
        target = parse_redis_url(url)
        assert (target.kind, target.url) == (SINGLE, url)
    assert parse_redis_url("rediss://h/0").tls


def test_sentinel_url_names_the_sentinels_the_master_and_the_database():
    target = parse_redis_url(
        "redis+sentinel://:s%40cret@10.0.0.1:26379,10.0.0.2,[::1]:26380/ducke-master/4"
    )
    assert target.kind == SENTINEL and not target.tls
    assert target.hosts == (("10.0.0.1", 26379), ("10.0.0.2", 26379), ("::1", 26380))
    assert (target.master, target.db, target.password) == ("ducke-master", 4, "s@cret")
    assert target.sentinel_options() == {}
    tls = parse_redis_url("rediss+sentinel://u:p@h1:1,h2:2/m?sentinel_password=sp")
    assert tls.tls and (tls.username, tls.password, tls.db) == ("u", "p", 0)
    assert tls.sentinel_options() == {"ssl": True, "password": "sp"}
    assert "p" not in repr(tls).replace("tls", "").split("password")[0][-3:]


def test_cluster_url_names_start_up_nodes():
    target = parse_redis_url("redis+cluster://h1:7000,h2:7001")
    assert (target.kind, target.hosts, target.db) == (CLUSTER, (("h1", 7000), ("h2", 7001)), 0)
    assert parse_redis_url("rediss+cluster://:pw@h1/0").tls


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://x", "must start with one of"),
        ("127.0.0.1:6379", "must start with one of"),
        ("redis://:6379/0", "missing its host"),
        ("redis://h:port/0", "bad port"),
        ("redis+sentinel://h1:26379,h2:26379", "needs the master name"),
        ("redis+sentinel://h1:26379/master/x", "bad database number"),
        ("redis+sentinel://h1:26379/a/1/2", "/<master>/<db>"),
        ("redis+sentinel://h1:99999/m/0", "bad port"),
        ("redis+sentinel://h1:26379,,h2/m/0", "empty host"),
        ("redis+sentinel://h1/m/0?tls=1", "unknown options: tls"),
        ("redis+cluster://h1:7000/3", "database 0 only"),
        ("redis+cluster://[::1/0", "malformed IPv6"),
    ],
)
def test_malformed_urls_say_what_is_wrong(url, problem):
    with pytest.raises(RedisUrlError, match=problem.replace("/", ".")):
        parse_redis_url(url)


def test_malformed_url_never_shows_the_password():
    with pytest.raises(RedisUrlError) as error:
        parse_redis_url("redis+sentinel://:hunter2@h1:26379/m/x")
    assert "hunter2" not in str(error.value)


@pytest.mark.parametrize(
    "url",
    ["redis+sentinel://h1:26379/m/x", "redis+cluster://h1:7000/2", "ftp://h"],
)
def test_system_check_stops_a_bad_quota_url(settings, url):
    settings.QUOTAS_REDIS_URL = url
    errors = [m for m in run_checks() if m.id == "quotas.E003"]
    assert errors and "QUOTAS_REDIS_URL" in errors[0].msg


def test_system_check_accepts_every_form(settings):
    for url in ("redis://h:1/0", "redis+sentinel://h1,h2/m/1", "redis+cluster://h1:1,h2:2"):
        settings.QUOTAS_REDIS_URL = url
        assert not [m for m in run_checks() if m.id == "quotas.E003"], url


def test_redis_url_refuses_a_cluster_and_quota_url_defaults_to_it():
    with pytest.raises(ValueError, match="QUOTAS_REDIS_URL=redis\\+cluster"):
        shared_redis_url("redis+cluster://h1:7000")
    with pytest.raises(ValueError, match="lower-case"):
        shared_redis_url("redis+sentinel://h1/MyMaster/0")
    assert quota_redis_url("", "redis://h/1") == "redis://h/1"
    assert quota_redis_url(" redis+cluster://h1:7000 ", "redis://h/1") == "redis+cluster://h1:7000"


def test_sentinel_cache_and_channel_layer_follow_the_master():
    url = "rediss+sentinel://:pw@10.0.0.1:26379,10.0.0.2:26379/ducke-master/2?sentinel_password=s"
    cache = cache_settings(url)["default"]
    assert cache["LOCATION"] == ["redis://ducke-master/2?is_master=1"]
    options = cache["OPTIONS"]
    assert options["CLIENT_CLASS"] == "django_redis.client.SentinelClient"
    assert options["CONNECTION_FACTORY"] == "django_redis.pool.SentinelConnectionFactory"
    assert options["SENTINELS"] == [("10.0.0.1", 26379), ("10.0.0.2", 26379)]
    assert options["PASSWORD"] == "pw" and options["CONNECTION_POOL_KWARGS"] == {"ssl": True}
    assert options["SENTINEL_KWARGS"]["password"] == "s" and options["IGNORE_EXCEPTIONS"]
    [host] = channel_layer_settings(url)["default"]["CONFIG"]["hosts"]
    assert host == {
        "sentinels": [("10.0.0.1", 26379), ("10.0.0.2", 26379)],
        "master_name": "ducke-master",
        "sentinel_kwargs": {"ssl": True, "password": "s"},
        "db": 2,
        "password": "pw",
        "ssl": True,
    }
    # One server: the URL as it is.
    assert cache_settings("redis://h:1/0")["default"]["LOCATION"] == "redis://h:1/0"
    assert channel_layer_settings("redis://h:1/0")["default"]["CONFIG"] == {
        "hosts": ["redis://h:1/0"]
    }


def test_sentinel_cache_settings_build_a_sentinel_client():
    """django-redis accepts the settings: its client's pool is a Sentinel pool."""
    from django_redis.client.sentinel import SentinelClient
    from django_redis.pool import get_connection_factory
    from redis.sentinel import SentinelConnectionPool

    config = cache_settings("redis+sentinel://127.0.0.1:1/ducke-master/2")["default"]
    factory = get_connection_factory(config["OPTIONS"])
    client = factory.connect(config["LOCATION"][0])
    assert isinstance(client.connection_pool, SentinelConnectionPool)
    assert client.connection_pool.service_name == "ducke-master"
    assert SentinelClient  # the class named in the settings imports


def test_cluster_keys_share_one_tag_per_script():
    assert spend_prefix("quotas", cluster=False) == "quotas"
    assert spend_prefix("quotas", cluster=True) == "quotas:{spend}"
    assert limiter_key("q:rl:", "status:ip:10.0.0.1", cluster=False) == "q:rl:status:ip:10.0.0.1"
    assert limiter_key("q:rl:", "status:ip:10.0.0.1", cluster=True) == "q:rl:{ip:10.0.0.1}:status"
    assert limiter_key("q:rl:", "odd", cluster=True) == "q:rl:{odd}"
    assert limiter_owner("page:user:7") == "user:7" and limiter_owner("odd") == "odd"
