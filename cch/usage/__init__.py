"""The usage ledger: one row per turn in SQLite or PostgreSQL (docs/usage.md).

``rows`` says what a row is, ``store`` keeps rows in a database, ``ledger`` records them off the
hot path, ``prices`` gives each its cost, ``report`` sums them for ``cch usage`` and
``GET /admin/usage``.
"""


