"""Where each quota key lives on a Redis Cluster: one hash tag for every key a script touches.

A Lua script may only touch keys of one hash slot, and a key's slot is that of its hash tag
(the text between its first ``{`` and the next ``}``). On a single Redis (or a Sentinel
master) no tag is added, so keys keep their names; on a cluster (``QUOTAS_REDIS_URL=
redis+cluster://...``):

- Rate-limit counters carry their owner: ``<prefix>:rl:{ip:10.0.0.1}:status`` (the owner is
  what ``limits_for`` puts after the rule name, which is a slug and has no colon). Every rule
  of a request that counts the same client shares its tag, so the request is decided by one
  script in one round trip; the clients spread over every slot. A request whose rules count
  several owners (``ip`` and ``user`` or ``global`` rules together) is decided per owner
  (see ``quotas.limiter.RedisWindows``).
- Spend counters share one tag, ``<prefix>:{spend}:spend:...``: every spend decision touches
  the rolling hour's counter and the breaker, which are global, together with the session's
  and the client's and user's limit counters, and only one slot can hold them all. These keys
  are the hot ones (one script per reservation, settlement and admission, about one per
  answer); they live on one node, which is the price of an atomic decision over global caps.
- A session slot set is one key per client (``<prefix>:slots:<client>``) and its scripts
  touch that key alone, so the slots spread without a tag.
"""

SPEND_TAG = "spend"


def spend_prefix(prefix, cluster):
    """The prefix of every spend key: ``prefix:{spend}`` on a cluster, else ``prefix``."""
    return f"{prefix}:{{{SPEND_TAG}}}" if cluster else prefix


def limiter_owner(key):
    """The owner (client, user, ``global``) a limiter key ``<rule>:<owner>`` counts."""
    _rule, sep, owner = key.partition(":")
    return owner if sep and owner else key


def limiter_key(prefix, key, cluster):
    """The Redis key of the limiter counter ``key`` under ``prefix`` (which ends in ``:``)."""
    if not cluster:
        return f"{prefix}{key}"
    rule, sep, owner = key.partition(":")
    if not sep or not owner:
        return f"{prefix}{{{key}}}"
    return f"{prefix}{{{owner}}}:{rule}"
