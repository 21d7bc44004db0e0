"""Where DUCK-E reaches into its server's and clients' internals: daphne, Twisted, autobahn,
Channels and websockets.

Written against the versions pinned in requirements.txt: daphne 4.2.3, channels 4.3.2 and
websockets 17.4, with the Twisted 26.10.0 and autobahn 26.11.1 that daphne 4.2.3 resolves to
(they are not pinned themselves). Each workaround says what it relies on; on another server
(uvicorn) or without daphne the daphne/Twisted/autobahn ones are no-ops, and the Channels
ones (``DirectReceiveMixin``, ``DirectDispatchMixin``) and the upstream client's
(``batch_mask_keys``, ``send_upstream_text``/``write_upstream_text``, ``UpstreamConnection``)
work the same under any ASGI server.
Re-check them when one of these versions moves:

- ``allow_server_close_codes``: autobahn's ``sendClose`` refuses the RFC 6455 server codes
  DUCK-E's contract uses (1009, 1011, 1012, 1013).
- ``send_backlog``: ASGI has no backpressure; the bytes daphne's Twisted transport still holds
  for a browser, read from ``Server.handle_reply``'s partial and ``FileDescriptor`` fields.
- ``speed_up_autobahn_frames``: per browser frame autobahn builds a CFFI masker and runs a
  CFFI UTF-8 validator, and per frame read or sent it formats a debug line's coloured
  arguments though debug is off; CPython's and websockets' C code do the same work for a
  fraction of the time.
- ``read_whole_text_frames``: autobahn reads every frame through a chain of eight hooks and
  a Deferred; a browser's whole unfragmented text frame is read in one step.
- ``offer_text_on_arrival``/``take_text_on_arrival``: daphne queues every browser message for
  the application as a dict, and the consumer's task wakes a loop turn later to forward it;
  the relay takes a plain audio chunk as daphne reads it when nothing waits ahead of it.
- ``browser_text_writer``: daphne and autobahn wrap a message to the browser in checks and
  counters around one transport write; the frame is written directly.
- ``read_without_log_context``: Twisted's asyncio reactor pushes a logging context around
  every read, for a tag daphne never prints.
- ``write_at_once``: Twisted's TCP transport buffers every write and sends it on the next
  reactor turn, after registering for writability (two ``epoll_ctl`` calls and a reactor
  callback per relayed message); the bytes go out at once when nothing waits before them.
- ``batch_mask_keys``: the upstream client (websockets 17.4) draws each frame's 4-byte mask
  key with its own ``getrandom`` system call; the keys come from the same source 4 KiB at a
  time.
- ``send_upstream_text``/``write_upstream_text``: websockets' ``send`` wraps every message in
  an async context manager and a ``Frame``; an open plain connection gets header, mask and
  masked payload written to its transport.
- ``UpstreamConnection``: websockets reads every frame through a generator parser; a whole
  plain text frame from upstream goes to the message assembler directly (0.42-0.47 times
  websockets' time per 100 ms audio delta: tests/benchmarks/test_bench_upstream_frames.py).
- ``ServerShutdown``: daphne's SIGTERM path cancels applications and resumes after the first
  one ends, and its own shutdown step can fail before cancelling anything; a reactor
  "before shutdown" trigger and a shared wait end every session properly.
- ``DirectReceiveMixin``: Channels closes stale database connections on the database thread
  before every message; audio frames need no database and skip that hop.
- ``DirectDispatchMixin``: Channels' ``await_many_dispatch`` creates a task and an
  ``asyncio.wait`` per message; the consumer awaits the browser's frames in its own task, and
  its send skips the session middleware's wrapper, a pass-through for WebSocket messages
  (``direct_send``).

One more, the channel-layer receive that survives a Redis outage, is
``quotas.consumers.QuotaConsumerMixin.channel_receive``: it lives in the reusable app, which
cannot import ``ducke``.
"""

import asyncio
import codecs
import contextlib
import functools
import logging
import os
import struct
import sys
import threading
import time
import weakref

from channels.exceptions import StopConsumer
from channels.layers import get_channel_layer
from channels.sessions import InstanceSessionWrapper
from websockets.asyncio.client import ClientConnection
from websockets.frames import Frame, Opcode
from websockets.protocol import CONNECTING as CONNECTING_STATE
from websockets.protocol import OPEN as WS_OPEN
from websockets.speedups import apply_mask

