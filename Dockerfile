# nbdserve with everything its reproductions need, on Debian bookworm.
#
#   podman build -t nbdserve .                      (docker build works the same)
#   podman run --rm nbdserve                        every scenario: nbdserve reproduce all
#                                                   (qemu-io's, then the dpkg guest, both clients)
#   podman run --rm nbdserve reproduce guest --client nbd-client --runs 3
#   podman run --rm -p 10809:10809 -v $PWD/images:/images nbdserve \
#       serve -b 0.0.0.0 /images/top.qcow2          just serve an image
#
# scripts/container-image builds it where no registry is reachable: it makes the
# debian:bookworm base locally (debootstrap + podman import), builds with --pull=never and
# prints the podman command line that runs containers on such a host.
FROM debian:bookworm

ENV DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1
# qemu-utils/libnbd-bin: the scenario clients; the rest: the guest harness (nbdserve.guest),
# the same list as scripts/guest-deps.  The harness boots the kernel with its own busybox
# initramfs: INITRD=No skips the kernel package's own initrd (/etc/kernel/postinst.d).
RUN apt-get update \
 && INITRD=No apt-get install -y --no-install-recommends \
      python3 python3-venv ca-certificates \
      qemu-utils libnbd-bin \
      qemu-system-x86 linux-image-amd64 busybox-static nbd-client iproute2 dpkg-dev e2fsprogs kmod debootstrap \
 && rm -rf /var/lib/apt/lists/*

# PIP_CERT: a CA bundle for pip (a path the build mounts) when PyPI is reached through a
# TLS proxy only the build host trusts; unset, pip uses the image's own CAs.
ARG PIP_CERT
# The dependencies (and the build's own, for --no-build-isolation below; bookworm's
# setuptools 66 builds wheels only with `wheel`) first, in a layer of their own: a change
# to the code reinstalls nbdserve alone, without reaching PyPI.
COPY pyproject.toml /src/nbdserve/
RUN python3 -m venv /opt/nbdserve \
 && python3 -c 'import tomllib; p = tomllib.load(open("/src/nbdserve/pyproject.toml", "rb")); \
                print(*p["build-system"]["requires"], "wheel", *p["project"]["dependencies"], sep="\n")' \
      > /src/requirements.txt \
 && /opt/nbdserve/bin/pip install --no-cache-dir -r /src/requirements.txt
COPY README.md /src/nbdserve/
COPY nbdserve /src/nbdserve/nbdserve
RUN /opt/nbdserve/bin/pip install --no-cache-dir --no-deps --no-build-isolation /src/nbdserve \
 && ln -s /opt/nbdserve/bin/nbdserve /usr/local/bin/nbdserve \
 && nbdserve --help >/dev/null

# the guest's initramfs is built at run time from the packages above, cached here
ENV XDG_CACHE_HOME=/var/cache
WORKDIR /images
EXPOSE 10809
ENTRYPOINT ["nbdserve"]
CMD ["reproduce", "all"]
