"""A deterministic simulation of the functions platform's queue lifecycle: the real
`Scheduler`, `Worker` and `DurableQueue` code, in virtual time, over an in-memory
serializable store that fails like loom kv does (unavailable, lost answers), with
schedulers and workers crashed and paused. See `run`."""
