"""Clients of the length-prefixed protocol (FrameClient, RetryingClient)."""
