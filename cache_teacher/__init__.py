"""Stage 1: the teacher cache. Its contract (schema, layout), the only zarr code (writer, reader),
the dump, inspection and verification, and the cache as a teacher source for students (targets)."""
