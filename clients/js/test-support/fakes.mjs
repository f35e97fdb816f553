// Fakes for the client's Node tests: a scriptable WebSocket and EventSource,
// Web Locks, unsigned JWTs, and helpers for fake timers.
import { mock } from 'node:test'
import { setImmediate as realImmediate } from 'node:timers'

/** A JWT the client can decode (not signed: the client never verifies). */
export function jwt(claims) {
  const b = (o) => Buffer.from(JSON.stringify(o)).toString('base64url')
  return `${b({ alg: 'HS256', typ: 'JWT' })}.${b(claims)}.sig`
}

/** Let promises and I/O callbacks run (setImmediate is never mocked here). */
export async function flush(n = 10) {
  for (let i = 0; i < n; i++) await new Promise((r) => realImmediate(r))
}

/** Fake timers, Date included; returns an async tick that flushes promises. */
export function fakeTime(t, now = 1_700_000_000_000) {
  mock.timers.enable({ apis: ['setTimeout', 'setInterval', 'Date'], now })
  t.after(() => mock.timers.reset())
  return async (ms, step = ms) => {
    for (let done = 0; done < ms; done += step) {
      mock.timers.tick(Math.min(step, ms - done))
      await flush()
    }
    await flush()
  }
}

/** A WebSocket class whose instances the test drives by hand. */
export function fakeWebSocket() {
  class FakeWS {
    static all = []
    static get last() {
      return FakeWS.all[FakeWS.all.length - 1]
    }
    constructor(url, protocols) {
      this.url = url
      this.protocols = protocols
      this.sent = []
      this.readyState = 0
      this.closedWith = null
      FakeWS.all.push(this)
    }
    send(data) {
      if (this.readyState !== 1) throw new Error('send while not open')
      this.sent.push(JSON.parse(data))
    }
    close(code = 1000) {
      if (this.readyState === 3) return
      this.readyState = 3
      this.closedWith = code
    }
    // The server's side:
    open() {
      this.readyState = 1
      this.onopen?.({})
    }
    recv(packet) {
      this.onmessage?.({ data: JSON.stringify(packet) })
    }
    /** The connection ends (code 1006 and no open: a refused connection). */
    end(code = 1006, reason = '') {
      this.readyState = 3
      this.onerror?.({})
      this.onclose?.({ code, reason })
    }
    packets(type) {
      return this.sent.filter((p) => p.type === type)
    }
  }
  return FakeWS
}

/** An EventSource class whose instances the test drives by hand. */
export function fakeEventSource() {
  class FakeES {
    static all = []
    static get last() {
      return FakeES.all[FakeES.all.length - 1]
    }
    constructor(url) {
      this.url = url
      this.readyState = 0
      FakeES.all.push(this)
    }
    close() {
      this.readyState = 2
    }
    get params() {
      return new URL(this.url).searchParams
    }
    recv(packet, id) {
      this.readyState = 1
      this.onmessage?.({ data: JSON.stringify(packet), lastEventId: id ?? '' })
    }
    error() {
      this.onerror?.({})
    }
  }
  return FakeES
}

/** navigator.locks for one "browser": exclusive locks granted in request order. */
export function fakeLocks() {
  const queues = new Map()
  return {
    queues,
    request(name, opts, cb) {
      return new Promise((resolve, reject) => {
        const q = queues.get(name) || []
        queues.set(name, q)
        const entry = {
          async run() {
            try {
              resolve(await cb({ name, mode: 'exclusive' }))
            } catch (e) {
              reject(e)
            } finally {
              q.shift()
              q[0]?.run()
            }
          },
        }
        q.push(entry)
        opts?.signal?.addEventListener('abort', () => {
          const i = q.indexOf(entry)
          if (i > 0) {
            q.splice(i, 1)
            reject(new DOMException('aborted', 'AbortError'))
          }
        })
        if (q.length === 1) entry.run()
      })
    },
  }
}

/** Records what a client emits. */
export function recorder(client) {
  const r = { event: [], resync: [], state: [], error: [], retry: [] }
  for (const k of Object.keys(r)) client.on(k, (x) => r[k].push(x))
  return r
}

/** Polls (real time) until cond() holds; fails after ms. */
export async function until(cond, ms = 3000, what = 'condition') {
  const end = Date.now() + ms
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`)
    await new Promise((r) => setTimeout(r, 5))
  }
}
