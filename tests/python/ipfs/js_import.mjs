// Prints the root CID npm's ipfs-unixfs-importer (Helia's importer) gives a file or directory tree.
// usage: node js_import.mjs PATH CID_VERSION RAW_LEAVES(0|1) CHUNK_SIZE
import { createReadStream, readdirSync, statSync } from 'node:fs'
import { basename, join } from 'node:path'
import { importer } from 'ipfs-unixfs-importer'
import { fixedSize } from 'ipfs-unixfs-importer/chunker'
import { balanced } from 'ipfs-unixfs-importer/layout'
import { MemoryBlockstore } from 'blockstore-core/memory'

const [path, cidVersion, rawLeaves, chunkSize] = process.argv.slice(2)

function * entries (full, rel) {
  if (statSync(full).isDirectory()) {
    yield { path: rel }
    for (const name of readdirSync(full).sort()) {
      if (!name.startsWith('.')) yield * entries(join(full, name), `${rel}/${name}`)
    }
  } else {
    yield { path: rel, content: createReadStream(full) }
  }
}

let root
for await (const entry of importer(entries(path, basename(path)), new MemoryBlockstore(), {
  cidVersion: Number(cidVersion),
  rawLeaves: rawLeaves === '1',
  reduceSingleLeafToSelf: true,
  leafType: 'file',
  chunker: fixedSize({ chunkSize: Number(chunkSize) }),
  layout: balanced({ maxChildrenPerNode: 174 })
})) {
  root = entry
}
console.log(root.cid.toString())
