"""The length-prefixed TCP front door: the listener and one uvloop Protocol per connection."""
