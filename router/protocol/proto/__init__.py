"""Python modules generated from the protos beside them: KServe v2, the router's own
``inference_router.v1.Registry`` and AnyServe's ``anyserve.WorkerManagement`` (``make protos``,
which runs ``backends/proto/generate.py``; never edit the ``*_pb2*`` files by hand).

The router builds its own off-hot-path KServe replies and serves its admin gRPC services with
these classes; the backends and the tests use them too. They register their messages in a
private descriptor pool (``_pool.POOL``), not protobuf's default one: tritonclient's Triton
protos define the same ``inference.*`` names in the default pool, and one process may load
both (the tests do), which the default pool refuses as duplicate symbols. The wire format does
not depend on the pool.
"""
