"""Name resolution for meshlink: host store, static rules and zeroconf registries."""
