// A Node.js `ws` client for mailpush's interop tests (tests/test_interop.py).
//
// Usage: node ws_client.mjs URL
//
// Connects to URL and prints one JSON line to stdout for everything it sees:
//   {"kind":"open"}
//   {"kind":"message","binary":false,"text":"..."}   a data frame as received
//   {"kind":"ping"}                                  a server ping (ws answers it by itself)
//   {"kind":"close","code":1000,"reason":"..."}      the close code the server sent (1006: none)
//   {"kind":"error","message":"..."}                 an error, e.g. a refused upgrade
// and reads commands from stdin, one JSON object a line:
//   {"send":"..."}     send a text frame
//   {"close":1000}     start the closing handshake with that code
// It exits once the connection is closed.

import readline from "node:readline";
import WebSocket from "ws";

const url = process.argv[2];
if (!url) {
  process.stderr.write("usage: node ws_client.mjs URL\n");
  process.exit(2);
}

const out = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");

// No client pings of our own (ws sends none by default): the server's
// keepalive must see only the pongs ws answers with.
const ws = new WebSocket(url);

ws.on("open", () => out({ kind: "open" }));
ws.on("message", (data, isBinary) => out({ kind: "message", binary: isBinary, text: isBinary ? null : data.toString("utf8") }));
ws.on("ping", () => out({ kind: "ping" }));
ws.on("unexpected-response", (_req, res) => {
  out({ kind: "error", message: `upgrade refused: HTTP ${res.statusCode}` });
  process.exit(1);
});
ws.on("error", (err) => out({ kind: "error", message: String(err && err.message) }));
ws.on("close", (code, reason) => {
  out({ kind: "close", code, reason: reason.toString("utf8") });
  process.stdout.write("", () => process.exit(0));
});

const commands = readline.createInterface({ input: process.stdin });
commands.on("line", (line) => {
  if (!line.trim()) return;
  let cmd;
  try {
    cmd = JSON.parse(line);
  } catch (err) {
    out({ kind: "error", message: `bad command: ${line}` });
    return;
  }
  if (typeof cmd.send === "string") ws.send(cmd.send);
  else if (typeof cmd.close === "number") ws.close(cmd.close);
  else out({ kind: "error", message: `unknown command: ${line}` });
});
