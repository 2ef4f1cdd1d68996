"""Fixtures shared by the integration tests.

- Real etcd processes (`etcd`, `etcd_cluster_factory`, `shared_etcd`) from `etcd_cluster`.
- `tests/unit` on sys.path (appended, so it shadows nothing): the etcd metastore runs the
  backend contract suite `test_metastore_contract`, which pytest otherwise imports only
  when it collects tests/unit (a directory without `__init__.py`) in the same run.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .etcd_cluster import etcd, etcd_cluster_factory, shared_etcd

__all__ = ["etcd", "etcd_cluster_factory", "shared_etcd"]

UNIT_TESTS = str(Path(__file__).resolve().parents[1] / "unit")
if UNIT_TESTS not in sys.path:
    sys.path.append(UNIT_TESTS)
