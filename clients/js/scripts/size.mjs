// npm run size: mailpush.js minified (esbuild) and gzipped (level 9), in bytes.
import { readFileSync } from 'node:fs'
import { gzipSync } from 'node:zlib'
import { transform } from 'esbuild'

export async function size() {
  const src = readFileSync(new URL('../mailpush.js', import.meta.url), 'utf8')
  const { code } = await transform(src, { minify: true, format: 'esm', target: 'es2020' })
  return { source: Buffer.byteLength(src), minified: Buffer.byteLength(code), gzipped: gzipSync(code, { level: 9 }).length }
}

if (import.meta.url === `file://${process.argv[1]}`) {
  const s = await size()
  console.log(`mailpush.js: ${s.source} B source, ${s.minified} B minified, ${s.gzipped} B minified+gzipped`)
}
