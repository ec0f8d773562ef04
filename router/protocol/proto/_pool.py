"""The private descriptor pool the generated modules register in (see ``__init__``)."""

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