logger = logging.getLogger("ducke.session")

# RFC 6455 codes a server endpoint may send that autobahn's sendClose refuses.
SERVER_CLOSE_CODES = frozenset({1001, 1008, 1009, 1011, 1012, 1013})


def allow_server_close_codes():
    """Let daphne send the server close codes DUCK-E's contract uses; a no-op without daphne.

    autobahn's ``sendClose`` only accepts 1000 and 3000-4999, the codes an *application* may
    pick, and raises for 1009 ("message too big") or 1011 ("unexpected condition") although
    RFC 6455 lets a server endpoint send them. daphne's ``WebSocketProtocol.serverClose``
    passes an ASGI ``websocket.close`` code straight to ``sendClose``, so a consumer closing
    with 1011 makes autobahn raise and the browser sees whatever daphne's error path sends.
    This routes just these codes through autobahn's own ``sendCloseFrame`` (what
    ``sendClose`` calls once its check passes); every other code keeps autobahn's validation.
    """
    try:
        from daphne.ws_protocol import WebSocketProtocol
    except ImportError:
        return
    if getattr(WebSocketProtocol.serverClose, "allows_server_codes", False):
        return
    original = WebSocketProtocol.serverClose

    def server_close(self, code=None):
        if code in SERVER_CLOSE_CODES:
            self.sendCloseFrame(code=code, isReply=False)
        else:
            original(self, code)

    server_close.allows_server_codes = True
    WebSocketProtocol.serverClose = server_close


def apply_server_workarounds():
    """Install every process-wide workaround below (each idempotent, each a no-op where its
    library is missing): what ``ducke.asgi`` runs before serving, and what the relay
    benchmark's bare floor runs to stand on the same server and client code."""
    allow_server_close_codes()
    batch_mask_keys()
    speed_up_autobahn_frames()
    read_whole_text_frames()
    offer_text_on_arrival()
    read_without_log_context()
    write_at_once()


class FrameUnmasker:
    """autobahn's XOR masker interface (``pointer``, ``reset``, ``process``) over websockets'
    C ``apply_mask``.

    autobahn 26.11.1's ``create_xor_masker`` builds a CFFI object per masked frame (a buffer,
    a finalizer, an implementation switch) and ``process`` copies the payload twice more:
    about 50 µs for a 4 KB audio frame, half of what autobahn spends on it. ``process`` may be
    called with the payload in pieces: ``pointer`` is how much of it was unmasked so far."""

    __slots__ = ("_mask", "_pointer")

    def __init__(self, mask, length=None):
        self._mask = bytes(mask)
        self._pointer = 0

    def pointer(self):
        return self._pointer

    def reset(self):
        self._pointer = 0

    def process(self, data):
        shift = self._pointer & 3
        mask = self._mask[shift:] + self._mask[:shift] if shift else self._mask
        self._pointer += len(data)
        return apply_mask(data, mask)


class Utf8Check:
    """autobahn's incremental UTF-8 validator interface over CPython's UTF-8 decoder.

    ``validate(chunk)`` returns ``(valid, ends_on_code_point, index_in_chunk, total_index)``
    as autobahn's own does: on invalid UTF-8 the index is where the bad sequence starts.
    autobahn 26.11.1's CFFI validator takes ~11 µs for a 4 KB frame; ASCII (the audio
    frames) is checked in C at memory speed, and daphne decodes the text again anyway."""

    __slots__ = ("_decoder", "_total")

    def __init__(self):
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._total = 0

    def reset(self):
        self._decoder.reset()
        self._total = 0

    def validate(self, chunk):
        pending = len(self._decoder.getstate()[0])
        if not pending and chunk.isascii():
            self._total += len(chunk)
            return True, True, len(chunk), self._total
        try:
            self._decoder.decode(chunk)
        except UnicodeDecodeError as error:
            index = max(0, error.start - pending)
            return False, False, index, self._total + index
        self._total += len(chunk)
        return True, not self._decoder.getstate()[0], len(chunk), self._total


def _as_is(value, *args, **kwargs):
    return value


