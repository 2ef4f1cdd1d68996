"""Sans-IO shard manager: registry, failure detection, epochs, configs, failover.

The manager is never on the data path and safety never rests on it being right: the
replication core refuses whatever would break an invariant. It only keeps the cluster
live: it picks primaries, allocates epochs (persisted by compare-and-swap before they
are announced) and changes membership one member at a time.
"""
