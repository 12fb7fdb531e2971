"""Networking helpers shared by the tests that start gloo process groups or launchers on this machine."""
import socket


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (bound, read, closed again)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
