"""Reference server: socketify (Python bindings of uWebSockets, C++ core).

The way socketify's examples write it: one ``App`` with a ``ws("/*")``
route (``open``: subscribe the connection to one topic; ``message``: answer
a subscribe), and fan-out as uWebSockets' pub/sub, ``app.publish(topic,
message)``: one call, the C++ core writes the frame to every subscriber.
Library defaults (16 KiB max payload, 120 s idle timeout) except
compression, which is off as in every other server here. Any token, any
path, like the other reference servers.

The admin endpoints (bench/refhttp.py's contract: ``GET /healthz``,
``POST /fanout`` answered ``202 {"sent":N}`` once the message is published,
``GET /stats``) are routes of the same App: socketify allows one App per
thread, and an App's routes answer on every port it listens on, so the
admin routes also answer on the WebSocket port (only the bench calls them).

socketify drives libuv from an asyncio loop (``uv_run(NOWAIT)`` on every
turn, 1 ms then 10 ms polls once idle), and uSockets listens with a
backlog of 512, not refhttp.BACKLOG; both are the library's own.

    python bench/ref_socketify.py --listen 127.0.0.1:8080 --admin 127.0.0.1:8081
"""

from __future__ import annotations

import json
import sys

from socketify import App, AppListenOptions, CompressOptions, OpCode

from refhttp import EVENT_MSG, SUBSCRIBED_MSG, parse_args

# The one pub/sub topic every connection subscribes to.
TOPIC = "all"


def main():
    args = parse_args(__doc__.splitlines()[0])
    app = App()

    def ws_open(ws):
        ws.subscribe(TOPIC)

    def ws_message(ws, message, opcode):
        if opcode != OpCode.TEXT:
            return
        try:
            msg = json.loads(message)
        except ValueError:
            return
        if isinstance(msg, dict) and msg.get("type") == "subscribe":
            ws.send(SUBSCRIBED_MSG, OpCode.TEXT)

    app.ws("/*", {"compression": CompressOptions.DISABLED, "open": ws_open, "message": ws_message})

    def healthz(res, req):
        res.send({"status": "ok"}, status=200)

    def stats(res, req):
        res.send({"connections": app.num_subscribers(TOPIC)}, status=200)

    def publish(res, body):
        sent = app.num_subscribers(TOPIC)
        app.publish(TOPIC, body or EVENT_MSG, OpCode.TEXT)
        res.send({"sent": sent}, status=202)  # a dict: sent as JSON

    async def publish_body(res):
        publish(res, (await res.get_data()).getvalue())

    def fanout(res, req):
        # Awaiting an empty body's get_data() crashed socketify now and then
        # (cffi: "from_handle() ... points to garbage", the process gone):
        # the body is read only when there is one (the latency scenario's).
        if int(req.get_header("content-length") or 0):
            res.run_async(publish_body(res))
        else:
            publish(res, EVENT_MSG)

    app.get("/healthz", healthz)
    app.get("/stats", stats)
    app.post("/fanout", fanout)

    listening = []
    for host, port in (args.listen, args.admin):
        app.listen(AppListenOptions(host=host, port=port), lambda config: listening.append(config))
    if len(listening) != 2:  # uSockets listens synchronously; a failure raised in its callback
        sys.exit(f"ref_socketify: could not listen on {args.listen} and {args.admin}")
    app.run()


if __name__ == "__main__":
    main()
