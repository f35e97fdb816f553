// Reference server: Node.js 20 + ws 8, the way ws's README does it.
//
// A WebSocketServer on its own port with library defaults (no
// permessage-deflate, no keepalive pings) except the listen backlog; a
// 'message' listener per connection answers {"type":"subscribe"}; fan-out
// is the README's broadcast: a loop over `wss.clients` calling
// `client.send()` on every open one. Any token, any path (like the other
// reference servers). The admin trigger (bench/refhttp.py's contract) is a
// plain node:http server on the admin port:
//
//   GET /healthz -> 200 (the admin port opens once the WebSocket port listens)
//   POST /fanout -> the 40-byte message (or the request body, as text) once
//                   to every open connection, answered 202 {"sent":N}
//                   after the send loop
//   GET /stats   -> {"connections":N}
//
//     node bench/ref_node_ws.mjs --listen 127.0.0.1:8080 --admin 127.0.0.1:8081
//
// Its package (ws, pinned by bench/node/package-lock.json) is installed by
// bench/servers.py with `npm ci` in bench/node when node_modules is missing.

import http from "node:http";
import { createRequire } from "node:module";

// ws lives in bench/node/node_modules, not beside this file.
const require = createRequire(new URL("./node/package.json", import.meta.url));
const { WebSocketServer, WebSocket } = require("ws");

// Same as bench/refhttp.py: listen backlog, the 40-byte event, the answer
// to a subscribe.
const BACKLOG = 4096;
const EVENT_MSG = '{"type":"event","n":' + "0".repeat(39 - 20) + "}";
const SUBSCRIBED_MSG = '{"type":"subscribed","subscriber":"?","events":["*"]}';
// Bound on an admin request body; the bench sends a few bytes.
const MAX_ADMIN_REQUEST = 65536;

if (EVENT_MSG.length !== 40) throw new Error(`event is ${EVENT_MSG.length} bytes`);

function hostPort(value) {
  const i = value.lastIndexOf(":");
  return [value.slice(0, i), Number(value.slice(i + 1))];
}

function parseArgs(argv) {
  const args = { listen: "127.0.0.1:8080", admin: "127.0.0.1:8081" };
  for (let i = 0; i < argv.length; i++) {
    const name = argv[i].replace(/^--/, "");
    if (!(name in args) || i + 1 >= argv.length) {
      console.error("usage: node ref_node_ws.mjs [--listen HOST:PORT] [--admin HOST:PORT]");
      process.exit(2);
    }
    args[name] = argv[++i];
  }
  return { listen: hostPort(args.listen), admin: hostPort(args.admin) };
}

const args = parseArgs(process.argv.slice(2));

const wss = new WebSocketServer({ host: args.listen[0], port: args.listen[1], backlog: BACKLOG });

wss.on("connection", (ws) => {
  ws.on("error", () => {}); // a reset client: 'close' follows
  ws.on("message", (data, isBinary) => {
    if (isBinary) return;
    let msg;
    try {
      msg = JSON.parse(data);
    } catch {
      return;
    }
    if (msg && msg.type === "subscribe") ws.send(SUBSCRIBED_MSG);
  });
});

function fanout(body) {
  const msg = body.length ? body.toString() : EVENT_MSG;
  let sent = 0;
  for (const client of wss.clients) {
    if (client.readyState === WebSocket.OPEN) {
      client.send(msg);
      sent++;
    }
  }
  return sent;
}

function answer(res, status, obj) {
  const body = JSON.stringify(obj);
  res.writeHead(status, { "Content-Type": "application/json", "Content-Length": Buffer.byteLength(body) });
  res.end(body);
}

const admin = http.createServer((req, res) => {
  const chunks = [];
  let size = 0;
  req.on("data", (c) => {
    size += c.length;
    if (size > MAX_ADMIN_REQUEST) req.destroy();
    else chunks.push(c);
  });
  req.on("end", () => {
    if (req.method === "GET" && req.url === "/healthz") {
      answer(res, 200, { status: "ok" });
    } else if (req.method === "GET" && req.url === "/stats") {
      answer(res, 200, { connections: wss.clients.size });
    } else if (req.method === "POST" && req.url === "/fanout") {
      answer(res, 202, { sent: fanout(Buffer.concat(chunks)) });
    } else {
      answer(res, 404, { error: `no ${req.method} ${req.url}` });
    }
  });
});

wss.on("listening", () => {
  admin.listen(args.admin[1], args.admin[0]);
});

for (const sig of ["SIGTERM", "SIGINT"]) {
  process.on(sig, () => process.exit(0));
}
