"""The browser <-> OpenAI Realtime relay behind ``WS /session``.

One ``SessionConsumer`` per browser connection. It opens the upstream session, sends the
server-owned ``session.update``, then relays: browser events pass ``client_events.sanitize``
(anything else is answered with an ``error`` event and dropped), upstream events go to the
browser as they came. Tool calls run here, on the server. The quotas app guards the
connection before this consumer runs (``quotas.guards.ConnectionGuard``).
"""

import asyncio
import json
import logging
import time

from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings

from ducke.realtime import client_events
from ducke.realtime.persona import session_update
from ducke.realtime.upstream import open_upstream
from ducke.tools import TOOL_SCHEMAS, run_tool
from quotas.guards import scope_client_ip, session_slots
from quotas.policies import policy_cache

logger = logging.getLogger("ducke.session")

CLOSE_FRAME_TOO_LARGE = 1009
CLOSE_UPSTREAM_FAILURE = 1011
SLOT_REFRESH_SECONDS = 30
DRAIN_SECONDS_AFTER_DISCONNECT = 10


def _setting(name, default):
    return getattr(settings, name, default)


def error_event(code, message, error_type="invalid_request_error"):
    """An ``error`` server event in the Realtime shape, safe to show the browser."""
    return {"type": "error", "error": {"type": error_type, "code": code, "message": message}}


