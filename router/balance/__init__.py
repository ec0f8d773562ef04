"""Balancing policies. A snapshot of candidates and an RNG in, a choice out."""
