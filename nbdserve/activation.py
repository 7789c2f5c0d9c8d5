"""systemd socket activation: the listening sockets a parent handed over (sd_listen_fds(3)),
as qemu-nbd (check_socket_activation) and nbdkit read them."""

from __future__ import annotations

import os

SD_LISTEN_FDS_START = 3


class ActivationError(ValueError):
    """LISTEN_PID/LISTEN_FDS are set for this process but unusable."""


def listen_fds() -> tuple[int, ...]:
    """The fds 3.. handed to this process (LISTEN_PID is its pid, LISTEN_FDS how many), or ()
    when it was not socket-activated.  The variables are removed from the environment (as
    sd_listen_fds(1) does), so child processes do not take the sockets for theirs."""
    pid, count = os.environ.get("LISTEN_PID"), os.environ.get("LISTEN_FDS")
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    if pid is None or count is None or pid.strip() != str(os.getpid()):
        return ()
    if not count.isdigit() or int(count) < 1:
        raise ActivationError(f"socket activation: LISTEN_FDS={count!r} is not a number of sockets")
    fds = tuple(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(count)))
    for fd in fds:
        try:
            os.set_inheritable(fd, False)
        except OSError as e:
            raise ActivationError(f"socket activation: fd {fd}: {e.strerror}") from None
    return fds
