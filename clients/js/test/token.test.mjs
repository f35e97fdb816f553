// Tokens: in-band refresh before expiry, refetch after 4001/4003, the
// second refusal backing off long with an error, fixed strings.
import assert from 'node:assert/strict'
import { test } from 'node:test'
import { connect } from '../mailpush.js'
import { fakeTime, fakeWebSocket, flush, jwt, recorder } from '../test-support/fakes.mjs'

const URL = 'wss://push.example.com/v1/ws'

/** A token function minting tokens of `ttl` seconds from a server clock `skew` s off ours. */
function minter(ttl, skew = 0) {
  const f = async () => {
    f.calls++
    const iat = Math.floor(Date.now() / 1e3) + skew
    const t = jwt({ sub: 'alice', iat, exp: iat + ttl, n: f.calls })
    f.issued.push(t)
    return t
  }
  f.calls = 0
  f.issued = []
  return f
}

const expOf = (t) => JSON.parse(Buffer.from(t.split('.')[1], 'base64url')).exp

async function open(t, token, extra = {}) {
  const WS = fakeWebSocket()
  const c = connect({ url: URL, token, WebSocket: WS, share: false, pingMs: 0, fallbackAfter: 0, ...extra })
  t.after(() => c.close())
  const r = recorder(c)
  await flush()
  const up = (ws = WS.last) => {
    ws.open()
    const tok = ws.protocols[1].slice('mailpush.token.'.length)
    ws.recv({ type: 'subscribed', subscriber: 'alice', events: ['*'], epoch: 'e1', offset: 0, expires_at: expOf(tok) })
  }
  return { WS, c, r, up }
}

test('a token function: refresh in band at exp − 30 s (long tokens), and again after refreshed', async (t) => {
  const tick = fakeTime(t)
  const token = minter(3600)
  const { WS, up } = await open(t, token)
  up()
  assert.equal(token.calls, 1)
  await tick(3569_000, 60_000)
  assert.deepEqual(WS.last.packets('refresh'), [], 'not yet at exp − 31 s')
  await tick(1000)
  assert.equal(token.calls, 2)
  assert.deepEqual(WS.last.packets('refresh'), [{ type: 'refresh', token: token.issued[1] }], 'at exp − 30 s')
  WS.last.recv({ type: 'refreshed', expires_at: expOf(token.issued[1]) })
  await tick(3569_000, 60_000)
  assert.equal(WS.last.packets('refresh').length, 1)
  await tick(2000)
  assert.equal(WS.last.packets('refresh').length, 2, 'the new token refreshed before its own expiry')
  assert.equal(WS.all.length, 1, 'one connection all along')
})

test('short tokens refresh at 80% of their lifetime (later than exp − 30 s)', async (t) => {
  const tick = fakeTime(t)
  const token = minter(60)
  const { WS, up } = await open(t, token)
  up()
  await tick(47_000, 1000)
  assert.equal(WS.last.packets('refresh').length, 0)
  await tick(1000)
  assert.equal(WS.last.packets('refresh').length, 1, 'at 48 s of 60')
})

test('a local clock an hour off the server: refresh timed from the token iat, not from our clock', async (t) => {
  const tick = fakeTime(t)
  const token = minter(600, -3600) // server clock 1 h behind ours
  const { WS, up } = await open(t, token)
  up()
  await tick(1000)
  assert.equal(WS.last.packets('refresh').length, 0, 'not at once')
  await tick(568_000, 10_000)
  assert.equal(WS.last.packets('refresh').length, 0)
  await tick(2000)
  assert.equal(WS.last.packets('refresh').length, 1, 'at 570 s of 600')
})

test('a fixed string token is never refreshed', async (t) => {
  const tick = fakeTime(t)
  const now = Math.floor(Date.now() / 1e3)
  const { WS, up } = await open(t, jwt({ sub: 'alice', iat: now, exp: now + 120 }))
  up()
  await tick(200_000, 10_000)
  assert.equal(WS.last.packets('refresh').length, 0)
})

test('4001 token expired: a fresh token is fetched, then the client reconnects with it', async (t) => {
  const tick = fakeTime(t)
  const token = minter(3600)
  const { WS, r, up } = await open(t, token)
  up()
  WS.last.end(4001, 'token expired')
  await tick(600)
  assert.equal(WS.all.length, 2)
  assert.equal(token.calls, 2, 'refetched')
  assert.equal(WS.last.protocols[1], 'mailpush.token.' + token.issued[1])
  assert.deepEqual(r.error, [], 'one refusal is no error')
})

test('4003 twice: a fresh token, then the max delay and an error', async (t) => {
  const tick = fakeTime(t)
  const token = minter(3600)
  const { WS, r } = await open(t, token)
  WS.last.open()
  WS.last.end(4003, 'unauthorized')
  assert.ok(r.retry[0].delay <= 500)
  await tick(600)
  assert.equal(token.calls, 2)
  WS.last.open()
  WS.last.end(4003, 'unauthorized')
  const d = r.retry[1].delay
  assert.ok(d >= 10000 && d <= 20000, `long backoff: ${d}`)
  assert.deepEqual(r.error, [{ type: 'error', code: 4003, message: 'unauthorized' }])
  await tick(20000, 1000)
  assert.equal(token.calls, 3, 'and a fresh token again for the next try')
  // A good token resets the count.
  const last = WS.last
  last.open()
  last.recv({ type: 'subscribed', subscriber: 'alice', epoch: 'e1', offset: 0, expires_at: expOf(token.issued[2]) })
  last.end(4003, 'unauthorized')
  assert.ok(r.retry.at(-1).delay <= 20000 && r.error.length === 1)
})

test('1008 (e.g. a refresh with another subscriber token) is handled like 4003', async (t) => {
  const tick = fakeTime(t)
  const token = minter(3600)
  const { WS } = await open(t, token)
  WS.last.open()
  WS.last.end(1008, 'policy')
  await tick(600)
  assert.equal(token.calls, 2)
})

test('a token function that throws: an error, then the backoff', async (t) => {
  const tick = fakeTime(t)
  let n = 0
  const token = async () => {
    if (++n < 3) throw new Error('offline')
    return jwt({ sub: 'alice', exp: 4e9 })
  }
  const { WS, r } = await open(t, token)
  assert.equal(WS.all.length, 0)
  assert.equal(r.error[0].message, 'offline')
  await tick(3000, 100)
  assert.equal(WS.all.length, 1)
})

test('a server error packet is emitted as error', async (t) => {
  fakeTime(t)
  const { WS, r, up } = await open(t, minter(3600))
  up()
  WS.last.recv({ type: 'error', code: 'bad_packet', message: 'unknown type' })
  assert.deepEqual(r.error, [{ type: 'error', code: 'bad_packet', message: 'unknown type' }])
})

test('a refresh whose token function fails is retried (error emitted), the socket kept', async (t) => {
  const tick = fakeTime(t)
  let fail = false
  const good = minter(60)
  const token = async () => {
    if (fail) throw new Error('token endpoint down')
    return good()
  }
  const { WS, r, up } = await open(t, token)
  up()
  fail = true
  await tick(48_000, 1000)
  assert.equal(r.error.length, 1)
  assert.equal(r.error[0].code, 'token')
  fail = false
  await tick(10_000, 1000)
  assert.equal(WS.last.packets('refresh').length, 1, 'retried 10 s later')
  assert.equal(WS.all.length, 1)
})
