"""The Upstream interface a backend lends capacity through; the frame pool and frame connection;
gRPC channels and their call limiter.
"""
