"""Allocation policies: the one seam where qemu 1.1.2 and its fix differ.

Both run the same write path (a model of qemu 1.1.x ``qcow2_alloc_cluster_offset``
and ``qcow2_alloc_cluster_link_l2``).  They differ only in ``avail_sectors``,
the extent from which the tail copy-on-write is computed
(block/qcow2-cluster.c; fixed by commit b7ab0fea "qcow2: Fix avail_sectors in
cluster allocation code").  Units here are bytes; qemu's were 512-byte sectors.
"""

from __future__ import annotations


class AllocationPolicy:
    name = "abstract"

    def avail_bytes(self, keep_clusters: int, nb_clusters: int, cluster_size: int) -> int:
        """Bytes from the first newly allocated cluster's origin that the allocation covers."""
        raise NotImplementedError


class FixedAllocator(AllocationPolicy):
    """qemu >= 1.2 (b7ab0fea): counted from the first newly allocated cluster."""

    name = "fixed"

    def avail_bytes(self, keep_clusters, nb_clusters, cluster_size):
        return nb_clusters * cluster_size


class Qemu112Allocator(AllocationPolicy):
    """qemu 1.1.2: counted as if from the first *kept* cluster, overstating the
    allocation by ``keep_clusters``; the tail COW then runs into the host cluster
    after the new ones."""

    name = "qemu-1.1.2"

    def avail_bytes(self, keep_clusters, nb_clusters, cluster_size):
        return (keep_clusters + nb_clusters) * cluster_size


POLICIES = {p.name: p for p in (FixedAllocator, Qemu112Allocator)}


def policy_by_name(name: str) -> AllocationPolicy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown allocator {name!r}; expected one of {', '.join(POLICIES)}") from None
