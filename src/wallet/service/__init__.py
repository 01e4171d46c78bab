"""Use cases: they own database transactions and idempotency."""
