"""``python -m ftproxy.guest SCRIPT ARGS``: boot a program on virtual devices.

Started by a supervisor with the guest pipe on fds 3 and 4 (see
``ftproxy.guest.protocol``). The first exit learns the pinned policy and the
entropy seed; then the devices are installed and SCRIPT runs as ``__main__``,
unmodified, exactly as ``python SCRIPT ARGS`` would run it.
"""

from __future__ import annotations

import os
import runpy
import sys

from ftproxy.guest._install import install
from ftproxy.guest._runtime import Runtime, UnsupportedInGuest

EXIT_UNSUPPORTED = 3


def main() -> None:
    if len(sys.argv) < 2:
        sys.stderr.write("usage: python -m ftproxy.guest SCRIPT [ARGS...] (started by ftproxy)\n")
        raise SystemExit(2)
    script = os.path.abspath(sys.argv[1])
    runtime = Runtime()
    seed, pid, hostname, network = runtime.boot()
    install(runtime, seed, pid, hostname)
    if network is not None:
        # Packet mode: imported only here, so a socket-mode guest imports no stack.
        from ftproxy.guest._vnet import PacketNetwork

        runtime.network = PacketNetwork(runtime, network, seed)
    sys.argv = sys.argv[1:]
    sys.path[0] = os.path.dirname(script)
    try:
        runpy.run_path(script, run_name="__main__")
    except UnsupportedInGuest as exc:
        runtime.flush()
        where = _call_site(exc)
        sys.stderr.write(f"ftproxy: the guest stopped: {exc}{where}\n")
        raise SystemExit(EXIT_UNSUPPORTED) from None
    finally:
        runtime.flush()


def _call_site(exc: BaseException) -> str:
    """Where in the user's program the unsupported call was made."""
    tb = exc.__traceback__
    site = ""
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        if "ftproxy" not in filename and "<frozen" not in filename and "runpy" not in filename:
            site = f" (called at {filename}:{tb.tb_lineno})"
        tb = tb.tb_next
    return site


if __name__ == "__main__":
    main()
