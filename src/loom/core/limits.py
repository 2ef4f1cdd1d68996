"""Every queue, batch, window and retry count has a maximum, declared here (STYLE rule 4)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    key_bytes_max: int = 4 * 1024
    value_bytes_max: int = 1024 * 1024
    commands_per_entry_max: int = 256
    entry_bytes_max: int = 4 * 1024 * 1024
    # Entries sent but not yet committed; over it, proposals answer Overloaded.
    inflight_entries_max: int = 1024
    pending_proposals_max: int = 8192
    pending_reads_max: int = 8192
    accept_entries_per_message_max: int = 64
    catchup_entries_per_message_max: int = 256
    # A member further behind than this is caught up by snapshot (PITFALLS 8).
    log_retained_entries_max: int = 4096
    snapshot_chunk_items_max: int = 512
    dedupe_entries_per_ushard_max: int = 100_000
    txn_reads_max: int = 1024
    # Keys of one read request (`get_many`; larger batches take several requests).
    read_keys_max: int = 256
    txn_writes_max: int = 1024
    scan_items_max: int = 10_000


DEFAULT_LIMITS = Limits()
