"""The browser <-> OpenAI Realtime relay behind ``WS /session``.

One ``SessionConsumer`` per browser connection. It opens the upstream session, sends the
server-owned ``session.update``, then relays: browser events pass ``client_events.sanitize``
(anything else is answered with an ``error`` event and dropped), upstream events go to the
browser as they came. Tool calls run here, on the server.

Money: the relay starts every response itself (spoken turn, typed turn, after a tool), and
only after ``quotas.realtime.meter.SessionMeter.reserve_response`` has held its worst case against
every cap (session, spend limits, hourly, breaker): refused, the browser gets
``quota.exceeded`` and the session ends. A response counts as running from the moment its
``response.create`` is sent, so at most one runs. The meter books every upstream
``response.done`` (settling its hold), input transcription and tool usage exactly once. While
a response streams, each audio delta updates the meter's projection; when the session cap (or
the breaker threshold) would be passed within about a second of audio, the relay cancels the
response upstream and ends the session once the final usage is booked. A browser that leaves
mid-response, a quota close and a server shutdown all drain upstream first, so the usage of
every response is booked.

The upstream read path never waits for the ledger: audio deltas are read without a JSON parse
(``ducke.realtime.upstream.read_audio_delta``), and the bookings it meets (a response's
settlement at ``response.done``, input transcriptions) run in turn in tasks while later events
keep flowing to the browser. The response lifecycle (``ducke.response_lifecycle``) keeps the
next reservation waiting until they are over, and the session's end too (bounded). Under
daphne, a browser's plain audio chunk goes upstream as daphne reads it, while the consumer
waits for its next message (``_take_audio_on_arrival``); anything else comes through
``receive``. Where the relay reaches into daphne, Twisted, Channels or websockets:
``ducke.server_workarounds``.
The quotas app guards the connection before this consumer runs
(``quotas.guards.ConnectionGuard``: rate limit, concurrent sessions, hourly cap, breaker).
"""

import asyncio
import json
import logging
import time

from channels.generic.websocket import AsyncWebsocketConsumer

from ducke.conf import ducke_settings
from ducke.realtime import client_events
from ducke.realtime.persona import TRANSCRIPTION_MODEL, session_update
from ducke.realtime.upstream import is_base64_alphabet, open_upstream, read_audio_delta
from ducke.response_lifecycle import ResponseLifecycle
from ducke.server_workarounds import (
    DirectDispatchMixin,
    DirectReceiveMixin,
    ServerShutdown,
    backlog_reader,
    browser_text_writer,
    send_upstream_text,
    take_text_on_arrival,
    write_upstream_text,
)
from ducke.tools import TOOL_SCHEMAS, run_tool
from quotas.caps import Identity
from quotas.consumers import QuotaConsumerMixin
from quotas.guards import scope_client_ip
from quotas.policies import policy_cache
from quotas.protocol import close_code_for, exceeded_event, refusal_message
from quotas.realtime.meter import SessionMeter

logger = logging.getLogger("ducke.session")

CLOSE_NORMAL = 1000
CLOSE_FRAME_TOO_LARGE = 1009
CLOSE_UPSTREAM_FAILURE = 1011
CLOSE_SERVICE_RESTART = 1012
CLOSE_TRY_AGAIN_LATER = 1013
DRAIN_SECONDS = 10
BOOKING_RETRY_SECONDS = 1.0


# What browsers (JSON.stringify) and Python (json.dumps) send for an audio chunk. A frame of
# exactly this shape whose audio is base64 needs no parsing: ``sanitize`` would return it as is.
_AUDIO_APPEND_UPSTREAM = '{"type": "input_audio_buffer.append", "audio": "%s"}'
_AUDIO_APPEND_UPSTREAM_BYTES = _AUDIO_APPEND_UPSTREAM.encode()
_AUDIO_APPEND_PREFIXES = (
    b'{"type":"input_audio_buffer.append","audio":"',
    _AUDIO_APPEND_UPSTREAM_BYTES[: _AUDIO_APPEND_UPSTREAM_BYTES.index(b"%s")],
)


