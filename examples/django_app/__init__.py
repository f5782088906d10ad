"""A small Django project on ENGINE "pgpool.django": a ledger of accounts and transfers (see README.md)."""
