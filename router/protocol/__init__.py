"""The length-prefixed frame codec, the TCP session state machine, the KServe field reader."""
