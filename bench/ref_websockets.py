"""Reference server: websockets (asyncio implementation), with ``broadcast()``.

``serve()`` with a handler per connection that iterates over incoming
messages; fan-out is ``broadcast(server.connections, message)``, which
encodes once and writes to every open connection without awaiting. Library
defaults (keepalive pings every 20 s, etc.) except the listen backlog.

    python bench/ref_websockets.py --listen 127.0.0.1:8080 --admin 127.0.0.1:8081
"""

from __future__ import annotations

import asyncio
import json

from websockets.asyncio.server import broadcast, serve
from websockets.exceptions import ConnectionClosed

from refhttp import BACKLOG, EVENT_TEXT, SUBSCRIBED_TEXT, asyncio_admin, parse_args


async def handler(ws):
    try:
        async for msg in ws:
            if isinstance(msg, str) and json.loads(msg).get("type") == "subscribe":
                await ws.send(SUBSCRIBED_TEXT)
    except (ConnectionClosed, ValueError):
        pass


async def main():
    args = parse_args(__doc__.splitlines()[0])
    async with serve(handler, args.listen[0], args.listen[1], backlog=BACKLOG) as server:

        async def fanout(body: bytes = b"") -> int:
            conns = server.connections
            broadcast(conns, body.decode() if body else EVENT_TEXT)
            return len(conns)

        admin = await asyncio_admin(*args.admin, fanout, lambda: len(server.connections))
        async with admin:
            await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
