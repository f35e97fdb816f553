// One socket per browser and subscriber: the tabs (here: clients in one
// process) elect a leader with (fake) Web Locks; the leader relays over a
// real BroadcastChannel (Node's). The real navigator.locks needs a browser.
import assert from 'node:assert/strict'
import { test } from 'node:test'
import { WebSocket } from 'ws'
import { connect } from '../mailpush.js'
import { fakeLocks, jwt, recorder, until } from '../test-support/fakes.mjs'
import { startServer } from '../test-support/server.mjs'

const offsets = (r) => r.event.map((e) => e.offset ?? null)
const sleep = (ms) => new Promise((r) => setTimeout(r, ms))

async function browser(t, sub = 'alice') {
  const srv = await startServer()
  t.after(() => srv.close())
  const locks = fakeLocks()
  const tabs = []
  const tab = (extra = {}) => {
    const token = extra.token || jwt({ sub, exp: Math.floor(Date.now() / 1e3) + 3600 })
    const c = connect({ url: srv.url, token, WebSocket, locks, delay: 10, ...extra })
    t.after(() => c.close())
    const x = { c, r: recorder(c) }
    tabs.push(x)
    return x
  }
  return { srv, locks, tab, tabs }
}

test('three tabs, one socket: the leader relays events and state; every tab gets each event once', async (t) => {
  const { srv, tab } = await browser(t, 'three')
  const a = tab()
  await until(() => a.c.state === 'open', 3000, 'leader open')
  const b = tab()
  const c = tab()
  await until(() => b.c.state === 'open' && c.c.state === 'open', 3000, 'followers told the state')
  assert.equal(srv.conns.length, 1)
  assert.deepEqual([a.c.leader, b.c.leader, c.c.leader], [true, false, false])
  for (let i = 0; i < 3; i++) srv.publish('three', 'new_letter', { i })
  await until(() => [a, b, c].every((x) => x.r.event.length === 3), 3000, 'relayed events')
  for (const x of [a, b, c]) {
    assert.deepEqual(offsets(x.r), [1, 2, 3])
    assert.deepEqual(x.c.position, { epoch: 'e1', offset: 3 })
  }
  assert.deepEqual(b.r.event[2], { type: 'event', subscriber: 'three', event: 'new_letter', data: { i: 2 }, offset: 3 })
  // The leader's socket drops: the followers see it too.
  srv.conns[0].ws.terminate()
  await until(() => srv.open.length === 1 && b.c.state === 'open')
  assert.ok(b.r.state.includes('connecting'))
  assert.deepEqual(srv.conns[1].subscribes[0].since, { epoch: 'e1', offset: 3 })
})

test('the leader tab closes: the next takes over within a second and resumes; nothing lost or doubled', async (t) => {
  const { srv, tab } = await browser(t, 'handover')
  const a = tab()
  await until(() => a.c.state === 'open')
  const b = tab()
  const c = tab()
  srv.publish('handover', 'x')
  srv.publish('handover', 'x')
  await until(() => [a, b, c].every((x) => x.r.event.length === 2))
  const t0 = Date.now()
  a.c.close()
  // Letters arrive while no tab holds a socket.
  srv.publish('handover', 'x')
  srv.publish('handover', 'x')
  await until(() => srv.conns.length === 2 && srv.conns[1].subscribes.length === 1, 3000, 'a new leader')
  assert.ok(Date.now() - t0 < 1000, `took over in ${Date.now() - t0} ms`)
  assert.equal(srv.open.length, 1)
  assert.deepEqual(srv.conns[1].subscribes[0].since, { epoch: 'e1', offset: 2 })
  assert.ok(b.c.leader && !c.c.leader)
  srv.publish('handover', 'x')
  await until(() => b.r.event.length === 5 && c.r.event.length === 5, 3000, 'all five')
  await sleep(50)
  assert.deepEqual(offsets(b.r), [1, 2, 3, 4, 5])
  assert.deepEqual(offsets(c.r), [1, 2, 3, 4, 5])
  assert.deepEqual(offsets(a.r), [1, 2])
  assert.equal(a.c.state, 'closed')
  assert.ok(!c.r.state.includes('closed'), 'the followers never saw "closed"')
  // And once more: b closes, c leads alone.
  b.c.close()
  await until(() => c.c.leader && c.c.state === 'open')
  srv.publish('handover', 'x')
  await until(() => c.r.event.length === 6)
  assert.deepEqual(srv.conns[2].subscribes[0].since, { epoch: 'e1', offset: 5 })
})

