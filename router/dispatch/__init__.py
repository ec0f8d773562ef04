"""Requests, the bounded queue, the one scheduler for every front door, per-backend runtime state
and the data-plane counters.
"""
