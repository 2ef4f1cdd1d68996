"""Sans-IO composition of a replica with its state machine and storage, per p-shard.

The host turns client requests into proposals and reads, executes the replica's Ready
against the storage port, and turns applied results into replies. It calls the
storage port synchronously: drivers run it where blocking is allowed (the simulator,
or a node's storage thread), never on an event loop.
"""
