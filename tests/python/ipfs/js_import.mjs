// Prints the root CID that npm's ipfs-unixfs-importer (Helia's importer) gives each job, one per line.
// stdin: JSON list of {path, cidVersion, rawLeaves, chunkSize}; a directory is imported recursively
// (hidden entries skipped, as `ipfs add -r` does).
import { createReadStream, readdirSync, readFileSync, statSync } from 'node:fs'
import { basename, join } from 'node:path'
import { importer } from 'ipfs-unixfs-importer'
import { fixedSize } from 'ipfs-unixfs-importer/chunker'
import { balanced } from 'ipfs-unixfs-importer/layout'
import { MemoryBlockstore } from 'blockstore-core/memory'

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

for (const job of JSON.parse(readFileSync(0, 'utf8'))) {
  let root
  for await (const entry of importer(entries(job.path, basename(job.path)), new MemoryBlockstore(), {
    cidVersion: job.cidVersion,
    rawLeaves: job.rawLeaves,
    reduceSingleLeafToSelf: true,
    leafType: 'file',
    chunker: fixedSize({ chunkSize: job.chunkSize }),
    layout: balanced({ maxChildrenPerNode: 174 })
  })) {
    root = entry
  }
  console.log(root.cid.toString())
}
