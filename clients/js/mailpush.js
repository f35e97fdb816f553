// mailpush browser client: one WebSocket per browser origin and subscriber
// (tabs elect a leader with Web Locks and share it over a BroadcastChannel),
// reconnect with full-jitter backoff and resume from the last offset,
// duplicates dropped, the token renewed in band, SSE when WebSockets fail.
// ES module, no dependencies. Source of truth: clients/js/mailpush.js; the
// server ships a byte-identical copy (src/mailpush/client.js) at /v1/client.js.

const AUTH = [4001, 4003, 1008] // close codes after which the token is fetched anew

/** The JWT's claims, decoded without verification ({} if it is no JWT). */
function claims(t) {
  try {
    return JSON.parse(atob(t.split('.')[1].replace(/-/g, '+').replace(/_/g, '/')))
  } catch {
    return {}
  }
}

/**
 * connect({url, token, events, sseUrl, key, since, WebSocket, EventSource, locks, BroadcastChannel, ...})
 * → {on(type, fn), off(type, fn), close(), state, position, leader}
 * Emits: "event" and "resync" (the server's packets), "state" ("connecting" |
 * "open" | "closed" | "fallback"), "error" ({type:"error", code, message}),
 * "retry" ({delay, code}: the next attempt, in the tab holding the socket).
 */
