"""One health monitor with probers (frame, connect, grpc.health) and passive outlier ejection."""
