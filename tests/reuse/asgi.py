"""The README's Channels consumer example, served by the reuse project."""

from channels.auth import AuthMiddlewareStack
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from channels.routing import ProtocolTypeRouter, URLRouter
from django.core.asgi import get_asgi_application
from django.urls import path

import quotas
from quotas.guards import ConnectionGuard

django_asgi_app = get_asgi_application()


class ChatConsumer(AsyncJsonWebsocketConsumer):
    async def receive_json(self, content):
        check = await quotas.acheck(self.scope, "chat-messages")
        if not check.allowed:
            await self.send_json({"error": "slow down", "retry_after": check.retry_after})
            return
        await self.send_json({"echo": content})


websocket = AuthMiddlewareStack(ConnectionGuard(URLRouter([path("chat", ChatConsumer.as_asgi())])))
application = ProtocolTypeRouter({"http": django_asgi_app, "websocket": websocket})