def speed_up_autobahn_frames():
    """Let autobahn (under daphne) read and write frames with C helpers; a no-op without it.

    In autobahn 26.11.1's ``autobahn.websocket.protocol``: ``create_xor_masker`` becomes
    ``FrameUnmasker``, ``Utf8Validator`` ``Utf8Check`` (same interfaces, same results:
    tests/test_autobahn_speedups.py holds them to autobahn's own), and ``hltype``/``hlval``
    there and in ``autobahn.twisted.websocket`` return their argument. Those two only colour
    the arguments of ``log.debug`` lines, and autobahn computes them before the call, on every
    frame read (``dataReceived``) and sent (``sendData``), debug or not: a click style each,
    about 5 µs. A debug line still names the same method and values, uncoloured.

    autobahn reads a 4 KB browser frame in 0.38 times the stock time and sends an audio delta
    in 0.40 times (26 µs instead of 67, 5.5 µs instead of 14, on 2026-12-01:
    tests/benchmarks/test_bench_autobahn_frames.py)."""
    try:
        from autobahn.twisted import websocket as twisted_websocket
        from autobahn.websocket import protocol
    except ImportError:
        return
    protocol.create_xor_masker = FrameUnmasker
    protocol.Utf8Validator = Utf8Check
    for module in (protocol, twisted_websocket):
        module.hltype = module.hlval = _as_is


def read_whole_text_frames():
    """Let autobahn (under daphne) read a browser's text frame in one step when the whole
    frame is buffered; a no-op without autobahn.

    autobahn 26.11.1's ``processData`` reads every frame through a chain of hooks
    (``onFrameBegin``, ``onMessageBegin``, ``onMessageFrameBegin``, ``onFrameData``,
    ``onMessageFrameData``, ``onFrameEnd``, ``onMessageFrameEnd``, ``onMessageEnd``), then
    fires a "message" event through a Deferred although daphne listens to none: about as
    much as the unmasking and validation themselves. What the relay receives, 10-50 times a
    second per session, is one unfragmented masked text frame (FIN, opcode 1, no RSV bits)
    under 64 KiB, all of it in the buffer: that frame is unmasked (websockets' C
    ``apply_mask``), checked as UTF-8 (CPython's decoder) and handed to ``_onMessage`` (daphne's
    ``onMessage``) directly. Only then: the connection open and not failed, no message under
    way, no compression, no frame logging or timing, no "message" listener, the frame within
    ``maxFramePayloadSize`` and ``maxMessagePayloadSize``. Anything else (control frames,
    fragments, binary frames, invalid UTF-8, a partial frame, a frame that breaks a rule) goes
    to autobahn's own ``processData`` with the buffer untouched, so its checks and failures
    are autobahn's (tests/test_autobahn_whole_frames.py feeds both the same streams).
    autobahn's traffic counters of frames and messages (read by nothing in daphne) do not
    count the frames read here."""
    try:
        from autobahn.websocket.protocol import WebSocketProtocol
    except ImportError:
        return
    process_data = WebSocketProtocol.processData
    if getattr(process_data, "reads_whole_text_frames", False):
        return
    open_state = WebSocketProtocol.STATE_OPEN

    def processData(self):
        data = self.data
        if (
            len(data) < 6
            or data[0] != 0x81  # FIN, no RSV, text
            or not data[1] & 0x80  # masked, as every client frame must be
            or self.current_frame is not None
            or self.inside_message
            or self.state != open_state
            or self.failedByMe
            or self._perMessageCompress is not None
            or self.logFrames
            or self.trackedTimings
            or (self._listeners or {}).get("message")
        ):
            return process_data(self)
        length = data[1] & 0x7F
        if length < 126:
            start = 6
        elif length == 126 and len(data) >= 8:
            length = (data[2] << 8) | data[3]
            if length < 126:  # not the minimal length encoding: autobahn's violation
                return process_data(self)
            start = 8
        else:
            return process_data(self)
        end = start + length
        if (
            len(data) < end
            or 0 < self.maxFramePayloadSize < length
            or 0 < self.maxMessagePayloadSize < length
        ):
            return process_data(self)
        payload = apply_mask(data[start:end], data[start - 4 : start])
        if self.utf8validateIncoming and not payload.isascii():
            try:
                payload.decode("utf-8")
            except UnicodeDecodeError:
                return process_data(self)
        self.data = data[end:]
        if self.autoPingTimeoutCall and self.autoPingRestartOnAnyTraffic:
            self._cancelAutoPingTimeoutCall()
        self._onMessage(payload, False)
        return len(self.data) > 0

    processData.reads_whole_text_frames = True
    processData.autobahns = process_data
    WebSocketProtocol.processData = processData


