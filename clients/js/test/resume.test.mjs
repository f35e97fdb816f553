// Resume, dedupe and resync against a real WebSocket server (`ws`).
import assert from 'node:assert/strict'
import { test } from 'node:test'
import { WebSocket } from 'ws'
import { connect } from '../mailpush.js'
import { jwt, recorder, until } from '../test-support/fakes.mjs'
import { startServer } from '../test-support/server.mjs'

const offsets = (r) => r.event.map((e) => e.offset ?? null)

async function setup(t, extra = {}) {
  const srv = await startServer()
  t.after(() => srv.close())
  const token = jwt({ sub: 'alice', iat: Math.floor(Date.now() / 1e3), exp: Math.floor(Date.now() / 1e3) + 3600 })
  const c = connect({ url: srv.url, token, WebSocket, share: false, delay: 10, ...extra })
  t.after(() => c.close())
  return { srv, c, r: recorder(c), token }
}

test('the token travels in the subprotocol list, never in the URL; events arrive', async (t) => {
  const { srv, c, r, token } = await setup(t, { events: ['new_letter', 'moved'] })
  await until(() => c.state === 'open', 3000, 'open')
  const conn = srv.conns[0]
  assert.equal(conn.reqUrl, '/v1/ws')
  assert.deepEqual(conn.protocols, ['mailpush.v1', 'mailpush.token.' + token])
  assert.deepEqual(conn.subscribes, [{ type: 'subscribe', events: ['new_letter', 'moved'] }])
  srv.publish('alice', 'new_letter', { id: 1 })
  await until(() => r.event.length === 1)
  assert.deepEqual(r.event[0], { type: 'event', subscriber: 'alice', event: 'new_letter', data: { id: 1 }, offset: 1 })
  assert.deepEqual(c.position, { epoch: 'e1', offset: 1 })
})

test('["*"] subscribes to everything: no events field', async (t) => {
  const { srv, c } = await setup(t, { events: ['*'] })
  await until(() => c.state === 'open')
  assert.deepEqual(srv.conns[0].subscribes, [{ type: 'subscribe' }])
})

test('after a drop the client resumes with since = last offset, and gets what it missed exactly once', async (t) => {
  const { srv, c, r } = await setup(t)
  await until(() => c.state === 'open')
  srv.publish('alice', 'new_letter')
  srv.publish('alice', 'new_letter')
  await until(() => r.event.length === 2)
  srv.conns[0].ws.terminate() // a dropped connection: 1006
  srv.publish('alice', 'new_letter') // 3 and 4 happen while it is away
  srv.publish('alice', 'new_letter')
  await until(() => r.event.length === 4, 3000, 'missed events')
  assert.deepEqual(srv.conns[1].subscribes, [{ type: 'subscribe', since: { epoch: 'e1', offset: 2 } }])
  srv.publish('alice', 'new_letter')
  await until(() => r.event.length === 5)
  assert.deepEqual(offsets(r), [1, 2, 3, 4, 5])
  assert.deepEqual(r.state, ['open', 'connecting', 'open'])
})

test('duplicates (offset ≤ last seen) are dropped; events without an offset are delivered', async (t) => {
  const { srv, c, r } = await setup(t)
  await until(() => c.state === 'open')
  const ws = srv.conns[0].ws
  const ev = (offset) => ws.send(JSON.stringify({ type: 'event', subscriber: 'alice', event: 'x', data: {}, offset }))
  ev(1)
  ev(2)
  ev(2) // a replay that overlaps
  ev(1)
  ev(undefined) // from a publisher that bypasses the history
  ev(undefined)
  ev(3)
  await until(() => r.event.length >= 5)
  await new Promise((res) => setTimeout(res, 30))
  assert.deepEqual(offsets(r), [1, 2, null, null, 3])
})

test('resync: emitted with its state, the new epoch/offset adopted and used to dedupe and resume', async (t) => {
  const { srv, c, r } = await setup(t)
  await until(() => c.state === 'open')
  srv.publish('alice', 'a')
  srv.publish('alice', 'b')
  await until(() => r.event.length === 2)
  // The server lost its history (new epoch) while the client was away.
  srv.conns[0].ws.terminate()
  srv.epoch = 'e2'
  srv.history.set('alice', [])
  await until(() => r.resync.length === 1, 3000, 'resync')
  assert.deepEqual(srv.conns[1].subscribes[0].since, { epoch: 'e1', offset: 2 })
  assert.deepEqual(r.resync[0], { type: 'resync', subscriber: 'alice', reason: 'epoch_changed', epoch: 'e2', offset: 0, state: 'st' })
  assert.deepEqual(c.position, { epoch: 'e2', offset: 0 })
  srv.publish('alice', 'c') // offset 1 of e2: lower than the old epoch's 2, still new
  await until(() => r.event.length === 3)
  assert.deepEqual(c.position, { epoch: 'e2', offset: 1 })
  srv.conns[1].ws.close(1012, 'restart; reconnect_after_ms=20')
  await until(() => srv.conns.length === 3 && srv.conns[2].subscribes.length === 1)
  assert.deepEqual(srv.conns[2].subscribes[0].since, { epoch: 'e2', offset: 1 })
  assert.deepEqual(offsets(r), [1, 2, 1])
})

test('a since given to connect() is used on the first subscribe', async (t) => {
  const { srv, c, r } = await setup(t, { since: { epoch: 'e1', offset: 1 } })
  srv.publish('alice', 'a')
  srv.publish('alice', 'b')
  srv.publish('alice', 'c')
  await until(() => r.event.length === 2)
  assert.deepEqual(srv.conns[0].subscribes[0].since, { epoch: 'e1', offset: 1 })
  assert.deepEqual(offsets(r), [2, 3])
  assert.equal(c.state, 'open')
})

test('pings keep the socket; a socket silent for two periods is dropped and replaced', async (t) => {
  const { srv, c } = await setup(t, { pingMs: 40 })
  await until(() => c.state === 'open')
  await new Promise((res) => setTimeout(res, 200))
  assert.equal(srv.conns.length, 1, 'answered pings: no reconnect')
  srv.conns[0].ws.pause() // the server stops reading and answering (a half-open connection)
  srv.conns[0].ws.on('message', () => {})
  await until(() => srv.conns.length === 2, 3000, 'a new connection')
})
