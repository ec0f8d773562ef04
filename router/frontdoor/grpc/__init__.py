"""The gRPC front door: server, relayed calls, KServe v2 routing, the router's health service."""
