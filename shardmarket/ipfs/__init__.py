"""Content layer: Kubo-compatible UnixFS CIDs, blockstore, trustless gateway, model shards."""
