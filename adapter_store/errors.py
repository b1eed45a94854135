"""The adapter store's exceptions: one tree, each class mapping to one gRPC status code.

    StoreError               base class; anything else from the store        (INTERNAL)
    ├── InvalidAdapter       bad file, config, name, size or declared sha256  INVALID_ARGUMENT
    ├── AdapterNotFound      no such adapter/version/alias, or revoked        NOT_FOUND
    │   └── BlobNotFound     (backend level) no object under a key
    ├── Incompatible         adapter does not fit the base model              FAILED_PRECONDITION
    ├── Conflict             alias expectation failed, retries exhausted      FAILED_PRECONDITION
    │   └── PreconditionFailed  (backend level) a conditional write lost
    ├── Quarantined          version quarantined by the runtime canary        FAILED_PRECONDITION
    ├── EvaluationRequired   an alias move lacks a passing evaluation         FAILED_PRECONDITION
    ├── StoreUnavailable     store unreachable, timed out, misconfigured      UNAVAILABLE
    ├── IntegrityError       stored bytes do not match their sha256           DATA_LOSS
    └── CapacityExceeded     size caps, cache budget or disk exhausted        RESOURCE_EXHAUSTED
        ├── SpoolFull        the upload spool's byte budget is reserved       RESOURCE_EXHAUSTED
        └── QuotaExceeded    a tenant's stored-bytes or adapter quota         RESOURCE_EXHAUSTED

The two backend-level classes are raised by `BlobBackend` implementations and handled inside
`Registry`; they subclass the class they would map to should one ever escape.

Backends classify third-party errors by type and error code, never by the text of a message.
Messages say what is wrong; an `AdapterNotFound` never says whether the adapter exists for
another tenant.
"""

from __future__ import annotations

__all__ = [
    "AdapterNotFound",
    "BlobNotFound",
    "CapacityExceeded",
    "Conflict",
    "EvaluationRequired",
    "Incompatible",
    "IntegrityError",
    "InvalidAdapter",
    "PreconditionFailed",
    "Quarantined",
    "QuotaExceeded",
    "SpoolFull",
    "StoreError",
    "StoreUnavailable",
]


class StoreError(Exception):
    """Base class of every error the adapter store raises."""


class InvalidAdapter(StoreError):
    """The adapter, one of its files, a name or a declared size/checksum is invalid."""


class AdapterNotFound(StoreError):
    """No such adapter, version or alias for this tenant, or it was revoked."""


class BlobNotFound(AdapterNotFound):
    """Backend level: no object is stored under the key."""


class Incompatible(StoreError):
    """The adapter does not fit the deployment's base model."""


class Conflict(StoreError):
    """A precondition on the current state failed (alias expectation, concurrent updates)."""


class PreconditionFailed(Conflict):
    """Backend level: a conditional write (If-Match / If-None-Match) failed."""


class Quarantined(StoreError):
    """The version was quarantined: the engine's runtime canary failed after it was loaded."""


class EvaluationRequired(StoreError):
    """An alias may not move to a version without a passing evaluation on the current set."""


class StoreUnavailable(StoreError):
    """The store could not be reached or did not answer in time."""


class IntegrityError(StoreError):
    """Bytes read back do not match the size or sha256 recorded for them."""


class CapacityExceeded(StoreError):
    """A size cap, the cache's byte budget or the disk is exhausted."""


class SpoolFull(CapacityExceeded):
    """Uploads and compositions in progress have reserved the whole spool budget."""


class QuotaExceeded(CapacityExceeded):
    """The tenant's quota on stored bytes or on adapters would be exceeded."""
