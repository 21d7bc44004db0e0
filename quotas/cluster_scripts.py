"""Running a quota script on a Redis Cluster (sync): the slot's node, then redis-py's client.

Every key of one script shares a hash tag (``quotas.hash_tags``), so the slot of the first
key is the script's. redis-py's ``RedisCluster`` knows which node serves each slot; a call
through ``RedisCluster.evalsha`` costs about three times a decision's script in Python
(command parsing, slot checks, pool checkout, its retry wrapper). So the common case sends
the packed EVALSHA itself, on a connection of its own per thread and node, to the node the
client's slot map names. Anything else goes through the client, which handles it: NOSCRIPT
(the script is loaded on every primary), MOVED and ASK (the map is refreshed), a node that
is gone (the map is rebuilt; the call fails when no node answers for the slot).
"""

import os
import threading

import redis
from redis.crc import key_slot

_REROUTE = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.MovedError,
    redis.exceptions.AskError,
    redis.exceptions.TryAgainError,
    redis.exceptions.ClusterDownError,
)


def evalsha(client, script, keys, args):
    """``script`` through a redis-py client (sync), loaded first when the server lacks it."""
    try:
        return client.evalsha(script.sha, len(keys), *keys, *args)
    except redis.exceptions.NoScriptError:
        client.script_load(script.source)
        return client.evalsha(script.sha, len(keys), *keys, *args)


class ClusterScripts:
    """``execute(script, keys, args)`` on the node of the keys' slot."""

    def __init__(self, client):
        self.client = client
        self._local = threading.local()

    def _connection(self, node):
        local = self._local
        if getattr(local, "pid", None) != os.getpid():
            local.connections, local.pid = {}, os.getpid()
        connection = local.connections.get(node.name)
        if connection is None:
            pool = node.redis_connection.connection_pool
            connection = pool.connection_class(**pool.connection_kwargs)
            local.connections[node.name] = connection
        return connection

    def execute(self, script, keys, args):
        """The script's reply; raises a Redis error when no node answers for the slot."""
        key = keys[0]
        slot = key_slot(key if isinstance(key, bytes) else key.encode())
        try:
            node = self.client.nodes_manager.get_node_from_slot(slot)
        except redis.exceptions.RedisError:
            return self._through_client(script, keys, args)
        connection = self._connection(node)
        try:
            connection.send_packed_command([script.pack(keys, args)], check_health=False)
            return connection.read_response()
        except redis.exceptions.NoScriptError:
            self.client.script_load(script.source)
        except _REROUTE:
            connection.disconnect()
        return self._through_client(script, keys, args)

    def _through_client(self, script, keys, args):
        return evalsha(self.client, script, keys, args)

    def close(self):
        """Close this thread's node connections."""
        for connection in getattr(self._local, "connections", {}).values():
            connection.disconnect()
        self._local.connections = {}
