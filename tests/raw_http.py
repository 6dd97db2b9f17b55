"""A POST on a raw socket, for tests of how the server treats a body it should not read.

`requests` sends the whole body before it reads a byte of the answer; these tests need to see the
server answer (a 413, say) while the body is still being sent, and to count what it took.
"""

from __future__ import annotations

import select
import socket
import time


def post_raw(port: int, path: str, head: dict, body_chunks, timeout: float = 10.0) -> tuple[int, float, bytes]:
    """POST `path` to 127.0.0.1:`port`: the request line, `head` and then `body_chunks` one by one,
    stopping before the next chunk once the server has answered (or refuses more bytes). Then read the
    answer until it is complete (its headers and Content-Length bytes), the server closes (FIN or
    RST) or `timeout` seconds pass without a byte.

    Returns (body bytes sent, seconds from the request line until the answer was read, the answer).
    """
    sock = socket.create_connection(("127.0.0.1", port))
    head_text = "".join(f"{k}: {v}\r\n" for k, v in head.items())
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{head_text}\r\n".encode())
    started, sent, answer = time.monotonic(), 0, b""
    try:
        for chunk in body_chunks:
            if select.select([sock], [], [], 0)[0]:  # the server has answered (or closed)
                break
            try:
                sock.sendall(chunk)
            except OSError:
                break
            sent += len(chunk)
        sock.settimeout(timeout)
        while not _complete(answer):
            try:
                part = sock.recv(65536)
            except OSError:
                break
            if not part:
                break
            answer += part
        return sent, time.monotonic() - started, answer
    finally:
        sock.close()


def _complete(answer: bytes) -> bool:
    """Whether `answer` holds a whole response with a Content-Length (without one: read to the close)."""
    if b"\r\n\r\n" not in answer:
        return False
    headers, body = answer.split(b"\r\n\r\n", 1)
    for line in headers.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False
