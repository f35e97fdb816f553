"""``mailpush listen SUBSCRIBER``: a client of a running server, for an
operator checking delivery end to end.

It connects like a browser tab would (trio-websocket, the token in an
``Authorization: Bearer`` header rather than the URL), subscribes, and
prints every event it receives as one JSON line on stdout, exactly as the
server sent it; what is not an event (``subscribed``, ``error``, the close)
goes to stderr.
"""

from __future__ import annotations

import sys
from typing import TextIO

import msgspec
import trio
import trio_websocket

from .errors import ConfigError

__all__ = ["listen"]

# Seconds for the TCP connect and the upgrade.
CONNECT_TIMEOUT = 10.0
# Largest message accepted from the server: events may be large.
MAX_MESSAGE = 16 * 1024 * 1024


async def listen(
    url: str, token: str, events: list[str] | None, count: int = 0, out: TextIO = sys.stdout, err: TextIO = sys.stderr
) -> int:
    """Print events until ``count`` have arrived (0: until the server closes).

    Returns:
      The exit status: 0 after ``count`` events or a normal close by the
      server, 1 when the server refused or dropped the connection.

    Raises:
      ConfigError: the URL is not a ws:// or wss:// URL.
    """
    if not url.startswith(("ws://", "wss://")):
        raise ConfigError(f"--url must be a ws:// or wss:// URL, got {url!r}")
    headers = [(b"authorization", b"Bearer " + token.encode())]
    received = 0
    try:
        async with trio_websocket.open_websocket_url(
            url, extra_headers=headers, max_message_size=MAX_MESSAGE, connect_timeout=CONNECT_TIMEOUT
        ) as ws:
            await ws.send_message(msgspec.json.encode({"type": "subscribe", "events": events or ["*"]}).decode())
            while True:
                message = await ws.get_message()
                text = message if isinstance(message, str) else message.decode("utf-8", "replace")
                try:
                    kind = msgspec.json.decode(text).get("type")
                except (msgspec.DecodeError, AttributeError):
                    kind = None
                if kind == "event":
                    print(text, file=out, flush=True)
                    received += 1
                    if count and received >= count:
                        return 0
                else:
                    print(f"mailpush listen: {text}", file=err, flush=True)
    except trio_websocket.ConnectionRejected as e:
        body = (e.body or b"").decode("utf-8", "replace").strip()
        print(f"mailpush listen: refused ({e.status_code}): {body}", file=err)
        return 1
    except trio_websocket.ConnectionClosed as e:
        code, why = (e.reason.code, e.reason.reason or "") if e.reason is not None else (1006, "")
        print(f"mailpush listen: closed by the server ({code} {why}) after {received} events", file=err)
        return 0 if code in (1000, 1001, 1012) else 1
    except (OSError, trio_websocket.HandshakeError, trio.TooSlowError) as e:
        print(f"mailpush listen: cannot connect to {url}: {e}", file=err)
        return 1
