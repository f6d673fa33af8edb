"""Partitions: model_version (dynamic) x shard (dynamic, one per manifest shard)."""

from dagster import DynamicPartitionsDefinition, MultiPartitionsDefinition

model_versions = DynamicPartitionsDefinition(name="model_version")
shards = DynamicPartitionsDefinition(name="shard")
embedding_partitions = MultiPartitionsDefinition({"model_version": model_versions, "shard": shards})