class SessionConsumer(AsyncWebsocketConsumer):
    """Relays one browser voice session to the Realtime upstream."""

    async def connect(self):
        quotas = self.scope.get("quotas") or {}
        self.client = quotas.get("client") or scope_client_ip(self.scope)
        self.slot = quotas.get("slot")
        self.policy = quotas.get("policy") or await policy_cache.aget()
        self.model = _setting("DUCKE_REALTIME_MODEL", "gpt-realtime")
        self.upstream = None
        self.tasks = set()
        self.closing = False
        self.started = time.monotonic()
        self.last_activity = self.started
        self.active_response = None
        self.response_idle = asyncio.Event()
        self.response_idle.set()
        self.tools_running = 0
        self.pending_tool_outputs = []
        await self.accept()
        try:
            self.upstream = await open_upstream(
                self.scope,
                self.model,
                open_timeout=float(_setting("DUCKE_UPSTREAM_CONNECT_TIMEOUT_SECONDS", 10)),
            )
            await self.upstream.send(json.dumps(self._session_update()))
        except Exception as exc:  # any failure to reach upstream ends the session cleanly
            logger.warning("upstream connect failed: %s", exc.__class__.__name__)
            await self._end_for_upstream(
                "DUCK-E could not reach the voice service. Try again soon."
            )
            return
        self._spawn(self._read_upstream())
        self._spawn(self._watch())

    def _session_update(self):
        accept_language = ""
        for name, value in self.scope.get("headers", ()):
            if name == b"accept-language":
                accept_language = value.decode("latin-1")
        return session_update(model=self.model, accept_language=accept_language, tools=TOOL_SCHEMAS)

    def _spawn(self, coroutine):
        task = asyncio.create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def send_event(self, event):
        """Send one server event (a dict) to the browser."""
        if not self.closing:
            await self.send(text_data=json.dumps(event))

    async def close_with(self, code, event=None):
        """Optionally send a last event, then close the browser connection with ``code``."""
        if self.closing:
            return
        if event is not None:
            await self.send_event(event)
        self.closing = True
        await self.close(code)

    async def _end_for_upstream(self, message):
        await self.close_with(
            CLOSE_UPSTREAM_FAILURE, error_event("upstream_unavailable", message, "server_error")
        )

    # Browser -> upstream

    async def receive(self, text_data=None, bytes_data=None):
        self.last_activity = time.monotonic()
        if bytes_data is not None:
            await self.send_event(error_event("binary_not_supported", "Send JSON text frames."))
            return
        if len(text_data) > int(_setting("DUCKE_MAX_FRAME_BYTES", 256 * 1024)):
            await self.close_with(
                CLOSE_FRAME_TOO_LARGE, error_event("frame_too_large", "That message is too large.")
            )
            return
        try:
            event = client_events.sanitize(json.loads(text_data))
        except ValueError:
            await self.send_event(error_event("invalid_json", "Send one JSON event per frame."))
            return
        except client_events.RefusedEvent as refused:
            await self.send_event(error_event(refused.code, str(refused)))
            return
        if self.upstream is None or self.closing:
            return
        try:
            await self.upstream.send(json.dumps(event))
        except Exception as exc:
            logger.warning("upstream send failed: %s", exc.__class__.__name__)
            await self._end_for_upstream("The voice service connection was lost.")

    # Upstream -> browser

    async def _read_upstream(self):
        try:
            async for raw in self.upstream:
                if isinstance(raw, bytes):
                    continue
                try:
                    event = json.loads(raw)
                except ValueError:
                    continue
                if not self.closing:
                    await self.send(text_data=raw)
                await self._on_upstream_event(event)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.warning("upstream read failed: %s", exc.__class__.__name__)
        self.response_idle.set()
        if not self.closing:
            await self._end_for_upstream("The voice service ended the session unexpectedly.")

    async def _on_upstream_event(self, event):
        kind = event.get("type")
        if kind == "response.created":
            self.active_response = (event.get("response") or {}).get("id")
            self.response_idle.clear()
        elif kind == "response.done":
            self.active_response = None
            self.response_idle.set()
            await self._flush_tool_outputs()
        elif kind == "response.function_call_arguments.done":
            self.tools_running += 1
            self._spawn(self._run_tool(event))

    # Tools

    async def _run_tool(self, event):
        try:
            outcome = await run_tool(
                str(event.get("name", "")), str(event.get("arguments", "")), client=self.client
            )
            self.pending_tool_outputs.append(
                {
                    "type": "conversation.item.create",
                    "item": {
                        "type": "function_call_output",
                        "call_id": event.get("call_id"),
                        "output": outcome.output,
                    },
                }
            )
        finally:
            self.tools_running -= 1
        await self._flush_tool_outputs()

    async def _flush_tool_outputs(self):
        """Send finished tool results and ask for the spoken answer once nothing is running."""
        if self.tools_running or self.active_response or not self.pending_tool_outputs:
            return
        if self.upstream is None or self.closing:
            return
        outputs, self.pending_tool_outputs = self.pending_tool_outputs, []
        for item in outputs:
            await self.upstream.send(json.dumps(item))
        await self.upstream.send(json.dumps({"type": "response.create"}))

    # Time: idle timeout and slot refresh

    async def _watch(self):
        idle_limit = float(_setting("DUCKE_IDLE_TIMEOUT_SECONDS", 300))
        next_refresh = time.monotonic() + SLOT_REFRESH_SECONDS
        while not self.closing:
            now = time.monotonic()
            if now - self.last_activity >= idle_limit and self.response_idle.is_set():
                await self.close_with(
                    1000, error_event("idle_timeout", "Closed after a long silence.", "session")
                )
                return
            if self.slot and now >= next_refresh:
                await session_slots().refresh(
                    self.client, self.slot, self.policy.budget.max_concurrent_sessions_per_client
                )
                next_refresh = now + SLOT_REFRESH_SECONDS
            wake = min(self.last_activity + idle_limit, next_refresh) - time.monotonic()
            await asyncio.sleep(max(0.05, min(wake, 1.0)))

    # End of session

    async def disconnect(self, code):
        self.closing = True
        if self.upstream is not None and not self.response_idle.is_set():
            # Let the running response finish (or cancel it) so its usage is not lost.
            try:
                await self.upstream.send(json.dumps({"type": "response.cancel"}))
                await asyncio.wait_for(self.response_idle.wait(), DRAIN_SECONDS_AFTER_DISCONNECT)
            except Exception as exc:
                logger.warning("draining upstream after disconnect failed: %s", exc)
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.upstream is not None:
            await self.upstream.close()
