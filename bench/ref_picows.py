"""Reference server: picows (Cython WebSocket protocol on asyncio) with uvloop.

The way picows's README writes a server: ``ws_create_server`` with a
listener factory that returns one :class:`WSListener` per connection,
frames handled in ``on_ws_frame`` (a subscribe answered, a close answered
and the connection dropped; pings are answered by picows itself), the
event loop uvloop's. Fan-out is a loop over the open transports calling
``transport.send()``, which frames the message and writes it without
awaiting. Library defaults (its 16 KiB initial read buffer per connection,
aiofastnet transports when installed, no auto-ping) except the listen
backlog. Any token, any path, like the other reference servers.

    python bench/ref_picows.py --listen 127.0.0.1:8080 --admin 127.0.0.1:8081
"""

from __future__ import annotations

import json

import uvloop
from picows import WSFrame, WSListener, WSMsgType, WSTransport, WSUpgradeRequest, ws_create_server

from refhttp import BACKLOG, EVENT_MSG, SUBSCRIBED_MSG, asyncio_admin, parse_args

conns: set[WSTransport] = set()


class Listener(WSListener):
    def on_ws_connected(self, transport: WSTransport):
        conns.add(transport)

    def on_ws_disconnected(self, transport: WSTransport):
        conns.discard(transport)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame):
        if frame.msg_type == WSMsgType.TEXT:
            try:
                msg = json.loads(frame.get_payload_as_bytes())
            except ValueError:
                return
            if isinstance(msg, dict) and msg.get("type") == "subscribe":
                transport.send(WSMsgType.TEXT, SUBSCRIBED_MSG)
        elif frame.msg_type == WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code(), frame.get_close_message())
            transport.disconnect()


def listener_factory(request: WSUpgradeRequest) -> Listener:
    return Listener()


async def fanout(body: bytes = b"") -> int:
    msg = body or EVENT_MSG
    sent = 0
    for t in tuple(conns):  # a failed write may drop a transport from the set
        t.send(WSMsgType.TEXT, msg)
        sent += 1
    return sent


async def main():
    args = parse_args(__doc__.splitlines()[0])
    server = await ws_create_server(listener_factory, args.listen[0], args.listen[1], backlog=BACKLOG)
    admin = await asyncio_admin(*args.admin, fanout, lambda: len(conns))
    async with server, admin:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        uvloop.run(main())
    except KeyboardInterrupt:
        pass
