"""Plumbing every stage shares: the name registry, seeding, content keys and atomic files, bootstrap, devices, the results-table contract, the data-parallel context."""