def read_without_log_context():
    """Let Twisted's asyncio reactor (daphne's) call a connection's ``doRead``/``doWrite``
    without setting up a logging context first; a no-op without Twisted.

    Twisted 26.10.0's ``AsyncioSelectorReactor`` registers every reader and writer with
    asyncio as ``callWithLogger(selectable, _readOrWrite, ...)``, which asks the selectable for
    its log prefix and pushes a ``{"system": prefix}`` context (three more calls) around each
    read, only for legacy log observers to tag what is logged meanwhile. daphne 4.2.3 sends
    Twisted's log nowhere at its default verbosity and through ``STDLibLogObserver``, which
    does not print that tag, above it. Here the reactor module's ``callWithLogger`` keeps
    what else it does: an exception other than ``KeyboardInterrupt`` escaping the call is
    logged with the selectable's prefix (``_readOrWrite`` itself already disconnects on one)."""
    try:
        from twisted.internet import asyncioreactor
        from twisted.python import log
    except ImportError:
        return
    if getattr(asyncioreactor.callWithLogger, "without_context", False):
        return

    def callWithLogger(logger, func, *args, **kw):
        try:
            return func(*args, **kw)
        except KeyboardInterrupt:
            raise
        except BaseException:
            try:
                prefix = logger.logPrefix()
            except BaseException:
                prefix = "(buggy logPrefix method)"
            log.err(system=prefix)

    callWithLogger.without_context = True
    asyncioreactor.callWithLogger = callWithLogger


def write_at_once():
    """Let daphne's TCP connections send a write at once when nothing is buffered before it.

    Twisted 26.10.0's ``FileDescriptor.write`` appends to a buffer and calls
    ``startWriting``; on the next reactor turn ``doWrite`` sends it and ``stopWriting``
    unregisters: per frame relayed to a browser, two ``epoll_ctl`` calls, a reactor turn and
    Twisted's logging context, about a tenth of the relay's time under daphne. Here
    ``tcp.Connection.write`` tries ``socket.send`` first when the connection is open, not
    TLS, not closing and holds nothing unsent; what the socket does not take (and every
    other case, and any socket error, which ``doWrite`` then reports as Twisted does) goes
    through Twisted's own write, in order. ``send_backlog`` reads the same buffer. A no-op
    without Twisted."""
    try:
        from twisted.internet import tcp
    except ImportError:
        return
    buffered_write = tcp.Connection.write
    if getattr(buffered_write, "writes_at_once", False):
        return

    def write(self, data):
        if (
            type(data) is not bytes
            or not data
            or not self.connected
            or self.disconnecting
            or self._writeDisconnected
            or getattr(self, "TLS", False)
            or self._tempDataBuffer
            or len(self.dataBuffer) > self.offset
        ):
            return buffered_write(self, data)
        try:
            sent = self.socket.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            return buffered_write(self, data)
        if sent < len(data):
            buffered_write(self, data[sent:])

    write.writes_at_once = True
    tcp.Connection.write = write


class MaskKeys:
    """What websockets' ``frames`` module uses of ``secrets``: ``token_bytes(n)``, served from
    ``os.urandom`` (the same source ``secrets`` uses) ``BATCH`` bytes at a time.

    RFC 6455 wants each client frame's masking key unpredictable; it still is (the bytes
    come from the OS's CSPRNG and none is served twice). The batch saves a system call per
    frame sent upstream, which on this kind of machine costs about as much as the send."""

    BATCH = 4096

    def __init__(self):
        self._lock = threading.Lock()
        self._pool = b""
        self._offset = 0

    def token_bytes(self, nbytes=None):
        nbytes = 32 if nbytes is None else nbytes  # secrets.token_bytes' default
        with self._lock:
            if self._offset + nbytes > len(self._pool):
                self._pool = os.urandom(max(self.BATCH, nbytes))
                self._offset = 0
            start = self._offset
            self._offset += nbytes
            return self._pool[start : self._offset]


# The upstream client's mask keys: websockets' frames (``batch_mask_keys``) and
# ``send_upstream_text`` draw from this one pool.
UPSTREAM_MASK_KEYS = MaskKeys()


