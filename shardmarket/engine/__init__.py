"""The shard engine: run a layer range of a decoder-only model (Stage) and the client's part (Head)."""
