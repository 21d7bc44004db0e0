"""A mixin for Channels consumers behind ``quotas.guards.ConnectionGuard``.

``QuotaConsumerMixin`` owns what every quota-guarded session does besides its own job:
- joins the channel-layer group of the circuit breaker (``quotas.breaker``) and leaves it,
  and closes the session with 4503 ``breaker`` when a trip is broadcast from any instance;
- keeps listening when the channel layer (Redis) goes away: Channels would end the session on
  the first error; the mixin retries, and re-joins the group (a restarted Redis forgot it).
  A read timeout is no outage: redis-py reads with a 5 s socket timeout by default and
  channels-redis blocks 5 s in BZPOPMIN, so a quiet channel regularly times out;
- refreshes the session's concurrent-session slot and its meter's heartbeat
  (``quota_refresh()``, call it about every ``quota_refresh_seconds``);
- sends ``quota.*`` events (``send_quota_event``) and closes on a refusal
  (``quota_close``: override it to drain and book before closing, as DUCK-E's relay does).

Put it before the Channels consumer class: ``class Chat(QuotaConsumerMixin,
AsyncWebsocketConsumer)``. It reads ``scope["quotas"]`` (``client``, ``slot``, ``policy``).
"""

import asyncio
import json
import logging

import redis.exceptions

from .breaker import BREAKER_GROUP
from .conf import quota_settings
from .protocol import CLOSE_PAUSED, exceeded_event

logger = logging.getLogger("quotas.consumers")

CHANNEL_LAYER_RETRY_SECONDS = 0.5
SLOT_REFRESH_SECONDS = 30


class QuotaConsumerMixin:
    """The breaker group, slot refresh, heartbeat and ``quota.*`` events of a guarded session."""

    quota_meter = None  # a SessionMeter, when the consumer meters spend

    @property
    def quota_refresh_seconds(self):
        """How often to refresh the slot and the heartbeat."""
        return min(SLOT_REFRESH_SECONDS, float(quota_settings.SESSION_HEARTBEAT_SECONDS))

    # -- the breaker group ----------------------------------------------------------------

    async def quota_join(self):
        """Join the breaker group (a failure is logged: the next charge sees the breaker)."""
        if self.channel_layer is None:
            return
        try:
            await self.channel_layer.group_add(BREAKER_GROUP, self.channel_name)
        except Exception as exc:
            logger.warning("could not join the breaker group: %s", exc.__class__.__name__)

    async def quota_leave(self):
        """Leave the breaker group (quietly: the session is ending)."""
        if self.channel_layer is None:
            return
        try:
            await self.channel_layer.group_discard(BREAKER_GROUP, self.channel_name)
        except Exception as exc:
            logger.debug("could not leave the breaker group: %s", exc.__class__.__name__)

    async def quotas_breaker_open(self, message):
        """The breaker opened somewhere (this or another instance): end this session."""
        await self.quota_close(
            CLOSE_PAUSED,
            exceeded_event(
                "breaker",
                message.get("message", "Paused."),
                int(message.get("retry_after", 60)),
            ),
            "breaker",
        )

    @property
    def channel_receive(self):
        return self._quota_receive_from_layer

    @channel_receive.setter
    def channel_receive(self, receive):
        self._quota_layer_receive = receive

    async def _quota_receive_from_layer(self):
        delay = CHANNEL_LAYER_RETRY_SECONDS
        failed = False
        while True:
            try:
                if failed:
                    await self.channel_layer.group_add(BREAKER_GROUP, self.channel_name)
                    logger.info("channel layer available again")
                    failed = False
                return await self._quota_layer_receive()
            except asyncio.CancelledError:
                raise
            except redis.exceptions.TimeoutError:
                continue  # nothing arrived in time: listen again
            except Exception as exc:
                if not failed:
                    logger.warning("channel layer unavailable: %s", exc.__class__.__name__)
                failed = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    # -- slot and heartbeat ------------------------------------------------------------------

    async def quota_refresh(self):
        """Keep the session's slot alive and prove its process is alive (heartbeat)."""
        from .guards import session_slots

        quotas = self.scope.get("quotas") or {}
        slot, client, policy = quotas.get("slot"), quotas.get("client"), quotas.get("policy")
        if slot and client and policy is not None:
            await session_slots().refresh(
                client, slot, policy.budget.max_concurrent_sessions_per_client
            )
        if self.quota_meter is not None:
            try:
                await self.quota_meter.heartbeat()
            except Exception as exc:  # a missed heartbeat is retried at the next refresh
                logger.warning("session heartbeat failed: %s", exc.__class__.__name__)

    # -- events and closes ---------------------------------------------------------------------

    async def send_quota_event(self, event):
        """Send one ``quota.*`` event (a dict) to the client."""
        await self.send(text_data=json.dumps(event))

    async def quota_close(self, code, event, reason):
        """Tell the client why (``event``), then close with ``code``; ``reason`` names the
        cap. Override to end the session your way (drain, book, then close)."""
        if event is not None:
            await self.send_quota_event(event)
        await self.close(code)
