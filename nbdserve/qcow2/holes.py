"""Whether a qcow2 image's data clusters can hide holes of its file that read as zeros."""

from __future__ import annotations

import os


def metadata_preallocation(img) -> bool:
    """qemu: qcow2_detect_metadata_preallocation(): more clusters in use than the file system holds.

    Only then does qemu ask the host file about holes inside data clusters
    (BDRV_BLOCK_RECURSE), so ``qemu-img map`` shows them as zero.
    """
    if img.metadata_preallocated is not None:   # decided once per open, as qemu does
        return img.metadata_preallocated
    st = os.fstat(img.fd)
    real_clusters = st.st_blocks * 512 // img.cluster_size
    threshold = max(real_clusters * 10 // 9, real_clusters + 2)
    end_cluster = (st.st_size + img.cluster_size - 1) // img.cluster_size
    count = 0
    for i in range(end_cluster):
        if count >= threshold:
            break
        count += img.refcounts.get(i) != 0
    img.metadata_preallocated = result = count >= threshold
    return result
