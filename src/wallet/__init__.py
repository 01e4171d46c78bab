"""A double-entry wallet service for virtual currencies."""
