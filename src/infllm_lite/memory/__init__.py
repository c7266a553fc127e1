"""Context memory storage: the paged block pool (fast slots, host store, disk overflow)."""

from .disk import DiskStore
from .pool import BlockPool, PoolStats

__all__ = ["BlockPool", "DiskStore", "PoolStats"]
