"""`tcp_bytes_sent`: the kernel's count of what this process sent over TCP (what `ds bench comm` reports)."""

import socket

import pytest

from fullchain.distributed.comm.counters import tcp_bytes_sent


def _receive(sock: socket.socket, n: int) -> None:
    received = 0
    while received < n:
        received += len(sock.recv(65536))


def test_counts_exactly_the_bytes_sent_and_leaves_the_connections_open():
    before = tcp_bytes_sent()
    if before is None:
        pytest.skip("this kernel does not report tcpi_bytes_sent (Linux >= 4.19)")
    with socket.create_server(("127.0.0.1", 0)) as server, \
            socket.create_connection(server.getsockname()) as client:
        peer, _ = server.accept()
        with peer:
            client.sendall(b"x" * 123_457)
            _receive(peer, 123_457)
            assert tcp_bytes_sent() - before == 123_457
            # counting read duplicates of the descriptors: both ends still talk afterwards, and both count
            peer.sendall(b"y" * 1000)
            _receive(client, 1000)
            assert tcp_bytes_sent() - before == 124_457
