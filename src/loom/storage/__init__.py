"""The only place that touches RocksDB. `api` and `memory` are pure; `rocks` does IO."""
