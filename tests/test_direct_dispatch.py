"""``DirectDispatchMixin`` and ``direct_send``: Channels' dispatch, without a task per message."""

import asyncio
import functools

import pytest
from channels.generic.websocket import AsyncWebsocketConsumer
from channels.layers import channel_layers, get_channel_layer
from channels.sessions import InstanceSessionWrapper
from channels.testing import WebsocketCommunicator

from ducke.server_workarounds import DirectDispatchMixin, direct_send

# Channels' dispatch closes stale database connections before each message.
pytestmark = pytest.mark.django_db(transaction=True)

IN_MEMORY = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}


@pytest.fixture
def in_memory_layer(settings):
    settings.CHANNEL_LAYERS = IN_MEMORY
    channel_layers.backends.clear()
    yield
    channel_layers.backends.clear()


class Echo(DirectDispatchMixin, AsyncWebsocketConsumer):
    """Echoes frames; a channel-layer ``say`` is sent on, a ``fail`` raises in its handler."""

    entered = None  # set by the tests: each handler's start, to see they never overlap
    running = 0

    async def connect(self):
        await self.channel_layer.group_add("echo", self.channel_name)
        await self.accept()

    async def receive(self, text_data=None, bytes_data=None):
        await self._one_at_a_time(f"echo:{text_data}")

    async def say(self, message):
        await self._one_at_a_time(f"said:{message['text']}")

    async def fail(self, message):
        raise RuntimeError("layer handler failed")

    async def _one_at_a_time(self, text):
        type(self).running += 1
        try:
            assert type(self).running == 1, "two dispatches at once"
            await asyncio.sleep(0.01)  # a handler that waits: the other side must wait too
            await self.send(text_data=text)
        finally:
            type(self).running -= 1


async def test_frames_and_channel_layer_messages_are_dispatched_one_at_a_time(in_memory_layer):
    communicator = WebsocketCommunicator(Echo.as_asgi(), "/echo")
    assert (await communicator.connect())[0]
    layer = get_channel_layer()
    for n in range(3):
        await communicator.send_to(text_data=str(n))
        await layer.group_send("echo", {"type": "say", "text": str(n)})
    received = [await communicator.receive_from() for _ in range(6)]
    assert sorted(r for r in received if r.startswith("echo:")) == ["echo:0", "echo:1", "echo:2"]
    assert [r for r in received if r.startswith("said:")] == ["said:0", "said:1", "said:2"]
    await communicator.disconnect()


async def test_a_disconnect_ends_the_consumer_and_its_channel_layer_task(in_memory_layer):
    before = asyncio.all_tasks()
    communicator = WebsocketCommunicator(Echo.as_asgi(), "/echo")
    assert (await communicator.connect())[0]
    await communicator.send_input({"type": "websocket.disconnect", "code": 1000})
    await asyncio.wait_for(communicator.future, 5)  # StopConsumer: a clean end
    assert communicator.future.exception() is None
    await asyncio.sleep(0)
    leftover = [t for t in asyncio.all_tasks() - before if not t.done()]
    assert leftover == [t for t in leftover if t is asyncio.current_task()]


async def test_an_error_on_the_channel_layer_side_ends_the_consumer_with_it(in_memory_layer):
    communicator = WebsocketCommunicator(Echo.as_asgi(), "/echo")
    assert (await communicator.connect())[0]
    await get_channel_layer().group_send("echo", {"type": "fail"})
    with pytest.raises(RuntimeError, match="layer handler failed"):
        await asyncio.wait_for(communicator.future, 5)


async def handle_reply(protocol, message):
    pass


def test_direct_send_skips_the_session_wrapper_for_websockets():
    send = functools.partial(handle_reply, object())
    wrapper = InstanceSessionWrapper({"type": "websocket", "cookies": {}}, send)
    assert direct_send(wrapper.send) is send
    outer = InstanceSessionWrapper({"type": "websocket", "cookies": {}}, wrapper.send)
    assert direct_send(outer.send) is send
    assert direct_send(send) is send


def test_direct_send_keeps_a_wrapper_that_acts_on_websocket_messages():
    send = functools.partial(handle_reply, object())
    wrapper = InstanceSessionWrapper({"type": "websocket", "cookies": {}}, send)
    wrapper.save_message_types = ["http.response.start", "websocket.send"]
    assert direct_send(wrapper.send) == wrapper.send