export function connect(o) {
  const {
    url,
    token,
    WebSocket: WS = globalThis.WebSocket,
    EventSource: ES = globalThis.EventSource,
    delay = 500, // first backoff step (ms)
    maxDelay = 20000, // backoff cap (ms)
    stable = 10000, // a connection open this long resets the backoff
    fallbackAfter = 3, // WebSocket failures (never opened) before SSE; 0: never
    retryWs = 60000, // on SSE, try the WebSocket again this often
    pingMs = 30000, // ping this often; a socket silent for a whole period after a ping is dropped; 0: off
  } = o
  const events = o.events && !o.events.includes('*') ? o.events : null // null: all
  const L = {} // listeners by type
  let state = 'connecting'
  let pos = o.since || null // {epoch, offset} of the last packet processed
  let closed, leader, bc, release, abort
  let tk, tkAt, stale // the token, when it was fetched, whether to fetch anew
  let ws, es, sse, timer, refreshT, probeT, pingT, opened, everOpen
  let attempt = 0, fails = 0, authFails = 0

  const emit = (t, x) =>
    (L[t] || []).slice().forEach((f) => {
      try {
        f(x)
      } catch (e) {
        setTimeout(() => {
          throw e
        })
      }
    })
  const relay = (m) => leader && bc && bc.postMessage(m)
  const setState = (s) => {
    relay({ s, pos })
    if (s !== state) emit('state', (state = s))
  }
  const out = (p) => {
    relay({ p, pos })
    emit(p.type, p)
  }
  const err = (code, e) => out({ type: 'error', code, message: String((e && e.message) || e || code) })
  const at = (p) => (p.epoch != null ? { epoch: p.epoch, offset: p.offset } : null)
  const send = (p) => ws.send(JSON.stringify(p))

  const tok = async () => {
    if (stale || !tk || (claims(tk).exp - 30) * 1e3 < Date.now()) {
      tk = typeof token == 'function' ? await token() : token
      tkAt = Date.now()
      stale = 0
    }
    return tk
  }

  // A packet from the socket (or the SSE stream) of this tab, the leader's.
  const onPacket = (p) => {
    const t = p.type
    if (t == 'subscribed') {
      authFails = 0
      opened = Date.now()
      if (!p.recovered) pos = at(p) // recovered: the missed events follow, pos moves with them
      plan(p.expires_at)
      setState(sse ? 'fallback' : 'open')
    } else if (t == 'refreshed') plan(p.expires_at)
    else if (t == 'close') lost(p.code, p.reason) // SSE's last packet
    else if (t == 'event') {
      const n = p.offset
      if (n != null && pos) {
        if (n <= pos.offset) return // seen: a replay overlapping what a tab already had
        pos = { epoch: pos.epoch, offset: n }
      }
      out(p)
    } else if (t == 'resync') {
      pos = at(p)
      out(p)
    } else if (t == 'error') out(p)
  }

  // In-band refresh at the later of exp − 30 s and 80% of the remaining
  // lifetime. "Now" is the token's iat plus the time since it was fetched,
  // so a wrong local clock does not matter for tokens that carry iat.
  const plan = (exp) => {
    clearTimeout(refreshT)
    if (typeof token != 'function' || !exp) return
    const c = claims(tk)
    const r = exp - (c.iat ? c.iat + (Date.now() - tkAt) / 1e3 : Date.now() / 1e3)
    refreshT = setTimeout(refresh, Math.min(864e5, Math.max(1e3, Math.max(r - 30, r * 0.8) * 1e3)))
  }
  const refresh = async () => {
    stale = 1
    try {
      const t = await tok()
      if (ws && ws.readyState == 1) send({ type: 'refresh', token: t })
      else if (es) drop(), openSse(t) // no upstream on SSE: reopen with the new token
    } catch (e) {
      err('token', e)
      refreshT = setTimeout(refresh, 1e4) // until it works, or the server closes with 4001
    }
  }

  const drop = () => {
    clearInterval(pingT)
    clearTimeout(refreshT)
    if (ws) ws.close(1000)
    if (es) es.close()
    ws = es = null
  }

  // The connection ended (or never opened): wait, then start again.
  const lost = (code, reason = '', failedOpen) => {
    drop()
    if (closed) return
    let d
    const hint = /reconnect_after_ms=(\d+)/.exec(reason)
    if (opened && Date.now() - opened >= stable) attempt = 0
    opened = 0
    if (sse) stale = 1 // an EventSource cannot tell a refused token from anything else
    else if (failedOpen && !everOpen && ES && fallbackAfter && ++fails >= fallbackAfter) {
      sse = 1
      probeT = setInterval(probe, retryWs)
    }
    if (AUTH.includes(code)) {
      stale = 1
      if (++authFails > 1) (d = maxDelay), err(code, reason || 'unauthorized')
    }
    if (code == 4008) d = maxDelay
    if (d) d *= (1 + Math.random()) / 2 // long: [max/2, max)
    if (hint) d = hint[1] * (1 + Math.random() / 2) // about N ms: [N, 1.5 N)
    if (d == null) d = Math.random() * Math.min(maxDelay, delay * 2 ** attempt++) // full jitter
    emit('retry', { delay: d, code })
    setState('connecting')
    timer = setTimeout(start, d)
  }

  const start = async () => {
    try {
      const t = await tok()
      if (!closed) sse ? openSse(t) : openWs(t)
    } catch (e) {
      err('connect', e)
      lost()
    }
  }

  const openWs = (t, probing) => {
    const s = new WS(url, ['mailpush.v1', 'mailpush.token.' + t])
    let seen = 1, up
    if (!probing) ws = s
    s.onerror = () => {}
    s.onopen = () => {
      if (probing) {
        // SSE works, and now the WebSocket does too: switch back to it.
        if (closed || !sse || ws) return s.close(1000)
        clearInterval(probeT)
        clearTimeout(timer)
        drop()
        sse = 0
        ws = s
      }
      if (s !== ws) return
      up = everOpen = 1
      fails = 0
      send({ type: 'subscribe', events: events || undefined, since: pos && pos.epoch != null ? pos : undefined })
      if (pingMs)
        pingT = setInterval(() => {
          if (!seen) return lost(1006, 'silent')
          seen = 0
          send({ type: 'ping' })
        }, pingMs)
    }
    s.onmessage = (e) => {
      seen = 1
      if (s === ws) onPacket(JSON.parse(e.data))
    }
    s.onclose = (e) => s === ws && lost(e.code, e.reason, !up)
  }
  const probe = async () => {
    try {
      if (!ws) openWs(await tok(), 1)
    } catch {}
  }

  const openSse = (t) => {
    const base = o.sseUrl || url.replace(/^ws/, 'http').replace(/\/ws(?=$|[?#])/, '/events')
    const q = new URLSearchParams({ token: t })
    if (events) q.set('events', events.join(','))
    if (pos && pos.epoch != null) q.set('last_event_id', pos.epoch + ':' + pos.offset)
    const s = (es = new ES(base + (base.includes('?') ? '&' : '?') + q))
    s.onmessage = (e) => s === es && onPacket(JSON.parse(e.data))
    s.onerror = () => s === es && lost() // we reconnect ourselves, with our backoff
  }

  const lead = () => {
    leader = 1
    setState('connecting')
    start()
  }

  // A message from the other tabs: the leader's packets and state, or a
  // new tab's hello. Followers drop by offset too (a relay may arrive twice
  // across a change of leader) and keep the position, to resume from it.
  const onRelay = ({ data: m }) => {
    if (m.h) return leader && setState(state)
    const p = m.p
    const n = m.pos
    if (p && p.type == 'event' && p.offset != null && pos && n && n.epoch === pos.epoch && p.offset <= pos.offset)
      return
    if (p && p.type == 'resync') pos = n
    else if (n && (!pos || n.epoch !== pos.epoch || n.offset > pos.offset)) pos = n
    if (p) emit(p.type, p)
    else if (!leader && m.s !== state) emit('state', (state = m.s))
  }

  ;(async () => {
    let key = o.key
    try {
      key = key || claims(await tok()).sub
    } catch {}
    const name = 'mailpush:' + (key || url) + (events ? ':' + events : '')
    const locks = o.locks || (globalThis.navigator && navigator.locks)
    const BC = o.BroadcastChannel || globalThis.BroadcastChannel
    if (closed) return
    if (!locks || !BC || o.share === false) return lead()
    bc = new BC(name)
    bc.onmessage = onRelay
    bc.postMessage({ h: 1 })
    abort = new AbortController()
    locks
      .request(name, { signal: abort.signal }, () => closed || new Promise((r) => ((release = r), lead())))
      .catch(() => {})
  })()

  const c = {
    get state() {
      return state
    },
    get position() {
      return pos
    },
    get leader() {
      return !!leader
    },
    on(t, f) {
      ;(L[t] = L[t] || []).push(f)
      return c
    },
    off(t, f) {
      L[t] = (L[t] || []).filter((g) => g !== f)
      return c
    },
    close() {
      if (closed) return
      closed = 1
      clearTimeout(timer)
      clearInterval(probeT)
      drop()
      leader = 0 // the next tab takes over: tell the others nothing
      if (release) release()
      if (abort) abort.abort()
      if (bc) bc.close()
      setState('closed')
    },
  }
  return c
}
