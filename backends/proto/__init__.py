"""The generator of the KServe v2 modules in ``router/protocol/proto`` (``make protos``)."""
