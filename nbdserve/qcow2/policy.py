"""Allocation policies: where the qemu-1.1.2 modes and the fixed allocator differ.

All run one write path (a model of qemu 1.1.x ``qcow2_alloc_cluster_offset`` and
``qcow2_alloc_cluster_link_l2``, alloc.py).  ``avail_bytes`` is the one line of
commit b7ab0fea ("qcow2: Fix avail_sectors in cluster allocation code"): the extent
from which the tail copy-on-write is computed.  ``follows_1_1`` says whether the
rest follows qemu 1.1.x too (discard, write-zeroes, when freed clusters can be
allocated again, refcount block placement, COW writes), so that the qemu-1.1.2 pair
ends byte for byte and cluster for cluster as qemu 1.1.2 and 1.1.2 + b7ab0fea do,
or, for ``fixed``, what a server should do (frees only once the L2 change that
dropped them is durable; v3 discards read as zeros).  Units are bytes; qemu's were
512-byte sectors.
"""

from __future__ import annotations


class AllocationPolicy:
    name = "abstract"
    follows_1_1 = False

    def avail_bytes(self, keep_clusters: int, nb_clusters: int, cluster_size: int) -> int:
        """Bytes from the first newly allocated cluster's origin that the allocation covers."""
        raise NotImplementedError


class FixedAllocator(AllocationPolicy):
    """qemu >= 1.2 (b7ab0fea) avail_sectors, with safe free timing: the default for serving."""

    name = "fixed"

    def avail_bytes(self, keep_clusters, nb_clusters, cluster_size):
        return nb_clusters * cluster_size


class Qemu112Allocator(AllocationPolicy):
    """qemu 1.1.2: avail_sectors counted as if from the first *kept* cluster, overstating the
    allocation by ``keep_clusters``; the tail COW then runs into the host cluster after the
    new ones."""

    name = "qemu-1.1.2"
    follows_1_1 = True

    def avail_bytes(self, keep_clusters, nb_clusters, cluster_size):
        return (keep_clusters + nb_clusters) * cluster_size


class Qemu112B7ab0feaAllocator(Qemu112Allocator):
    """qemu 1.1.2 with commit b7ab0fea cherry-picked (Philipp's bisect): only avail_sectors differs."""

    name = "qemu-1.1.2+b7ab0fea"

    def avail_bytes(self, keep_clusters, nb_clusters, cluster_size):
        return nb_clusters * cluster_size


POLICIES = {p.name: p for p in (FixedAllocator, Qemu112Allocator, Qemu112B7ab0feaAllocator)}
ALLOCATORS = tuple(POLICIES)


def policy_by_name(name: str) -> AllocationPolicy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown allocator {name!r}; expected one of {', '.join(POLICIES)}") from None