def error_event(code, message, error_type="invalid_request_error"):
    """An ``error`` server event in the Realtime shape, safe to show the browser."""
    return {"type": "error", "error": {"type": error_type, "code": code, "message": message}}


def _plain_audio_span(data):
    """``(prefix, start, end)``: where the audio of a bare, valid ``input_audio_buffer.append``
    frame (UTF-8 bytes) is, read unparsed; None for any other frame."""
    for prefix in _AUDIO_APPEND_PREFIXES:
        if data.startswith(prefix) and data.endswith(b'"}'):
            start, end = len(prefix), len(data) - 2
            if end > start and not (end - start) % 4 and _padded_base64(data[start:end]):
                return prefix, start, end
            return None
    return None


def _padded_base64(audio):
    """Whether ``audio`` (bytes) is base64 characters then at most two ``=`` (what the regex
    ``[A-Za-z0-9+/]*={0,2}`` matches), checked in C (``is_base64_alphabet``)."""
    core = audio.rstrip(b"=")
    return len(audio) - len(core) <= 2 and b"=" not in core and is_base64_alphabet(core)


def plain_audio_append(text):
    """The audio of a bare, valid ``input_audio_buffer.append`` frame read unparsed, else None."""
    span = _plain_audio_span(text.encode())
    return None if span is None else text[span[1] : span[2]]


def upstream_audio_frame(data):
    """``(pcm16 bytes, frame for upstream)`` of a bare, valid ``input_audio_buffer.append``
    frame (UTF-8 bytes) read unparsed, else None. The frame for upstream (bytes) is what
    json.dumps writes for the sanitized event: the browser's own bytes when it came in that
    form already."""
    span = _plain_audio_span(data)
    if span is None:
        return None
    prefix, start, end = span
    if prefix is not _AUDIO_APPEND_PREFIXES[-1]:
        data = _AUDIO_APPEND_UPSTREAM_BYTES % data[start:end]
    return base64_bytes(end - start), data


def base64_bytes(chars):
    """Bytes carried by ``chars`` base64 characters, without decoding them."""
    return chars * 3 // 4


def audio_bytes(base64_text):
    """pcm16 bytes carried by a base64 string, without decoding it."""
    return base64_bytes(len(base64_text)) if isinstance(base64_text, str) else 0


async def _end_for_shutdown(session):
    await session._end_for_shutdown()


# The sessions of this process, ended properly when the server stops (daphne's SIGTERM).
server_shutdown = ServerShutdown(_end_for_shutdown)


