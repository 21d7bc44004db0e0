"""Where one relayed session's answers stand: one small state object, named transitions.

At most one response runs at a time. The relay moves it along:

    idle --reserve--> reserving --request--> requested --created--> streaming --done-->
    settling --settled--> idle

``reserving``: its worst case is being reserved against every cap; ``requested``: the
``response.create`` is sent, upstream has not created it yet; ``streaming``: upstream
created it (``response.created``) and streams it until ``response.done``; ``settling``: its
``response.done`` is in and its booking (the settlement of its hold) is running, off the
upstream read path: upstream events keep flowing to the browser meanwhile. A response
that does not start (``not_started``: the reservation refused or failed, upstream refused
the request) and one whose upstream is gone (``upstream_lost``) go back to ``idle``.

Beside it: the other bookings the upstream stream asked for (input transcriptions), which
the next reservation waits for too, so it never decides on a stale spend; the next response
waiting for the current one to settle (``create_waiting``),
the tool calls running (their results wait until no answer streams or settles), a cutoff
(the running answer was cancelled before it overspent: the session ends once it is booked),
and the session's own end (``closing``: nothing more goes to the browser; ``finished``: the
ending ran). Nothing here does I/O; ``SessionConsumer`` acts on it.
"""

import asyncio

IDLE = "idle"
RESERVING = "reserving"
REQUESTED = "requested"
STREAMING = "streaming"
SETTLING = "settling"


class LifecycleError(RuntimeError):
    """A transition the relay never makes (a bug, not an upstream's misbehaviour)."""


class ResponseLifecycle:
    """The response lifecycle of one session, with named transitions."""

    def __init__(self):
        self.state = IDLE
        self.response_id = None  # upstream's id of the created response
        self.create_event_id = None  # the event_id of the response.create sent
        self.creates = 0
        self.settlements = 0  # response.done events whose booking is not over yet
        self.bookings = 0  # other bookings of the read path not over yet (transcriptions)
        self.create_waiting = False
        self.tools_running = 0
        self.cutoff = None
        self.closing = False
        self.finished = False
        self._idle = asyncio.Event()
        self._idle.set()

    def __repr__(self):
        return f"<ResponseLifecycle {self.state} response={self.response_id}>"

    # -- what the relay asks ---------------------------------------------------------------

    @property
    def idle(self):
        """No response runs, none is being settled and no booking is pending: the next
        response may be reserved."""
        return self.state == IDLE and not self.bookings

    @property
    def running(self):
        """A response counts as running for the browser: from its reservation to its done."""
        return self.state in (RESERVING, REQUESTED, STREAMING)

    @property
    def awaiting_upstream(self):
        """Upstream still owes this response's ``response.done`` (a drain waits for it)."""
        return self.state in (REQUESTED, STREAMING)

    @property
    def requested(self):
        """The ``response.create`` is sent and upstream has not created the response yet."""
        return self.state == REQUESTED

    @property
    def answering(self):
        """The id of the created response until it is settled (tool results wait), or None."""
        return self.response_id if self.state in (STREAMING, SETTLING) else None

    async def wait_idle(self):
        """Until the lifecycle is idle."""
        await self._idle.wait()

    # -- the response's transitions ----------------------------------------------------------

    def reserve(self):
        """A new response's worst case is being reserved (only from idle)."""
        if self.state != IDLE:
            raise LifecycleError(f"cannot reserve a response while {self.state}")
        self._move(RESERVING)

    def request(self):
        """The reservation holds: returns the ``event_id`` for its ``response.create``, or
        None when the response was abandoned meanwhile (upstream gone)."""
        if self.state != RESERVING:
            return None
        self.creates += 1
        self.create_event_id = f"ducke_create_{self.creates}"
        self._move(REQUESTED)
        return self.create_event_id

    def created(self, response_id):
        """Upstream created a response (``response.created``): it streams now."""
        self.response_id = response_id
        self.create_event_id = None
        self._move(STREAMING)

    def done(self):
        """A ``response.done`` arrived: its booking is pending until ``settled``.

        A stray one while the next response is being reserved is booked too, but leaves
        that reservation alone."""
        self.settlements += 1
        self.create_event_id = None
        if self.state != RESERVING:
            self._move(SETTLING)

    def settled(self):
        """A response's booking is over (booked, or handed to the retries)."""
        self.settlements = max(0, self.settlements - 1)
        if self.state == SETTLING and not self.settlements:
            self.response_id = None
            self._move(IDLE)

    def not_started(self):
        """The response was refused (a cap, the meter failing, or upstream): back to idle."""
        if self.state in (RESERVING, REQUESTED):
            self.response_id = None
            self.create_event_id = None
            self._move(IDLE)

    def upstream_lost(self):
        """Upstream is gone: nothing it owed will come (a settlement in progress goes on)."""
        self.create_event_id = None
        if self.state != SETTLING:
            self.response_id = None
            self._move(IDLE)

    # -- around the response -------------------------------------------------------------------

    def booking_queued(self):
        """A booking that is not a response's (an input transcription) is pending."""
        self.bookings += 1
        self._move(self.state)

    def booking_done(self):
        self.bookings = max(0, self.bookings - 1)
        self._move(self.state)

    def wait_to_create(self):
        """The next response waits for this one to settle; False when one waits already."""
        if self.create_waiting:
            return False
        self.create_waiting = True
        return True

    def stop_waiting(self):
        """The waiting response goes ahead (or is given up)."""
        self.create_waiting = False

    def tool_started(self):
        self.tools_running += 1

    def tool_finished(self):
        self.tools_running = max(0, self.tools_running - 1)

    def cut_off(self, reason):
        """The running response overspends (``reason`` names the cap); True the first time."""
        if self.cutoff is not None:
            return False
        self.cutoff = reason
        return True

    def close(self):
        """The session is closing: nothing more is sent to the browser, nothing new starts."""
        self.closing = True

    def finish(self):
        """The session's ending starts; False when it ran already."""
        if self.finished:
            return False
        self.finished = True
        return True

    def _move(self, state):
        self.state = state
        if self.idle:
            self._idle.set()
        else:
            self._idle.clear()
