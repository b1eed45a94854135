"""Which adapter versions the engine holds: resolve → manifest → disk cache → validate → engine.

One job per module:

    keys.py       version and name keys, `ResidencyEntry` (where a version is)
    manifests.py  `ManifestCache` (bounded LRU, single-flight reads, cached misses, share
                  indexes) and `ManifestPoller` (conditional re-reads every poll interval)
    slots.py      `Slots`: the engine-slot LRU, per-tenant shares, the FIFO waits for a slot
    pins.py       `Pins` (reserved with their caps) and `Blocks` (revocation: keys, names)
    loads.py      `Loads`: the cold-load path, one load in flight per version
    core.py       `Residency`: wires them together; use, pin, prefetch, revocation

Single flight (manifest reads, share indexes, loads, and the disk cache's downloads) is one
helper, `adapter_store.singleflight.SingleFlight`. The counts are Prometheus metrics
(`lora_gateway.metrics.Metrics`), read by the tests through the registry.
"""

from lora_gateway.residency.core import Residency
from lora_gateway.residency.keys import NameKey, ResidencyEntry, VersionKey, key_of, owner_of
from lora_gateway.residency.manifests import (
    ABSENT_MAX,
    MANIFEST_CACHE_SIZE,
    STORE_THREADS,
    ManifestCache,
    ManifestPoller,
)
from lora_gateway.residency.pins import Blocks, Pins
from lora_gateway.residency.slots import SLOT_WAIT_S, FifoGate, Resident, Slots

__all__ = [
    "ABSENT_MAX",
    "MANIFEST_CACHE_SIZE",
    "SLOT_WAIT_S",
    "STORE_THREADS",
    "Blocks",
    "FifoGate",
    "ManifestCache",
    "ManifestPoller",
    "NameKey",
    "Pins",
    "Residency",
    "ResidencyEntry",
    "Resident",
    "Slots",
    "VersionKey",
    "key_of",
    "owner_of",
]
