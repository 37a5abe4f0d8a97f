"""Model files: reading checkpoints safely, family detection, key layouts, loading parts, saving,
random test checkpoints."""
