"""Test and demo harness (chaos, local S3, local Dagster): importable from the repo root, never installed."""
