"""loom functions: the serverless background-function platform (DESIGN §8).

Being built (functions issue): `queue` holds DurableQ's storage in loom kv — durable,
idempotent submission and the due index. The public `App` API, schedulers and workers
come next.
"""
