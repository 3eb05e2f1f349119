"""The usage ledger: one row per turn in SQLite or PostgreSQL (docs/usage.md).

``rows`` says what a row is, ``store`` keeps rows in a database, ``ledger`` records them off the
hot path, ``prices`` gives each its cost, ``report`` sums them for ``cch usage`` and
``GET /admin/usage``.
"""

from cch.usage.ledger import NullLedger, UsageLedger, open_ledger
from cch.usage.rows import UsageRow, usage_counts
from cch.usage.store import LedgerStore, StoreError, open_store

__all__ = ["LedgerStore", "NullLedger", "StoreError", "UsageLedger", "UsageRow", "open_ledger", "open_store", "usage_counts"]
