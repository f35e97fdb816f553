"""Reference server: trio-websocket, the idiomatic Trio way.

``serve_websocket`` with one handler task per connection that accepts the
request and loops on ``get_message()``; fan-out awaits ``send_message()``
on each open connection in turn. Library defaults everywhere.

    python bench/ref_triows.py --listen 127.0.0.1:8080 --admin 127.0.0.1:8081
"""

from __future__ import annotations

import json

import trio
from trio_websocket import ConnectionClosed, WebSocketRequest, serve_websocket

from refhttp import EVENT_TEXT, SUBSCRIBED_TEXT, parse_args, trio_admin

conns: set = set()


async def handler(request: WebSocketRequest):
    ws = await request.accept()
    conns.add(ws)
    try:
        while True:
            msg = await ws.get_message()
            if isinstance(msg, str) and json.loads(msg).get("type") == "subscribe":
                await ws.send_message(SUBSCRIBED_TEXT)
    except (ConnectionClosed, ValueError):
        pass
    finally:
        conns.discard(ws)


async def fanout(body: bytes = b"") -> int:
    msg = body.decode() if body else EVENT_TEXT
    sent = 0
    for ws in list(conns):
        try:
            await ws.send_message(msg)
            sent += 1
        except ConnectionClosed:
            pass
    return sent


async def main():
    args = parse_args(__doc__.splitlines()[0])
    async with trio.open_nursery() as nursery:
        await nursery.start(trio_admin, *args.admin, fanout, lambda: len(conns))
        # serve_websocket listens with Trio's default backlog, which the
        # kernel caps to somaxconn (4096) = refhttp.BACKLOG.
        await serve_websocket(handler, args.listen[0], args.listen[1], ssl_context=None)


if __name__ == "__main__":
    try:
        trio.run(main)
    except KeyboardInterrupt:
        pass
