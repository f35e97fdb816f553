// What the server ships: src/mailpush/client.js, served at GET /v1/client.js,
// must be byte-identical to this directory's mailpush.js (the source; after
// editing it: cp clients/js/mailpush.js src/mailpush/client.js). And small.
import assert from 'node:assert/strict'
import { readFileSync } from 'node:fs'
import { test } from 'node:test'
import { size } from '../scripts/size.mjs'

test('src/mailpush/client.js is byte-identical to clients/js/mailpush.js', () => {
  const source = readFileSync(new URL('../mailpush.js', import.meta.url))
  const shipped = readFileSync(new URL('../../../src/mailpush/client.js', import.meta.url))
  assert.ok(
    source.equals(shipped),
    'src/mailpush/client.js differs from clients/js/mailpush.js: run `cp clients/js/mailpush.js src/mailpush/client.js`',
  )
})

test('minified and gzipped, the client stays under 4 KB', async () => {
  const s = await size()
  assert.ok(s.gzipped < 4096, `${s.gzipped} B`)
})

test('the module exports connect and nothing else', async () => {
  const m = await import('../mailpush.js')
  assert.deepEqual(Object.keys(m), ['connect'])
})