class SessionConsumer(
    DirectDispatchMixin, DirectReceiveMixin, QuotaConsumerMixin, AsyncWebsocketConsumer
):
    """Relays one browser voice session to the Realtime upstream and meters it."""

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        except asyncio.CancelledError:
            # The server cancels its applications to stop (ServerShutdown says why): end
            # this session properly, and wait for every other session's ending too.
            server_shutdown.begin(self)
            await server_shutdown.ended()
            raise
        finally:
            server_shutdown.discard(self)

    # Connect

    async def connect(self):
        self.lifecycle = ResponseLifecycle()
        server_shutdown.install_reactor_trigger()
        quotas = self.scope.get("quotas") or {}
        self.client = quotas.get("client") or scope_client_ip(self.scope)
        self.slot = quotas.get("slot")
        self.policy = quotas.get("policy") or await policy_cache.aget()
        self.identity = quotas.get("identity") or Identity(client=self.client)
        self.model = ducke_settings.REALTIME_MODEL
        self.max_backlog = int(ducke_settings.MAX_SEND_BACKLOG_BYTES)
        self.backlog = backlog_reader(self.base_send)
        self.write_browser_text = browser_text_writer(self.base_send)
        take_text_on_arrival(self.base_send, self._take_audio_on_arrival)
        self.max_frame_bytes = int(ducke_settings.MAX_FRAME_BYTES)
        self.upstream = None
        self.meter = None
        self.tasks = set()
        self.end_reason = "client_closed"
        self.last_activity = time.monotonic()
        self.pending_tool_outputs = []
        self.unbooked = []
        self.last_booking = None  # the read path's bookings run in turn, in this chain
        server_shutdown.add(self)
        await self.accept()
        self.meter = SessionMeter(
            self.client,
            self.model,
            self.policy.budget,
            identity=self.identity,
            limits=self.policy.spend_limits,
            slot=self.slot or "",
        )
        try:
            await self.meter.open()
        except Exception as exc:  # no ledger, no session: refuse explicitly
            logger.error("could not open the session ledger: %s", exc.__class__.__name__)
            self.meter = None
            await self.close_with(
                CLOSE_UPSTREAM_FAILURE,
                error_event(
                    "service_unavailable",
                    "DUCK-E cannot start a session right now.",
                    "server_error",
                ),
            )
            return
        self.quota_meter = self.meter
        await self.quota_join()
        try:
            self.upstream = await open_upstream(
                self.scope,
                self.model,
                open_timeout=float(ducke_settings.UPSTREAM_CONNECT_TIMEOUT_SECONDS),
            )
            update = json.dumps(self._session_update())
            await self.upstream.send(update)
            self.meter.note_input_text(update)
        except Exception as exc:  # any failure to reach upstream ends the session cleanly
            logger.warning("upstream connect failed: %s", exc.__class__.__name__)
            await self._end_for_upstream(
                "DUCK-E could not reach the voice service. Try again soon."
            )
            return
        self._spawn(self._read_upstream())
        self._spawn(self._watch())
        await self.send_event(self.meter.status())

    def _session_update(self):
        accept_language = ""
        for name, value in self.scope.get("headers", ()):
            if name == b"accept-language":
                accept_language = value.decode("latin-1")
        return session_update(
            model=self.model,
            accept_language=accept_language,
            tools=TOOL_SCHEMAS,
            max_output_tokens=self.policy.budget.max_output_tokens_per_response,
        )

    def _spawn(self, coroutine):
        task = asyncio.create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def send_event(self, event):
        """Send one server event (a dict) to the browser."""
        if not self.lifecycle.closing:
            await self.send(text_data=json.dumps(event))

    async def close_with(self, code, event=None, end_reason=None):
        """Optionally send a last event, then close the browser connection with ``code``."""
        if self.lifecycle.closing:
            return
        if event is not None:
            await self.send_event(event)
        if end_reason:
            self.end_reason = end_reason
        self.lifecycle.close()
        await self.close(code)

    async def _end_for_upstream(self, message):
        await self.close_with(
            CLOSE_UPSTREAM_FAILURE,
            error_event("upstream_unavailable", message, "server_error"),
            end_reason="upstream_error",
        )

    # Browser -> upstream

    async def receive(self, text_data=None, bytes_data=None):
        self.last_activity = time.monotonic()
        if bytes_data is not None:
            await self.send_event(error_event("binary_not_supported", "Send JSON text frames."))
            return
        if len(text_data) > self.max_frame_bytes:
            await self.close_with(
                CLOSE_FRAME_TOO_LARGE,
                error_event("frame_too_large", "That message is too large."),
                end_reason="error",
            )
            return
        audio = upstream_audio_frame(text_data.encode())
        if audio is not None:
            # The common frame, checked without a JSON round trip; forwarded byte for byte as
            # json.dumps would have written the sanitized event.
            if self.upstream is None or self.lifecycle.closing:
                return
            self.meter.note_input_audio(audio[0])
            await self._send_upstream(audio[1])
            return
        try:
            event = client_events.sanitize(json.loads(text_data))
        except ValueError:
            await self.send_event(error_event("invalid_json", "Send one JSON event per frame."))
            return
        except client_events.RefusedEvent as refused:
            await self.send_event(error_event(refused.code, str(refused)))
            return
        if self.upstream is None or self.lifecycle.closing:
            return
        if event["type"] == "input_audio_buffer.append":
            self.meter.note_input_audio(audio_bytes(event["audio"]))
        elif event["type"] == "conversation.item.create":
            self.meter.note_input_text("".join(part["text"] for part in event["item"]["content"]))
        elif event["type"] == "response.create":
            await self._create_response(requested=True)
            return
        await self._send_upstream(json.dumps(event))

    async def _create_response(self, requested=False):
        """Ask upstream for a response once its worst case is reserved against every cap.

        Every response, spoken or typed or after a tool, starts here: upstream bills the
        whole conversation as input the moment a response starts, so the budgets are checked
        before, not after (``SessionMeter.reserve_response``). A browser's ``response.create``
        while one runs is refused as upstream would (one response at a time); a spoken turn
        or a tool result waits for the running response to be settled, and so does a
        browser's request that comes after ``response.done`` but before the settlement."""
        life = self.lifecycle
        if self.upstream is None or life.closing or life.cutoff:
            return
        if requested and (life.running or life.create_waiting):
            await self.send_event(
                error_event(
                    "conversation_already_has_active_response",
                    "A response is already in progress; wait for it to finish.",
                )
            )
            return
        if not life.idle:
            # A response is running, or its usage is still being booked: decide once the
            # ledger has it, or the check would use a stale spend.
            if life.wait_to_create():
                self._spawn(self._create_response_when_idle())
            return
        life.reserve()
        try:
            # Policy edits (caps, spend limits) reach running sessions at their next answer.
            self.policy = await policy_cache.aget()
            self.meter.use_policy(self.policy.budget, self.policy.spend_limits)
            admission = await self.meter.reserve_response()
        except Exception as exc:  # no hold, no response: the budgets cannot be checked
            logger.error("could not reserve a response: %s", exc.__class__.__name__)
            life.not_started()
            await self.close_with(
                CLOSE_UPSTREAM_FAILURE,
                error_event(
                    "service_unavailable", "DUCK-E cannot answer right now.", "server_error"
                ),
                end_reason="error",
            )
            return
        if not admission.allowed:
            life.not_started()
            code, event = self.meter.refusal(admission)
            await self.close_with(code, event, admission.reason)
            return
        event_id = life.request()
        if event_id is None:  # upstream went away meanwhile: the session is ending
            return
        await self._send_upstream(json.dumps({"type": "response.create", "event_id": event_id}))

    async def _create_response_when_idle(self):
        await self.lifecycle.wait_idle()
        self.lifecycle.stop_waiting()
        await self._create_response()

    async def _release_unstarted(self):
        """Upstream refused the response just requested: give its hold back."""
        try:
            await self.meter.release_reservation()
        except Exception as exc:  # the hold expires with its window; the session goes on
            logger.warning("could not release a reservation: %s", exc.__class__.__name__)
        self.lifecycle.not_started()

    def _take_audio_on_arrival(self, payload):
        """Offered each browser text frame as daphne reads it (``take_text_on_arrival``): a
        plain audio chunk goes upstream at once, as ``receive`` would send it, while the
        consumer waits for its next message with nothing being dispatched (the chunk keeps its
        place among the browser's messages). False leaves the frame to ``receive``."""
        if (
            not self.dispatch_idle
            or len(payload) > self.max_frame_bytes
            or self.upstream is None
            or self.lifecycle.closing
        ):
            return False
        audio = upstream_audio_frame(payload)
        if audio is None or not write_upstream_text(self.upstream, audio[1]):
            return False
        self.last_activity = time.monotonic()
        self.meter.note_input_audio(audio[0])
        return True

    async def _send_upstream(self, text):
        """Send ``text`` (str, or UTF-8 bytes) upstream; a failure ends the session."""
        try:
            await send_upstream_text(self.upstream, text)
        except Exception as exc:
            logger.warning("upstream send failed: %s", exc.__class__.__name__)
            await self._end_for_upstream("The voice service connection was lost.")

    # Upstream -> browser

    async def _read_upstream(self):
        try:
            async for raw in self.upstream:
                if isinstance(raw, bytes):
                    continue
                delta = read_audio_delta(raw)
                if delta is not None:
                    # Most of the stream: read from the frame text, no JSON parse.
                    response_id, delta_chars = delta
                    await self._forward(raw)
                    await self._on_audio_delta(response_id, base64_bytes(delta_chars))
                    continue
                try:
                    event = json.loads(raw)
                except ValueError:
                    continue
                kind = event.get("type")
                if kind == "response.done":
                    # Over for the browser from the moment it can see this: a response.create
                    # it sends now waits for the settlement instead of being refused.
                    self.lifecycle.done()
                await self._forward(raw)
                await self._on_upstream_event(kind, event)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.warning("upstream read failed: %s", exc.__class__.__name__)
        self.lifecycle.upstream_lost()
        if not self.lifecycle.closing:
            await self._end_for_upstream("The voice service ended the session unexpectedly.")

    async def _forward(self, raw):
        """Relay one upstream frame as it came, unless the browser stopped reading."""
        if self.lifecycle.closing:
            return
        if self.backlog() > self.max_backlog:
            await self._end_for_slow_client()
        elif not self.write_browser_text(raw):
            await self.send(text_data=raw)

    async def _end_for_slow_client(self):
        """The browser does not read what it asked for: end the session (usage is still
        drained and booked) instead of buffering its audio without bound."""
        logger.warning(
            "closing a session whose browser does not read (%d bytes waiting)",
            self.backlog(),
        )
        await self.close_with(
            CLOSE_TRY_AGAIN_LATER,
            error_event("client_too_slow", "The connection is too slow for live audio.", "session"),
            end_reason="error",
        )

    async def _on_upstream_event(self, kind, event):
        if kind == "response.output_audio.delta":
            await self._on_audio_delta(event.get("response_id"), audio_bytes(event.get("delta")))
        elif kind == "response.created":
            response_id = (event.get("response") or {}).get("id")
            self.lifecycle.created(response_id)
            self.meter.note_response_started(response_id)
        elif kind == "response.done":
            # The hold is taken now: a retried booking (database away) settles this same hold,
            # and the next answer may be reserved meanwhile.
            reservation = self.meter.take_reservation(
                (event.get("response") or {}).get("id") or event.get("response_id")
            )
            self._queue_booking(self._settle, event, reservation)
        elif kind == "error":
            if self.lifecycle.requested:
                error = event.get("error") or {}
                if error.get("event_id") == self.lifecycle.create_event_id or error.get("code") == (
                    "conversation_already_has_active_response"
                ):
                    await self._release_unstarted()
        elif kind == "conversation.item.input_audio_transcription.completed":
            if event.get("usage"):
                self.lifecycle.booking_queued()
                self._queue_booking(
                    self._book_transcription, str(event.get("item_id")), event["usage"]
                )
        elif kind == "response.function_call_arguments.done":
            self.lifecycle.tool_started()
            self._spawn(self._run_tool(event))
        elif kind == "input_audio_buffer.committed":
            # Server VAD ended a spoken turn; upstream does not answer by itself
            # (create_response is off), so the answer passes the budget check too.
            await self._create_response()

    async def _on_audio_delta(self, response_id, nbytes):
        """Project the running response's cost; cut it off before it overspends."""
        reason = self.meter.note_output_audio(response_id, nbytes)
        if reason and self.lifecycle.cut_off(reason):
            await self._cut_off(reason, response_id)

    async def _cut_off(self, reason, response_id):
        """Cancel the running response before it overspends; the session ends after booking."""
        logger.info("cutting off response %s: projected %s limit", response_id, reason)
        cancel = {"type": "response.cancel"}
        if response_id:
            cancel["response_id"] = response_id
        try:
            await self.upstream.send(json.dumps(cancel))
        except Exception as exc:
            logger.warning("could not cancel upstream: %s", exc.__class__.__name__)

    async def _settle(self, event, reservation):
        """Book a finished response (settling its hold), then go on: cutoff or tools."""
        try:
            await self._book(self.meter.charge_response, event, reservation)
        finally:
            self.lifecycle.settled()
        await self._after_response()

    async def _book_transcription(self, item_id, usage):
        try:
            await self._book(self.meter.charge_transcription, item_id, usage, TRANSCRIPTION_MODEL)
        finally:
            self.lifecycle.booking_done()

    async def _after_response(self):
        """After a booked response: end the session on a cutoff, else answer pending tools."""
        life = self.lifecycle
        if life.cutoff and not life.closing:
            await self.close_with(
                close_code_for(life.cutoff),
                exceeded_event(life.cutoff, refusal_message(life.cutoff), 0),
                life.cutoff,
            )
            return
        await self._flush_tool_outputs()

    # Booking: exactly once (the meter is idempotent), retried while the database is away.
    # The upstream read path hands its bookings to a chain of tasks and goes on forwarding;
    # the lifecycle keeps the next reservation (and the session's end) waiting for them.

    def _queue_booking(self, book, *args):
        """Run ``book(*args)`` after the bookings queued before it, off the read path."""
        previous = self.last_booking

        async def in_turn():
            if previous is not None and not previous.done():
                # (asyncio.wait on a task that is done already would still cost two loop
                # turns, each long under load: a booking waits for nothing it need not.)
                await asyncio.wait({previous})
            await book(*args)

        self.last_booking = self._spawn(in_turn())

    async def _book(self, charge, *args):
        try:
            outcome = await charge(*args)
        except Exception as exc:
            logger.warning("booking failed (%s); will retry", exc.__class__.__name__)
            self.unbooked.append((charge, args))
            if len(self.unbooked) == 1:
                self._spawn(self._retry_bookings())
            return None
        await self._report(outcome)
        return outcome

    async def _retry_bookings(self, deadline=None):
        """Book held usage once the database answers again (each charge is idempotent)."""
        delay = BOOKING_RETRY_SECONDS
        while self.unbooked and (deadline is None or time.monotonic() < deadline):
            await asyncio.sleep(delay)
            while self.unbooked:
                charge, args = self.unbooked[0]
                try:
                    outcome = await charge(*args)
                except Exception:
                    delay = min(delay * 2, 10.0)
                    break
                self.unbooked.pop(0)
                await self._report(outcome)

    async def _report(self, outcome):
        """Tell the browser the new spend; close on a spent budget or an open breaker."""
        for warning in outcome.warnings:
            await self.send_event(warning)
        await self.send_event(self.meter.status())
        if outcome.close_code and not self.lifecycle.closing:
            await self.close_with(
                outcome.close_code, outcome.exceeded, outcome.exceeded.get("reason")
            )

    # Tools

    async def _run_tool(self, event):
        call_id = str(event.get("call_id"))
        try:
            outcome = await run_tool(
                str(event.get("name", "")),
                str(event.get("arguments", "")),
                client=self.client,
                user_id=self.identity.user_id,
            )
            for index, usage in enumerate(outcome.usage):
                reference = call_id if index == 0 else f"{call_id}:{index}"
                await self._book(
                    self.meter.charge_tool,
                    reference,
                    usage.model,
                    usage.input_tokens,
                    usage.cached_input_tokens,
                    usage.output_tokens,
                )
                if usage.calls:
                    # Billed per call on top of the tokens (web search).
                    await self._book(
                        self.meter.charge_tool_fee,
                        f"{reference}:fee",
                        usage.per_call_tool,
                        usage.calls,
                    )
            self.pending_tool_outputs.append(
                {
                    "type": "conversation.item.create",
                    "item": {
                        "type": "function_call_output",
                        "call_id": call_id,
                        "output": outcome.output,
                    },
                }
            )
        finally:
            self.lifecycle.tool_finished()
        await self._flush_tool_outputs()

    async def _flush_tool_outputs(self):
        """Send finished tool results and ask for the spoken answer once nothing is running."""
        life = self.lifecycle
        if life.tools_running or life.answering or not self.pending_tool_outputs:
            return
        if self.upstream is None or life.closing or life.cutoff:
            return
        outputs, self.pending_tool_outputs = self.pending_tool_outputs, []
        for item in outputs:
            self.meter.note_input_text(item["item"]["output"])
            await self._send_upstream(json.dumps(item))
        await self._create_response()

    # Time: duration cap and warnings, idle timeout, slot refresh

    async def _watch(self):
        idle_limit = float(ducke_settings.IDLE_TIMEOUT_SECONDS)
        # The slot and the heartbeat (the stale-session sweep's proof of life) together.
        next_refresh = time.monotonic() + self.quota_refresh_seconds
        while not self.lifecycle.closing:
            check = self.meter.duration_events()
            for warning in check.warnings:
                await self.send_event(warning)
            if check.exceeded:
                await self.close_with(check.close_code, check.exceeded, "duration")
                return
            now = time.monotonic()
            if now - self.last_activity >= idle_limit and self.lifecycle.idle:
                await self.close_with(
                    CLOSE_NORMAL,
                    error_event("idle_timeout", "Closed after a long silence.", "session"),
                    "idle",
                )
                return
            if now >= next_refresh:
                await self.quota_refresh()
                next_refresh = now + self.quota_refresh_seconds
            # Wake at least every second, and exactly at the duration cap.
            until_cap = (
                self.meter.started + self.policy.budget.session_max_seconds - self.meter.timer()
            )
            await asyncio.sleep(min(1.0, max(0.01, until_cap)))

    # The breaker opened somewhere, or a cap refused: QuotaConsumerMixin calls this.

    async def quota_close(self, code, event, reason):
        await self.close_with(code, event, reason)

    # End of session

    async def disconnect(self, code):
        if hasattr(self, "lifecycle"):
            self.lifecycle.close()
            await self._finish()

    async def _end_for_shutdown(self):
        if not hasattr(self, "meter") or self.lifecycle.finished:
            return
        if not self.lifecycle.closing:
            self.end_reason = "server_shutdown"
            try:
                await self.close_with(
                    CLOSE_SERVICE_RESTART,
                    error_event(
                        "server_shutdown", "DUCK-E is restarting. Please reconnect.", "session"
                    ),
                    "server_shutdown",
                )
            except Exception:  # the browser may be gone already
                self.lifecycle.close()
        await self._finish()

    async def _finish(self):
        """Drain upstream and wait for the bookings so every response is booked, then close
        the ledger row."""
        if not hasattr(self, "meter") or not self.lifecycle.finish():
            return
        life = self.lifecycle
        if self.upstream is not None and life.running:
            try:
                await self.upstream.send(json.dumps({"type": "response.cancel"}))
            except Exception as exc:  # upstream is gone: its read ends, nothing more is owed
                logger.warning("draining upstream failed: %s", exc.__class__.__name__)
        if not life.idle:
            # The running response's done, its settlement and the other bookings, bounded.
            try:
                await asyncio.wait_for(life.wait_idle(), DRAIN_SECONDS)
            except TimeoutError:
                logger.warning("session ended before its bookings (%r)", life)
        if self.unbooked:
            await self._retry_bookings(deadline=time.monotonic() + DRAIN_SECONDS)
            if self.unbooked:
                logger.error("%d usage bookings could not be saved", len(self.unbooked))
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.upstream is not None:
            await self.upstream.close()
        await self.quota_leave()
        if self.meter is not None:
            try:
                await self.meter.close(self.end_reason)
            except Exception as exc:
                logger.error("could not close the session ledger: %s", exc.__class__.__name__)
