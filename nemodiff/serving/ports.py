"""The ports `nemodiff serve` will listen on, checked before anything starts.

checkpoint ──builder──▶ engine dir ──runtime──▶ [serving: nemodiff serve, its ports]

Each port is bound for a moment, as its server will bind it (SO_REUSEADDR, so a port whose
last connections linger in TIME_WAIT is free, as it is for the servers). A port that is taken
is one line naming the option, the port and, when this user may see it, the process that
listens on it (from /proc/net/tcp*, and the socket among /proc/PID/fd); two options naming
the same port are refused the same way.
"""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

LISTEN = "0A"  # the TCP state in /proc/net/tcp


def port_problem(host: str, port: int) -> str | None:
    """Why `port` on `host` cannot be listened on (None when it can)."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"the address {host!r} does not resolve ({exc.strerror})"
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
            sock.listen(1)
        except OSError as exc:
            return f"in use{holder(port)}" if exc.errno == errno.EADDRINUSE else f"cannot be listened on ({exc.strerror})"
    return None


def holder(port: int) -> str:
    """' by pid N (name)' for the process listening on `port`, '' when it cannot be seen."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == LISTEN and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{fields[9]}]")
    if not inodes:
        return ""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                if os.readlink(fd) in inodes:
                    name = (proc / "comm").read_text().strip()
                    return f" by pid {proc.name} ({name})"
        except OSError:  # another user's process, or gone meanwhile
            continue
    return ""


def check_ports(host: str, ports: dict[str, int | None]) -> str | None:
    """The first problem with the ports {option: port} (None when every port is free and distinct)."""
    seen: dict[int, str] = {}
    for option, port in ports.items():
        if port is None:
            continue
        if not 0 < port < 65536:
            return f"{option} {port}: not a port (1 to 65535)"
        if port in seen:
            return f"{option} {port}: the same port as {seen[port]}; give each its own"
        seen[port] = option
        problem = port_problem(host, port)
        if problem:
            return f"{option} {port} on {host or '0.0.0.0'}: {problem}; stop that process or choose another port"
    return None
