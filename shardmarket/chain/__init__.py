"""Chain side of a node and a client: contract bindings, deployments, keys, EIP-712 types."""
