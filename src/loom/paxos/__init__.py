"""Sans-IO replication of one p-shard (DESIGN §3): acceptor, primary and follower roles.

The core never does IO: inputs are messages, ticks and proposals with `now` (the
node's monotonic clock, ms); outputs are collected in a `Ready` that the driver
executes in order: persist (fsync) → send → apply.
"""
