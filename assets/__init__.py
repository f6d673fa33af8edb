"""Dagster assets over the engine: partitions, resources, embeddings and the index."""
