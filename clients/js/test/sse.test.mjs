// The SSE fallback: after repeated WebSocket failures (never opened), an
// EventSource; every 60 s a WebSocket is tried again and taken when it opens.
import assert from 'node:assert/strict'
import { test } from 'node:test'
import { connect } from '../mailpush.js'
import { fakeEventSource, fakeTime, fakeWebSocket, flush, jwt, recorder } from '../test-support/fakes.mjs'

const TOKEN = jwt({ sub: 'alice', exp: 4e9 })
const sub = (extra = {}) => ({ type: 'subscribed', subscriber: 'alice', events: ['*'], epoch: 'e1', offset: 7, expires_at: 4e9, ...extra })
const ev = (offset) => ({ type: 'event', subscriber: 'alice', event: 'new_letter', data: { offset }, offset })

async function setup(t, extra = {}) {
  const tick = fakeTime(t)
  const WS = fakeWebSocket()
  const ES = fakeEventSource()
  const c = connect({ url: 'wss://push.example.com/v1/ws', token: TOKEN, WebSocket: WS, EventSource: ES, share: false, pingMs: 0, ...extra })
  t.after(() => c.close())
  const r = recorder(c)
  await flush()
  /** Fail the WebSocket n times (never opened) and wait out each backoff. */
  const failWs = async (n) => {
    for (let i = 0; i < n; i++) {
      WS.last.end(1006)
      await tick(20000, 1000)
    }
  }
  return { tick, WS, ES, c, r, failWs }
}

test('three failures before ever opening: SSE, at the URL derived from the WebSocket URL', async (t) => {
  const { WS, ES, c, r, failWs } = await setup(t, { events: ['new_letter', 'moved'], since: { epoch: 'e1', offset: 5 } })
  await failWs(2)
  assert.equal(ES.all.length, 0, 'two failures: still WebSocket')
  assert.equal(WS.all.length, 3)
  await failWs(1)
  assert.equal(WS.all.length, 3)
  assert.equal(ES.all.length, 1)
  const u = new URL(ES.last.url)
  assert.equal(u.origin + u.pathname, 'https://push.example.com/v1/events')
  assert.equal(u.searchParams.get('token'), TOKEN)
  assert.equal(u.searchParams.get('events'), 'new_letter,moved')
  assert.equal(u.searchParams.get('last_event_id'), 'e1:5')
  ES.last.recv(sub({ recovered: true }))
  assert.equal(c.state, 'fallback')
  ES.last.recv(ev(6), 'e1:6')
  ES.last.recv(ev(7), 'e1:7')
  ES.last.recv(ev(7), 'e1:7')
  assert.deepEqual(r.event.map((e) => e.offset), [6, 7])
  assert.deepEqual(r.state, ['fallback'])
})

test('ws:// becomes http:// (a path prefix kept; all events: no events parameter)', async (t) => {
  const { ES, failWs } = await setup(t, { url: 'ws://ws.example.com:8080/push/v1/ws', events: ['*'] })
  await failWs(3)
  assert.equal(ES.last.url, `http://ws.example.com:8080/push/v1/events?token=${TOKEN}`)
})

test('an explicit sseUrl wins; fallbackAfter sets the number of failures', async (t) => {
  const { ES, failWs } = await setup(t, { sseUrl: 'https://other.example.com/sse?x=1', fallbackAfter: 1 })
  await failWs(1)
  assert.equal(ES.last.url, `https://other.example.com/sse?x=1&token=${TOKEN}`)
})

test('every 60 s a WebSocket is tried; when it opens the client switches back, resuming from the SSE position', async (t) => {
  const { tick, WS, ES, c, r, failWs } = await setup(t)
  await failWs(3)
  const es = ES.last
  es.recv(sub())
  es.recv(ev(8))
  assert.equal(c.state, 'fallback')
  await tick(60000, 5000)
  assert.equal(WS.all.length, 4, 'a probe')
  WS.last.end(1006) // the probe fails: SSE goes on
  es.recv(ev(9))
  assert.notEqual(es.readyState, 2, 'still in use')
  assert.equal(c.state, 'fallback')
  await tick(60000, 5000)
  assert.equal(WS.all.length, 5, 'another probe')
  WS.last.open()
  assert.equal(es.readyState, 2, 'the EventSource is closed')
  assert.deepEqual(WS.last.sent, [{ type: 'subscribe', since: { epoch: 'e1', offset: 9 } }])
  WS.last.recv(sub({ offset: 9, recovered: true }))
  WS.last.recv(ev(10))
  assert.equal(c.state, 'open')
  assert.deepEqual(r.event.map((e) => e.offset), [8, 9, 10])
  await tick(120000, 10000)
  assert.equal(WS.all.length, 5, 'no more probes')
  assert.equal(ES.all.length, 1)
})

test('SSE errors: the client reconnects it with its own backoff and last_event_id', async (t) => {
  const { tick, ES, r, failWs } = await setup(t)
  await failWs(3)
  ES.last.recv(sub())
  ES.last.recv(ev(8))
  await tick(10000, 1000) // stable: the backoff starts over
  ES.last.error()
  assert.equal(ES.all[0].readyState, 2, 'closed by the client: no browser reconnect')
  assert.ok(r.retry.at(-1).delay <= 500)
  await tick(600)
  assert.equal(ES.all.length, 2)
  assert.equal(ES.last.params.get('last_event_id'), 'e1:8')
})

test('the SSE close packet is a close: reconnect_after_ms honoured, 4001 refetches the token', async (t) => {
  let calls = 0
  const token = async () => (calls++, jwt({ sub: 'alice', exp: 4e9, n: calls }))
  const { tick, ES, r, failWs } = await setup(t, { token })
  await failWs(3)
  ES.last.recv(sub())
  ES.last.recv({ type: 'close', code: 1012, reason: 'draining; reconnect_after_ms=5000' })
  assert.ok(r.retry.at(-1).delay >= 5000)
  await tick(7500, 500)
  assert.equal(ES.all.length, 2)
  ES.last.recv(sub())
  const before = calls
  ES.last.recv({ type: 'close', code: 4001, reason: 'token expired' })
  await tick(4100, 100)
  assert.equal(calls, before + 1)
  assert.equal(ES.all.length, 3)
})

test('a WebSocket that once opened never falls back to SSE', async (t) => {
  const { WS, ES, failWs } = await setup(t)
  WS.last.open()
  WS.last.recv(sub())
  await failWs(6)
  assert.equal(ES.all.length, 0)
})

test('without EventSource, or with fallbackAfter: 0, the WebSocket is retried forever', async (t) => {
  const { ES, failWs } = await setup(t, { fallbackAfter: 0 })
  await failWs(5)
  assert.equal(ES.all.length, 0)
})
