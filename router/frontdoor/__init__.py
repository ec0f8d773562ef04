"""The front doors clients connect to: tcp/ (length-prefixed frames) and grpc/."""
