# nbdserve with everything its reproductions need, on Debian bookworm.
#
#   podman build -t nbdserve .                      (docker build works the same)
#   podman run --rm nbdserve                        every scenario: nbdserve reproduce all
#   podman run --rm nbdserve reproduce guest --client nbd-client --runs 3
#   podman run --rm -p 10809:10809 -v $PWD/images:/images nbdserve \
#       serve --bind 0.0.0.0 /images/top.qcow2      just serve an image
#
# No registry reachable?  Make the base locally and build with --pull=never:
#   debootstrap bookworm rootfs && tar -C rootfs -c . | podman import - debian:bookworm
FROM debian:bookworm

ENV DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1
# qemu-utils/libnbd-bin: the scenario clients; the rest: the guest harness (nbdserve.guest),
# the same list as scripts/guest-deps
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      python3 python3-venv python3-pip ca-certificates \
      qemu-utils libnbd-bin \
      qemu-system-x86 linux-image-amd64 busybox-static nbd-client dpkg-dev e2fsprogs kmod \
 && rm -rf /var/lib/apt/lists/*

COPY pyproject.toml README.md /src/nbdserve/
COPY nbdserve /src/nbdserve/nbdserve
RUN python3 -m venv /opt/nbdserve \
 && /opt/nbdserve/bin/pip install --no-cache-dir /src/nbdserve \
 && ln -s /opt/nbdserve/bin/nbdserve /usr/local/bin/nbdserve \
 && nbdserve --help >/dev/null

# the guest's initramfs is built at run time from the packages above, cached here
ENV XDG_CACHE_HOME=/var/cache
WORKDIR /images
EXPOSE 10809
ENTRYPOINT ["nbdserve"]
CMD ["reproduce", "all"]
