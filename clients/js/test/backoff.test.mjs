// Reconnect timing: full-jitter exponential backoff, its reset after a
// stable connection, the server's reconnect_after_ms hints, 4008.
import assert from 'node:assert/strict'
import { mock, test } from 'node:test'
import { connect } from '../mailpush.js'
import { fakeTime, fakeWebSocket, flush, jwt, recorder } from '../test-support/fakes.mjs'

const URL = 'wss://push.example.com/v1/ws'
const TOKEN = jwt({ sub: 'alice', exp: 4e9 })

function client(t, extra = {}) {
  const WS = fakeWebSocket()
  const c = connect({ url: URL, token: TOKEN, WebSocket: WS, fallbackAfter: 0, share: false, pingMs: 0, ...extra })
  t.after(() => c.close())
  return { WS, c, r: recorder(c) }
}

const subscribed = { type: 'subscribed', subscriber: 'alice', events: ['*'], epoch: 'e1', offset: 0, expires_at: 4e9 }
const bound = (attempt) => Math.min(20000, 500 * 2 ** attempt)

test('delays stay within [0, min(20 s, 500 ms · 2^attempt)], and the next socket comes exactly then', async (t) => {
  const tick = fakeTime(t)
  const { WS, c, r } = client(t)
  await flush()
  assert.equal(WS.all.length, 1)
  assert.equal(WS.last.url, URL)
  assert.deepEqual(WS.last.protocols, ['mailpush.v1', 'mailpush.token.' + TOKEN])
  for (let i = 0; i < 12; i++) {
    WS.last.end(1006) // refused: a browser sees 1006
    const d = r.retry.at(-1).delay
    assert.ok(d >= 0 && d <= bound(i), `attempt ${i}: ${d} within [0, ${bound(i)}]`)
    const before = WS.all.length
    await tick(Math.floor(d))
    if (d % 1) assert.equal(WS.all.length, before, 'not before the delay')
    await tick(1)
    assert.equal(WS.all.length, before + 1, 'a new socket after the delay')
  }
  assert.equal(c.state, 'connecting')
  assert.deepEqual(r.state, [], 'never opened: stays connecting')
})

test('jitter is full: many samples at the cap spread over [0, 20 s]', async (t) => {
  fakeTime(t)
  const { WS, r } = client(t)
  await flush()
  const samples = []
  for (let i = 0; i < 300; i++) {
    WS.last.end(1006)
    samples.push(r.retry.at(-1).delay)
    mock.timers.tick(20000)
    await flush(3)
  }
  const capped = samples.slice(10) // attempt ≥ 10: 500 · 2^10 > 20 s
  assert.ok(capped.every((d) => d >= 0 && d <= 20000))
  assert.ok(new Set(capped.map(Math.round)).size > 250, 'not all equal')
  const mean = capped.reduce((a, b) => a + b, 0) / capped.length
  assert.ok(mean > 8000 && mean < 12000, `mean ${mean} near 10 s`)
  assert.ok(Math.min(...capped) < 2000 && Math.max(...capped) > 18000, 'spread over the whole range')
})

test('a connection open for 10 s resets the backoff; a shorter one does not', async (t) => {
  const tick = fakeTime(t)
  t.mock.method(Math, 'random', () => 0.999)
  const { WS, r } = client(t)
  await flush()
  for (let i = 0; i < 5; i++) {
    WS.last.end(1006)
    await tick(20000)
  }
  assert.ok(r.retry.at(-1).delay > 0.99 * bound(4))
  // Open for 9 s: the next delay keeps growing.
  WS.last.open()
  WS.last.recv(subscribed)
  await tick(9000)
  WS.last.end(1006)
  assert.ok(r.retry.at(-1).delay > 0.99 * bound(5), 'not reset after 9 s')
  await tick(20000)
  // Open for 10 s: back to the first step.
  WS.last.open()
  WS.last.recv(subscribed)
  await tick(10000)
  WS.last.end(1006)
  assert.ok(r.retry.at(-1).delay <= 500, `reset: ${r.retry.at(-1).delay}`)
})

test('1012 with reconnect_after_ms=N: the next attempt comes after about N ms, not the backoff', async (t) => {
  const tick = fakeTime(t)
  const { WS, r } = client(t)
  await flush()
  const delays = []
  for (let i = 0; i < 50; i++) {
    WS.last.open()
    WS.last.recv(subscribed)
    WS.last.end(1012, 'server restart; reconnect_after_ms=3000')
    const d = r.retry.at(-1).delay
    delays.push(d)
    assert.ok(d >= 3000 && d < 4500, `${d} in [3000, 4500)`)
    const n = WS.all.length
    await tick(2999)
    assert.equal(WS.all.length, n, 'not before the hint')
    await tick(1501)
    assert.equal(WS.all.length, n + 1)
  }
  assert.ok(new Set(delays).size > 40, 'jittered')
  assert.equal(r.state.filter((s) => s === 'open').length, 50)
})

test('1013 honours its hint too; 4008 backs off long', async (t) => {
  const tick = fakeTime(t)
  const { WS, r } = client(t)
  await flush()
  WS.last.end(1013, 'try again later; reconnect_after_ms=7000')
  assert.ok(r.retry.at(-1).delay >= 7000 && r.retry.at(-1).delay < 10500)
  await tick(10500)
  WS.last.open()
  WS.last.end(4008, 'too many connections')
  const d = r.retry.at(-1).delay
  assert.ok(d >= 10000 && d <= 20000, `4008: ${d}`)
})

test('close() stops everything: no reconnect, state closed', async (t) => {
  const tick = fakeTime(t)
  const { WS, c, r } = client(t)
  await flush()
  WS.last.open()
  WS.last.recv(subscribed)
  c.close()
  assert.equal(WS.last.closedWith, 1000)
  await tick(60000)
  assert.equal(WS.all.length, 1)
  assert.deepEqual(r.state, ['open', 'closed'])
  assert.equal(c.state, 'closed')
})
