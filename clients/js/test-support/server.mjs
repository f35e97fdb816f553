// A small mailpush server on `ws` for the client's tests: the wire protocol
// of README.md (subscribe with since, recovery from a per-subscriber
// history, resync, ping, refresh), tokens read from the subprotocol and
// decoded without verification.
import { WebSocketServer } from 'ws'

const claimsOf = (t) => JSON.parse(Buffer.from(t.split('.')[1], 'base64url').toString())

export async function startServer() {
  const wss = new WebSocketServer({ port: 0, handleProtocols: (ps) => (ps.has('mailpush.v1') ? 'mailpush.v1' : false) })
  await new Promise((r) => wss.once('listening', r))
  const s = {
    url: `ws://127.0.0.1:${wss.address().port}/v1/ws`,
    epoch: 'e1',
    history: new Map(), // subscriber → [{event, data, offset}]
    conns: [], // every connection ever: {ws, sub, token, protocols, reqUrl, subscribes, refreshes}
    get open() {
      return s.conns.filter((c) => c.ws.readyState === 1)
    },
    /** Keep and deliver an event (offset: the next of the subscriber). */
    publish(sub, event, data = {}) {
      const h = s.history.get(sub) || []
      s.history.set(sub, h)
      const e = { type: 'event', subscriber: sub, event, data, offset: h.length + 1 }
      h.push(e)
      for (const c of s.open) if (c.sub === sub && c.subscribed) c.ws.send(JSON.stringify(e))
      return e
    },
    top: (sub) => (s.history.get(sub) || []).length,
    close: () =>
      new Promise((r) => {
        for (const c of wss.clients) c.terminate()
        wss.close(r)
      }),
  }
  wss.on('connection', (ws, req) => {
    const protocols = (req.headers['sec-websocket-protocol'] || '').split(/\s*,\s*/)
    const token = protocols.find((p) => p.startsWith('mailpush.token.'))?.slice('mailpush.token.'.length)
    const claims = claimsOf(token)
    const c = { ws, sub: claims.sub, token, protocols, reqUrl: req.url, subscribes: [], refreshes: [] }
    s.conns.push(c)
    const send = (p) => ws.send(JSON.stringify(p))
    ws.on('message', (raw) => {
      const p = JSON.parse(raw.toString())
      if (p.type === 'ping') return send({ type: 'pong' })
      if (p.type === 'refresh') {
        c.refreshes.push(p.token)
        return send({ type: 'refreshed', expires_at: claimsOf(p.token).exp })
      }
      if (p.type !== 'subscribe') return
      c.subscribes.push(p)
      const h = s.history.get(c.sub) || []
      const base = { type: 'subscribed', subscriber: c.sub, events: p.events || ['*'], epoch: s.epoch, offset: h.length, expires_at: claims.exp }
      if (!p.since) {
        send(base)
      } else if (p.since.epoch === s.epoch && p.since.offset <= h.length) {
        send({ ...base, recovered: true })
        for (const e of h.slice(p.since.offset)) send(e)
      } else {
        send({ ...base, recovered: false })
        send({ type: 'resync', subscriber: c.sub, reason: 'epoch_changed', epoch: s.epoch, offset: h.length, state: 'st' })
      }
      c.subscribed = true
    })
  })
  return s
}
