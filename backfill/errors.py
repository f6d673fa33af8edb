"""Typed errors: retryable faults let a partition's retry policy fire, permanent ones say how to fix the input."""


class BackfillError(Exception):
    """Base class for every error the engine raises on purpose."""


class RetryableError(BackfillError):
    """A transient fault (storage unreachable, preemption): retrying the same work may succeed."""


class PermanentError(BackfillError):
    """Bad input or configuration: retrying without a change will fail the same way."""


class ManifestError(PermanentError):
    """A manifest shard is unreadable or violates the manifest contract."""


class ModelError(PermanentError):
    """A model version is malformed, fails its checksum, or produces unusable output."""


class IncompleteError(PermanentError):
    """Embeddings of a model version do not cover the manifest exactly once."""


class RejectRateError(PermanentError):
    """Too many images of a shard were rejected: the corpus or the decoder is broken, not the image."""


class QualityGateError(PermanentError):
    """An index build failed its recall gate and must not be published."""


class ConfigError(PermanentError):
    """A setting is out of range or inconsistent."""


class Preempted(RetryableError):
    """The partition was asked to stop (SIGTERM on a spot node); committed chunks are kept for the retry."""


class UnknownImageError(PermanentError):
    """A query names an image_id that the serving index does not hold."""
