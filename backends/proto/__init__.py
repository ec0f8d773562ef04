"""Python modules generated from the KServe v2 protos beside them (``make protos``).

They register their messages in a private descriptor pool (``_pool.POOL``), not protobuf's
default one: tritonclient's Triton protos define the same ``inference.*`` names in the default
pool, and one process may load both (the tests do), which the default pool refuses as
duplicate symbols. The wire format does not depend on the pool.
"""
