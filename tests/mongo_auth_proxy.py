"""A loopback proxy in front of nx-27017 that accepts SASL PLAIN logins and records them, for the credentials tests.

nx-27017 has no authentication: a client with a user and password in its URL fails at the login (``saslStart`` gets
an answer without a payload). The proxy answers ``saslStart`` itself (done, whatever the password) and forwards every
other message unchanged, so that a real study runs with a real password in its URL, sent over the wire like to a
real MongoDB (``authMechanism=PLAIN``), and the test can check both that the password reached the server and that it
appears nowhere else. Wire format: https://www.mongodb.com/docs/manual/reference/mongodb-wire-protocol/ (OP_MSG).
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import bson

__all__ = ["AuthProxy", "auth_proxy"]

OP_MSG = 2013
HEADER = struct.Struct("<iiii")  # messageLength, requestID, responseTo, opCode


def _read_message(sock: socket.socket) -> bytes | None:
    header = _read_exactly(sock, HEADER.size)
    if header is None:
        return None
    body = _read_exactly(sock, HEADER.unpack(header)[0] - HEADER.size)
    return None if body is None else header + body


def _read_exactly(sock: socket.socket, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


class AuthProxy:
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.logins: list[bytes] = []  # the PLAIN payloads: b"\0user\0password"
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])

    def serve(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:  # closed: the test is over
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            lock = threading.Lock()
            threading.Thread(target=self._from_client, args=(client, upstream, lock), daemon=True).start()
            threading.Thread(target=self._to_client, args=(upstream, client, lock), daemon=True).start()

    def _sasl_command(self, message: bytes) -> dict[str, object] | None:
        if HEADER.unpack_from(message)[3] != OP_MSG or message[HEADER.size + 4] != 0:
            return None
        start = HEADER.size + 5  # after flagBits and the section kind: the command, then maybe document sections
        (size,) = struct.unpack_from("<i", message, start)
        command = bson.decode(message[start : start + size])
        return command if next(iter(command)) in ("saslStart", "saslContinue") else None

    def _from_client(self, client: socket.socket, upstream: socket.socket, lock: threading.Lock) -> None:
        try:
            while (message := _read_message(client)) is not None:
                command = self._sasl_command(message)
                if command is None:
                    upstream.sendall(message)
                    continue
                self.logins.append(bytes(command.get("payload", b"")))  # type: ignore[call-overload]
                reply = bson.encode({"conversationId": 1, "done": True, "payload": b"", "ok": 1.0})
                body = struct.pack("<I", 0) + b"\0" + reply
                header = HEADER.pack(HEADER.size + len(body), 0, HEADER.unpack_from(message)[1], OP_MSG)
                with lock:
                    client.sendall(header + body)
        except OSError:
            pass
        finally:
            client.close()
            upstream.close()

    def _to_client(self, upstream: socket.socket, client: socket.socket, lock: threading.Lock) -> None:
        try:
            while (message := _read_message(upstream)) is not None:
                with lock:
                    client.sendall(message)
        except OSError:
            pass
        finally:
            client.close()
            upstream.close()


@contextmanager
def auth_proxy(upstream_port: int) -> Iterator[AuthProxy]:
    proxy = AuthProxy(upstream_port)
    thread = threading.Thread(target=proxy.serve, daemon=True)
    thread.start()
    try:
        yield proxy
    finally:
        proxy.listener.close()
        thread.join(5)