def batch_mask_keys():
    """Let websockets draw its frame mask keys from a ``MaskKeys`` batch.

    websockets 17.4's ``Frame.serialize`` calls ``secrets.token_bytes(4)`` for every masked
    (client) frame: one ``getrandom`` system call per audio chunk relayed upstream. Here the
    ``secrets`` name in ``websockets.frames`` is a ``MaskKeys``; nothing else there uses it."""
    from websockets import frames

    if not isinstance(frames.secrets, MaskKeys):
        frames.secrets = UPSTREAM_MASK_KEYS


def frame_header(length, masked):
    """An RFC 6455 header for an unfragmented text frame (FIN, opcode 1) of ``length`` bytes."""
    mask_bit = 0x80 if masked else 0
    if length < 126:
        return bytes((0x81, mask_bit | length))
    if length < 65536:
        return struct.pack("!BBH", 0x81, mask_bit | 126, length)
    return struct.pack("!BBQ", 0x81, mask_bit | 127, length)


def browser_text_writer(send):
    """A function ``write(text) -> bool`` that writes a text message to the browser as one
    frame straight into daphne's Twisted transport; False where it did not (then send the
    message through ASGI as usual).

    Under daphne, an ASGI ``websocket.send`` goes through ``Server.handle_reply``,
    ``WebSocketProtocol.handle_reply`` and ``serverSend`` (daphne 4.2.3), then autobahn
    26.11.1's ``sendMessage``, ``sendFrame`` and ``sendData``: checks and statistics
    counters around what, for an open connection without compression, an unfragmented
    message and nothing queued, is one ``transport.write`` of header plus payload (server
    frames are not masked). This writes that, under exactly those conditions (autobahn's
    ``state`` open, ``send_state`` ground, no per-message compression, no auto-fragmenting,
    its ``send_queue`` empty, the message within ``maxMessagePayloadSize``); in every other
    case, and under any other server, it returns False. autobahn's traffic counters (read by
    nothing in daphne) are not updated for the frames written here."""
    protocol = _daphne_protocol(send)
    if protocol is None or not hasattr(protocol, "sendMessage"):
        return _not_written
    from autobahn.websocket.protocol import WebSocketProtocol

    open_state = WebSocketProtocol.STATE_OPEN
    ground = WebSocketProtocol.SEND_STATE_GROUND

    def write(text):
        if (
            protocol.state != open_state
            or protocol.send_state != ground
            or protocol._perMessageCompress is not None
            or protocol.autoFragmentSize
            or protocol.send_queue
        ):
            return False
        payload = text.encode()
        if 0 < protocol.maxMessagePayloadSize < len(payload):
            return False
        protocol.transport.write(frame_header(len(payload), False) + payload)
        return True

    return write


def _not_written(text):
    return False


async def send_upstream_text(connection, text):
    """Send ``text`` (str, or UTF-8 bytes) as one text frame on a websockets 17.4 asyncio
    client ``connection``: ``write_upstream_text`` where it can, else ``connection.send``,
    which raises as it always does; as ``send_context`` does, a transport the write paused is
    drained before returning."""
    if write_upstream_text(connection, text.encode() if isinstance(text, str) else text):
        if connection.paused:
            await connection.drain()
    else:
        await connection.send(text, text=True)


def write_upstream_text(connection, payload):
    """Write ``payload`` (UTF-8 bytes) as one text frame on a websockets 17.4 asyncio client
    ``connection`` now; False, having written nothing, where websockets' own send is needed.

    ``Connection.send`` wraps every message in an async context manager (``send_context``),
    serializes a ``Frame`` with its extension hooks and drains: about half of what the relay
    spends per audio chunk it sends upstream besides the socket write itself. For an open
    connection with no extension, no fragmented message under way, nothing waiting in the
    protocol's writes and no paused transport, the frame is the header, a mask key (from
    ``MaskKeys``, as websockets draws them once ``batch_mask_keys`` ran) and the masked
    payload (websockets' C ``apply_mask``), written to the transport directly."""
    protocol = connection.protocol
    transport = connection.transport
    if (
        protocol.state is not WS_OPEN
        or protocol.expect_continuation_frame
        or protocol.extensions
        or protocol.writes
        or connection.send_in_progress is not None
        or connection.paused
        or transport.is_closing()
    ):
        return False
    mask = UPSTREAM_MASK_KEYS.token_bytes(4)
    transport.write(frame_header(len(payload), True) + mask + apply_mask(payload, mask))
    return True


