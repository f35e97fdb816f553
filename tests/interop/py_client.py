"""The Python clients of mailpush's interop tests (tests/test_interop.py):
trio-websocket and the ``websockets`` library, each in a process of its own
so that a test can SIGKILL it (a client that vanishes without a Close frame).

Usage: python py_client.py trio-websocket|websockets URL

Speaks exactly the line protocol of ws_client.mjs (read its header): one
JSON line on stdout for everything it sees (``open``, ``message``, ``close``
with the close code the server sent, 1006 for none, ``error``), commands on
stdin (``{"send": "..."}``, ``{"close": 1000}``). Neither library reports
the server's pings (both answer them by themselves), so there is no
``ping`` line; neither sends pings of its own, so the server's keepalive
sees only their pongs. Exits once the connection is closed.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time

# How long to wait for the server's answer to our Close (the libraries'
# own close timeouts are longer than a test wants to wait).
CLOSE_WAIT = 10


def out(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def message(data: str | bytes) -> dict:
    if isinstance(data, bytes):
        return {"kind": "message", "binary": True, "text": None}
    return {"kind": "message", "binary": False, "text": data}


def parse_command(line: str | bytes) -> dict | None:
    if not line.strip():
        return None
    try:
        cmd = json.loads(line)
    except ValueError:
        out({"kind": "error", "message": f"bad command: {line!r}"})
        return None
    if isinstance(cmd.get("send"), str) or isinstance(cmd.get("close"), int):
        return cmd
    out({"kind": "error", "message": f"unknown command: {line!r}"})
    return None


def run_websockets(url: str) -> int:
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    with contextlib.ExitStack() as stack:
        try:
            # No proxy (loopback only), no client pings, no size limit.
            ws = stack.enter_context(
                connect(url, open_timeout=10, proxy=None, ping_interval=None, max_size=None, close_timeout=CLOSE_WAIT)
            )
        except Exception as e:  # noqa: BLE001 - any failure to connect is reported, as ws_client.mjs does
            out({"kind": "error", "message": f"{type(e).__name__}: {e}"})
            return 1
        out({"kind": "open"})

        def obey() -> None:
            for line in sys.stdin:
                cmd = parse_command(line)
                try:
                    if cmd is None:
                        continue
                    if "send" in cmd:
                        ws.send(cmd["send"])
                    else:
                        ws.close(cmd["close"])
                except ConnectionClosed:
                    pass

        threading.Thread(target=obey, daemon=True).start()
        try:
            for data in ws:
                out(message(data))
        except ConnectionClosed:
            pass
        # close_code is set once the connection is closed: the code of the
        # server's Close frame, 1006 if none came.
        deadline = time.monotonic() + CLOSE_WAIT
        while ws.close_code is None and time.monotonic() < deadline:
            time.sleep(0.01)
        out({"kind": "close", "code": ws.close_code or 1006, "reason": ws.close_reason or ""})
    return 0


def run_trio_websocket(url: str) -> int:
    import trio
    import trio_websocket
    from wsproto.connection import ConnectionState

    async def main() -> int:
        async with trio.open_nursery() as nursery:
            try:
                ws = await trio_websocket.connect_websocket_url(nursery, url, max_message_size=1 << 24)
            except (OSError, trio_websocket.HandshakeError) as e:
                out({"kind": "error", "message": f"{type(e).__name__}: {e}"})
                return 1
            out({"kind": "open"})
            closing, closed = trio.Event(), trio.Event()

            async def obey() -> None:
                stdin = trio.lowlevel.FdStream(os.dup(0))
                buf = b""
                while chunk := await stdin.receive_some():
                    buf += chunk
                    while b"\n" in buf:
                        line, _, buf = buf.partition(b"\n")
                        cmd = parse_command(line)
                        if cmd is None:
                            continue
                        if "send" in cmd:
                            try:
                                await ws.send_message(cmd["send"])
                            except trio_websocket.ConnectionClosed:
                                pass
                        else:
                            closing.set()
                            await ws.aclose(cmd["close"])
                            closed.set()

            nursery.start_soon(obey)
            try:
                while True:
                    out(message(await ws.get_message()))
            except trio_websocket.ConnectionClosed:
                pass
            if closing.is_set():  # our own Close: wait for the closing handshake
                with trio.move_on_after(CLOSE_WAIT):
                    await closed.wait()
            # trio-websocket reports 1000 for a close we started even when the
            # server never answered it; wsproto reaches CLOSED only once the
            # peer's Close frame has arrived, so that is what tells.
            answered = ws._wsproto.state is ConnectionState.CLOSED
            reason = ws.closed
            code = reason.code if answered and reason is not None else 1006
            out({"kind": "close", "code": code, "reason": (reason.reason or "") if answered and reason else ""})
            nursery.cancel_scope.cancel()
            return 0

    return trio.run(main)


CLIENTS = {"trio-websocket": run_trio_websocket, "websockets": run_websockets}

if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in CLIENTS:
        sys.stderr.write(f"usage: python py_client.py {'|'.join(CLIENTS)} URL\n")
        sys.exit(2)
    sys.exit(CLIENTS[sys.argv[1]](sys.argv[2]))
