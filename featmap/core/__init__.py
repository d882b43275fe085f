"""Plumbing every stage shares: registry, seeding, content keys, atomic files, bootstrap, the results table."""