class UpstreamConnection(ClientConnection):
    """websockets 17.4's asyncio client connection that hands whole text frames to the
    message assembler itself; ``connect(..., create_connection=UpstreamConnection)``.

    Per frame websockets' ``data_received`` feeds a generator parser (``Frame.parse`` over a
    ``StreamReader``, a ``Frame`` built with its checks) and then the events loop; a server's
    text frame needs its header read and its payload sliced. Once the opening handshake is
    over, this connection keeps what it received until a frame is whole: an unfragmented,
    unmasked text frame without RSV bits within the message size limit, with no fragmented
    message under way and no extension, goes to the assembler as websockets would put it
    there (``recv`` decodes and checks its UTF-8 as before); every other frame (control
    frames, fragments, binary, anything malformed) is fed to websockets whole, so its parser
    only ever sees frame boundaries and its checks and failures stay its own
    (tests/test_upstream_connection.py feeds both the same streams)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Received bytes not handed on yet (the response head, then a partial frame); None
        # once websockets reads everything itself (a refused handshake, an extension, a frame
        # over the size limit, the end of the stream).
        self._pending = b""

    def data_received(self, data):
        if self._pending is None:
            super().data_received(data)
            return
        if self._pending:
            data = self._pending + data
        if self.protocol.state is CONNECTING_STATE:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                self._pending = data  # the response head is not whole yet
                return
            super().data_received(data[: end + 4])
            data = data[end + 4 :]
            if self.protocol.state is not WS_OPEN or self.protocol.extensions:
                self._pending = None
                if data:
                    super().data_received(data)
                return
        start, size = 0, len(data)
        protocol = self.protocol
        while size - start >= 2:
            first, second = data[start], data[start + 1]
            length = second & 0x7F
            header = 2
            if length == 126:
                if size - start < 4:
                    break
                length = (data[start + 2] << 8) | data[start + 3]
                header = 4
            elif length == 127:
                if size - start < 10:
                    break
                length = int.from_bytes(data[start + 2 : start + 10], "big")
                header = 10
            if second & 0x80:
                header += 4  # masked: a server must not; websockets fails it
            limit = protocol.max_message_size
            if limit is not None and length > limit:
                # websockets fails such a frame at its header: hand it all on now.
                self._pending = None
                super().data_received(data[start:])
                return
            end = start + header + length
            if end > size:
                break
            if (
                first == 0x81  # FIN, no RSV, text
                and not second & 0x80
                and protocol.state is WS_OPEN
                and protocol.current_size is None
                and (protocol.max_fragment_size is None or length <= protocol.max_fragment_size)
            ):
                self.recv_messages.put(Frame(Opcode.TEXT, data[start + header : end]))
            else:
                super().data_received(data[start:end])
            start = end
        self._pending = data[start:] if start < size else b""

    def eof_received(self):
        if self._pending:  # a partial frame or response head: websockets reports it
            pending, self._pending = self._pending, None
            super().data_received(pending)
        return super().eof_received()


def take_text_on_arrival(send, receiver):
    """Under daphne, offer each text message of this connection to ``receiver(payload)``
    (UTF-8 bytes, valid) as it is read, before daphne queues it for the application; a
    receiver that returns True has taken it (daphne then queues nothing), False leaves it to
    the usual ``websocket.receive``. A no-op under another server (``_daphne_protocol``).

    For the relay's audio frames, 10-50 a second per session: daphne 4.2.3's ``onMessage``
    builds a ``websocket.receive`` dict with the decoded text and puts it on the
    application's ``asyncio.Queue``; the consumer's task wakes on the next loop turn, and
    Channels' dispatch reaches ``receive``, which encodes the text again to send it. A
    receiver that can forward the frame at once does that work in the read callback. The
    receiver is offered a message only when nothing waits in the application's queue (so
    messages keep their order) and daphne does not mute the connection; daphne's own
    ``last_ping`` is kept as ``onMessage`` keeps it. Needs ``offer_text_on_arrival``."""
    protocol = _daphne_protocol(send)
    if protocol is not None and hasattr(protocol, "application_queue"):
        protocol.text_receiver = receiver


def offer_text_on_arrival():
    """Let daphne's ``WebSocketProtocol.onMessage`` offer text messages to a connection's
    ``text_receiver`` (``take_text_on_arrival``); a no-op without daphne."""
    try:
        from daphne.ws_protocol import WebSocketProtocol
    except ImportError:
        return
    on_message = WebSocketProtocol.onMessage
    if getattr(on_message, "offers_text", False):
        return

    def onMessage(self, payload, isBinary):
        receiver = self.text_receiver
        if (
            receiver is not None
            and not isBinary
            and not self.muted
            and self.application_queue.empty()
            and receiver(payload)
        ):
            self.last_ping = time.time()
            return
        on_message(self, payload, isBinary)

    onMessage.offers_text = True
    WebSocketProtocol.text_receiver = None
    WebSocketProtocol.onMessage = onMessage


def send_backlog(send):
    """Bytes the server holds for the browser that its socket has not taken yet.

    ASGI gives no backpressure: daphne writes every message into Twisted's transport, which
    buffers whatever a client does not read. Under daphne, ``send`` is
    ``partial(server.handle_reply, protocol)``, possibly wrapped by Channels' session
    middleware (``AuthMiddlewareStack``: a bound ``send`` whose instance keeps ``real_send``);
    the transport's ``dataBuffer``, ``offset`` and ``_tempDataLen`` (Twisted's
    ``FileDescriptor``) hold the unwritten bytes. Elsewhere this returns 0 (unknown).
    """
    return backlog_reader(send)()


def backlog_reader(send):
    """A function of no arguments returning ``send_backlog(send)``: the middleware wrappers
    are seen through once, not at every relayed frame."""
    protocol = _daphne_protocol(send)

    def backlog():
        transport = getattr(protocol, "transport", None)
        try:
            return len(transport.dataBuffer) - transport.offset + transport._tempDataLen
        except (AttributeError, TypeError):
            return 0

    return backlog


def _daphne_protocol(send):
    """daphne's protocol object behind an ASGI ``send`` (seen through the middleware
    wrappers), or None under another server."""
    for _ in range(8):  # unwrap middleware sends down to daphne's own
        if isinstance(send, functools.partial):
            break
        inner = getattr(getattr(send, "__self__", None), "real_send", None)
        if inner is None:
            break
        send = inner
    return send.args[0] if isinstance(send, functools.partial) and send.args else None


class ServerShutdown:
    """The sessions of this process, and the tasks ending them for a server shutdown.

    daphne (``Server.kill_all_applications``) cancels every application on SIGTERM and
    resumes its shutdown as soon as the FIRST of them finishes (``asyncio.gather``); a
    session that is cancelled calls ``begin`` and then waits in ``ended`` for every other
    session's ending too. That step also fails with a KeyError as soon as one connection has
    no application instance left (an HTTP keep-alive connection whose response is done): then
    nothing would be cancelled and the event loop would stop under the sessions. The reactor
    "before shutdown" trigger of ``install_reactor_trigger`` is waited for by Twisted whatever
    happens to daphne's.
    """

    def __init__(self, end_session):
        """``end_session(session)`` is the coroutine function ending one session properly."""
        self._end_session = end_session
        self._live = weakref.WeakSet()
        self._endings = {}  # session -> its ending task (kept while it runs)
        self._tasks = set()
        self._trigger = None

    def add(self, session):
        self._live.add(session)

    def discard(self, session):
        """The session is gone (its ending, if any, is over)."""
        self._live.discard(session)
        self._endings.pop(session, None)

    def begin(self, session):
        """Start ending ``session`` for a shutdown (once); returns the task."""
        task = self._endings.get(session)
        if task is None:
            task = asyncio.ensure_future(self._end_session(session))
            self._endings[session] = task
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return task

    async def ended(self):
        """Wait until every session ending for a shutdown has booked its usage and closed."""
        while self._tasks:
            await asyncio.shield(asyncio.wait(set(self._tasks)))

    async def end_all(self):
        """End every session of this process (usage booked, ledger closed)."""
        sessions = list(self._live)
        if sessions:
            logger.info("server shutdown: ending %d sessions", len(sessions))
        for session in sessions:
            self.begin(session)
        await self.ended()

    def install_reactor_trigger(self):
        """Under daphne (a running Twisted reactor), run ``end_all`` before it shuts down."""
        if self._trigger is not None:
            return
        reactor = sys.modules.get("twisted.internet.reactor")
        if reactor is None or not getattr(reactor, "running", False):
            return
        from twisted.internet import defer

        def before_shutdown():
            return defer.Deferred.fromFuture(asyncio.ensure_future(self.end_all()))

        self._trigger = reactor.addSystemEventTrigger("before", "shutdown", before_shutdown)


class DirectReceiveMixin:
    """Hand ``websocket.receive`` messages to the consumer without Channels' database hop.

    Channels' ``AsyncConsumer.dispatch`` awaits ``aclose_old_connections()`` (a hop to the
    database thread) before every message. Audio frames arrive 10-50 times a second per
    session and would queue behind ledger writes on that one thread; ``receive()`` uses no
    database (the meter's ``database_sync_to_async`` calls close stale connections
    themselves), so frames skip the hop. Put it before the Channels consumer class.
    """

    async def dispatch(self, message):
        if message["type"] == "websocket.receive":
            await self.websocket_receive(message)
        else:
            await super().dispatch(message)


def direct_send(send):
    """``send`` without Channels' session-middleware wrapper when it only passes messages on.

    ``AuthMiddlewareStack``'s ``SessionMiddleware`` hands the application the bound
    ``InstanceSessionWrapper.send``, which saves the session and sets its cookie on the
    message types of its ``save_message_types`` and ``cookie_response_message_types``
    (``http.response.start`` in channels 4.3.2) and passes every other message to its
    ``real_send`` after reading the session's ``modified`` and ``is_empty()``. No WebSocket
    message is among them: for a WebSocket consumer the wrapper is a pass-through, and its
    ``real_send`` is used directly. Anything else is returned as it is."""
    wrapper = getattr(send, "__self__", None)
    if not isinstance(wrapper, InstanceSessionWrapper):
        return send
    handled = (*wrapper.save_message_types, *wrapper.cookie_response_message_types)
    if any(not kind.startswith("http.") for kind in handled):
        return send
    return direct_send(wrapper.real_send)


class DirectDispatchMixin:
    """Channels' ``AsyncConsumer.__call__`` without a task and an ``asyncio.wait`` per message.

    ``channels.utils.await_many_dispatch`` (channels 4.3.2) wraps every ``receive()`` in a new
    task and waits for it together with the channel-layer receive: per browser frame (audio
    comes 10-50 times a second per session) a task, a wait with its callbacks and two more
    event-loop turns. Here the consumer's own task awaits ``receive()``, and one long-lived
    task the channel layer; as in Channels, one message is dispatched at a time (a lock), a
    ``StopConsumer`` ends the consumer quietly, and an error of the channel-layer side ends it
    with that error once the dispatch running meanwhile is over. The send is ``direct_send``'s.
    Put it first among the consumer's bases.
    """

    async def __call__(self, scope, receive, send):
        self.scope = scope
        self.channel_layer = get_channel_layer(self.channel_layer_alias)
        if self.channel_layer is not None:
            self.channel_name = await self.channel_layer.new_channel()
            self.channel_receive = functools.partial(self.channel_layer.receive, self.channel_name)
        self.base_send = direct_send(send)
        try:
            await self._dispatch_messages(receive)
        except StopConsumer:
            pass

    _awaiting_receive = False
    _dispatch_lock = None

    @property
    def dispatch_idle(self):
        """True while the consumer waits for the server's next message with nothing being
        dispatched (a message taken on arrival then keeps its place among the others)."""
        return self._awaiting_receive and not self._dispatch_lock.locked()

    async def _dispatch_messages(self, receive):
        lock = asyncio.Lock()
        consumer_task = asyncio.current_task()
        failures = []
        dispatching = False

        async def from_layer():
            while True:
                message = await self.channel_receive()
                async with lock:
                    await self.dispatch(message)

        def layer_ended(task):
            if not task.cancelled() and task.exception() is not None:
                failures.append(task.exception())
                if not dispatching:
                    consumer_task.cancel()

        layer = None
        if self.channel_layer is not None:
            layer = asyncio.ensure_future(from_layer())
            layer.add_done_callback(layer_ended)
        self._dispatch_lock = lock
        try:
            while not failures:
                self._awaiting_receive = True
                try:
                    message = await receive()
                finally:
                    self._awaiting_receive = False
                async with lock:
                    dispatching = True
                    try:
                        await self.dispatch(message)
                    finally:
                        dispatching = False
        except asyncio.CancelledError:
            if not failures:
                raise
            consumer_task.uncancel()
        finally:
            if layer is not None:
                layer.remove_done_callback(layer_ended)
                if not layer.done():
                    layer.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await layer
                elif not layer.cancelled():
                    layer.exception()  # retrieved: the consumer ends anyway
        raise failures[0]
