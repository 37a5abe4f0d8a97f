"""The workflow engine: socket types, node declarations and registry, workflow parsing,
validation, the cached DAG executor. Imports nothing else of Latent Loom."""