test('followers drop relays they already have (a relay that arrives twice across a change of leader)', async (t) => {
  const { srv, tab } = await browser(t, 'dupes')
  const a = tab()
  await until(() => a.c.state === 'open')
  const b = tab()
  await until(() => b.c.state === 'open')
  srv.publish('dupes', 'x')
  srv.publish('dupes', 'x')
  await until(() => b.r.event.length === 2)
  // An old leader's late relays on the same channel.
  const old = new BroadcastChannel('mailpush:dupes')
  t.after(() => old.close())
  const pos = { epoch: 'e1', offset: 2 }
  old.postMessage({ p: { type: 'event', subscriber: 'dupes', event: 'x', data: {}, offset: 2 }, pos })
  old.postMessage({ p: { type: 'event', subscriber: 'dupes', event: 'x', data: {}, offset: 1 }, pos })
  old.postMessage({ p: { type: 'event', subscriber: 'dupes', event: 'raw', data: {} }, pos }) // no offset: delivered
  srv.publish('dupes', 'x')
  await until(() => b.r.event.length === 4 && a.r.event.length === 4)
  await sleep(50)
  assert.deepEqual(offsets(b.r), [1, 2, null, 3])
  assert.deepEqual(offsets(a.r), [1, 2, null, 3], 'the leader listens too')
})

test('a resync is relayed and its epoch/offset adopted by every tab', async (t) => {
  const { srv, tab } = await browser(t, 'resync')
  const a = tab()
  await until(() => a.c.state === 'open')
  const b = tab()
  await until(() => b.c.state === 'open')
  srv.publish('resync', 'x')
  await until(() => b.r.event.length === 1)
  srv.epoch = 'e9'
  srv.history.set('resync', [])
  srv.conns[0].ws.terminate()
  await until(() => b.r.resync.length === 1 && a.r.resync.length === 1, 3000, 'resync')
  assert.equal(b.r.resync[0].reason, 'epoch_changed')
  assert.deepEqual(b.c.position, { epoch: 'e9', offset: 0 })
  srv.publish('resync', 'x') // offset 1 again, in the new epoch
  await until(() => b.r.event.length === 2 && a.r.event.length === 2)
  assert.deepEqual(offsets(b.r), [1, 1])
})

test('two accounts in one browser never share: the key comes from the token sub', async (t) => {
  const { srv, tab } = await browser(t, 'unused')
  const now = Math.floor(Date.now() / 1e3)
  const alice = [tab({ token: jwt({ sub: 'alice2', exp: now + 3600 }) }), tab({ token: jwt({ sub: 'alice2', exp: now + 3600 }) })]
  const bob = [tab({ token: async () => jwt({ sub: 'bob2', exp: now + 3600 }) }), tab({ token: jwt({ sub: 'bob2', exp: now + 3600 }) })]
  await until(() => [...alice, ...bob].every((x) => x.c.state === 'open'))
  assert.equal(srv.conns.length, 2)
  assert.deepEqual(srv.conns.map((c) => c.sub).sort(), ['alice2', 'bob2'])
  srv.publish('alice2', 'x')
  await until(() => alice.every((x) => x.r.event.length === 1))
  await sleep(50)
  assert.ok(bob.every((x) => x.r.event.length === 0))
})

test('an explicit key; different event filters do not share a socket', async (t) => {
  const { srv, tab } = await browser(t, 'filters')
  const a = tab({ key: 'k1', events: ['new_letter'] })
  const b = tab({ key: 'k1', events: ['new_letter'] })
  const c = tab({ key: 'k1' })
  await until(() => [a, b, c].every((x) => x.c.state === 'open'))
  assert.equal(srv.conns.length, 2)
})

test('without Web Locks or BroadcastChannel: one socket per tab', async (t) => {
  const { srv, tab } = await browser(t, 'nolocks')
  const a = tab({ locks: null })
  const b = tab({ locks: null })
  const c = tab({ BroadcastChannel: null, share: false })
  await until(() => [a, b, c].every((x) => x.c.state === 'open'))
  assert.equal(srv.conns.length, 3)
  assert.ok(a.c.leader && b.c.leader && c.c.leader)
})

test('a follower that closes gives up its place in the lock queue; the leader goes on', async (t) => {
  const { srv, locks, tab } = await browser(t, 'quit')
  const a = tab()
  await until(() => a.c.state === 'open')
  const b = tab()
  await until(() => b.c.state === 'open')
  assert.equal(locks.queues.get('mailpush:quit').length, 2)
  b.c.close()
  await until(() => locks.queues.get('mailpush:quit').length === 1)
  srv.publish('quit', 'x')
  await until(() => a.r.event.length === 1)
  assert.equal(a.c.state, 'open')
  assert.equal(b.r.event.length, 0)
  a.c.close()
  await until(() => locks.queues.get('mailpush:quit').length === 0)
})
