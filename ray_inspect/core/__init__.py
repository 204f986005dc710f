"""The method: pure computation on tensors and arrays (no files, no object store, no Ray)."""
