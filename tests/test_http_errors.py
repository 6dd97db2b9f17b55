"""A client's malformed bytes get a 4xx JSON answer, never a 5xx or gunicorn's HTML page.

Real gunicorn server with the fake backend (tests/serving_fakes.py), raw sockets on 127.0.0.1:
- broken chunked bodies (chunk size `zz`, a chunk without its CRLF, a body cut off by the client) on
  the run route, on /v1/chat/completions and on the finetune-assets upload: 400 / 5006
  `malformed request body` with `Connection: close` (serving/http.py `read_body`, the app's handlers);
- what gunicorn's parser refuses before the app sees it (request line, HTTP version, URI length,
  header size and count, header syntax, Content-Length, Transfer-Encoding, Expect): the worker's
  `handle_error` answers 400 / 5006, 414 / 3006, 431 / 3006 or 417 / 5006 in the Workers AI envelope
  (OpenAI's shape on /v1/ paths), then closes.
After each, an ordinary request is served, and the server never logs a traceback.
"""

from __future__ import annotations

import json
import socket

import pytest
import requests
from gunicorn.config import Config

from server_group import ServerGroup
from serving_fakes import MODEL

RUN = f"/client/v4/accounts/acc/ai/run/{MODEL}"
CHAT = "/v1/chat/completions"
LIMITS = Config()  # the server runs with gunicorn's defaults
LINE, FIELD, FIELDS = LIMITS.limit_request_line, LIMITS.limit_request_field_size, LIMITS.limit_request_fields


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with ServerGroup(tmp_path_factory.mktemp("http-errors-data")) as group:
        r = requests.post(group.url + "/client/v4/accounts/acc/ai/finetunes",
                          json={"model": MODEL, "name": "errors"}, timeout=10)
        group.upload = f"/client/v4/accounts/acc/ai/finetunes/{r.json()['result']['id']}/finetune-assets"
        yield group


def exchange(port: int, data: bytes, half_close: bool = False, timeout: float = 10.0) -> bytes:
    """Send `data` (then, with `half_close`, end the sending side); read until the server closes."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        sock.settimeout(timeout)
        answer = b""
        while part := sock.recv(65536):  # a timeout fails the test: the server must close
            answer += part
        return answer


def refusal(answer: bytes, status: int, code: int, openai: bool = False) -> str:
    """Check `answer` is one JSON error answer of `status` / `code` that closes; its message."""
    assert answer, "closed without an answer"
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].split(" ")[1] == str(status), answer[:300]
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    assert headers["content-type"] == "application/json", answer[:300]
    assert headers["connection"] == "close", answer[:300]
    assert int(headers["content-length"]) == len(body), answer[:300]  # one answer, nothing after it
    parsed = json.loads(body)
    if openai:
        error = parsed["error"]
        assert error["code"] == str(code) and error["type"] == "invalid_request_error", parsed
        message = error["message"]
    else:
        assert parsed["success"] is False and parsed["result"] == {} and parsed["messages"] == [], parsed
        assert [e["code"] for e in parsed["errors"]] == [code], parsed
        message = parsed["errors"][0]["message"]
    assert message.startswith("AiError: "), message
    return message


def still_serves(server) -> None:
    r = requests.post(server.url + RUN, json={"prompt": "fast", "raw": True}, timeout=30)
    assert r.status_code == 200 and r.json()["result"]["response"] == "tsaf", r.text
    assert server.count("Traceback") == 0, "".join(server.lines)
    assert server.count("Error handling request") == 0, "".join(server.lines)


def chunked_head(path: str, content_type: str) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
            "Transfer-Encoding: chunked\r\n\r\n").encode()


ROUTES = {"run": (RUN, "application/json"), "chat": (CHAT, "application/json"),
          "upload": (None, "multipart/form-data; boundary=b")}
BODIES = {  # (chunked body, half-close after it, words the message holds)
    "chunk-size-zz": (b"zz\r\nabc\r\n0\r\n\r\n", False, "Invalid chunk size: b'zz'"),
    "no-chunk-terminator": (b"3\r\nabcXX0\r\n\r\n", False, "Invalid chunk terminator"),
    "truncated": (b'10\r\n{"prompt"', True, "the body ended before its end"),
    "no-last-chunk": (b"2\r\n{}\r\n", True, "the body ended before its end"),
}


@pytest.mark.parametrize("body", list(BODIES))
@pytest.mark.parametrize("route", list(ROUTES))
def test_malformed_chunked_body_is_400(server, route, body):
    path, content_type = ROUTES[route]
    data, half_close, words = BODIES[body]
    answer = exchange(server.port, chunked_head(path or server.upload, content_type) + data, half_close)
    message = refusal(answer, 400, 5006, openai=route == "chat")
    assert message.startswith("AiError: Bad input: Error: malformed request body: ") and words in message, message
    still_serves(server)


def test_broken_body_after_the_answer_closes_without_a_second_answer(server):
    """A route that answers without reading the body (404): the drain meets the broken chunk, and the
    connection just closes after the one answer."""
    answer = exchange(server.port, chunked_head("/nope", "application/json") + b"zz\r\nabc\r\n0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 404 "), answer[:200]
    assert answer.count(b"HTTP/1.1 ") == 1, answer
    head, _, body = answer.partition(b"\r\n\r\n")
    assert json.loads(body)["errors"][0]["code"] == 7000
    still_serves(server)


def _head(line: bytes, *headers: bytes) -> bytes:
    return line + b"\r\nHost: x\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n"


REQUESTS = {  # name: (bytes, status, code, message words, OpenAI's shape)
    "garbage-request-line": (b"\x01\x02 garbage\r\n\r\n", 400, 5006, "Invalid HTTP request line", False),
    "no-target": (_head(b"GET"), 400, 5006, "Invalid HTTP request line", False),
    "lowercase-method": (_head(b"get /health HTTP/1.1"), 400, 5006, "Invalid HTTP method", False),
    "http-9.9": (_head(b"GET /health HTTP/9.9"), 400, 5006, "Invalid HTTP Version", False),
    "http-2.0": (_head(b"GET /health HTTP/2.0"), 400, 5006, "Invalid HTTP Version", False),
    "http-version-on-v1": (_head(b"GET /v1/models HTTP/9.9"), 400, 5006, "Invalid HTTP Version", True),
    "uri-too-long": (_head(b"GET /" + b"a" * LINE + b" HTTP/1.1"), 414, 3006, "request line is too long", False),
    "uri-too-long-on-v1": (_head(b"GET /v1/" + b"a" * LINE + b" HTTP/1.1"), 414, 3006, "request line is too long",
                           True),
    "header-line-too-long": (_head(b"GET /health HTTP/1.1", b"X-A: " + b"a" * FIELD), 431, 3006,
                             "header fields are too large", False),
    "too-many-headers": (_head(b"GET /health HTTP/1.1", *(b"X-%d: a" % i for i in range(FIELDS + 1))), 431, 3006,
                         "header fields are too large", False),
    "invalid-header-name": (_head(b"GET /health HTTP/1.1", b"X A: b"), 400, 5006, "Invalid HTTP header name", False),
    "nul-in-header": (_head(b"GET /health HTTP/1.1", b"X-A: a\x00b"), 400, 5006, "Invalid HTTP Header", False),
    "obsolete-folding": (_head(b"GET /health HTTP/1.1", b"X-A: a", b" b"), 400, 5006, "Obsolete line folding",
                         False),
    "content-length-negative": (_head(b"POST " + RUN.encode() + b" HTTP/1.1", b"Content-Length: -1"), 400, 5006,
                                "CONTENT-LENGTH", False),
    "content-length-abc": (_head(b"POST " + RUN.encode() + b" HTTP/1.1", b"Content-Length: abc"), 400, 5006,
                           "CONTENT-LENGTH", False),
    "content-length-twice": (_head(b"POST " + RUN.encode() + b" HTTP/1.1", b"Content-Length: 2",
                                   b"Content-Length: 3") + b"{}", 400, 5006, "CONTENT-LENGTH", False),
    "content-length-on-v1": (_head(b"POST /v1/chat/completions HTTP/1.1", b"Content-Length: abc"), 400, 5006,
                             "CONTENT-LENGTH", True),
    "content-length-and-chunked": (_head(b"POST " + RUN.encode() + b" HTTP/1.1", b"Content-Length: 5",
                                         b"Transfer-Encoding: chunked") + b"0\r\n\r\n", 400, 5006,
                                   "CONTENT-LENGTH", False),
    "chunked-not-last": (_head(b"POST " + RUN.encode() + b" HTTP/1.1", b"Transfer-Encoding: chunked, gzip")
                         + b"0\r\n\r\n", 400, 5006, "TRANSFER-ENCODING", False),
    "transfer-encoding-identity": (_head(b"POST " + RUN.encode() + b" HTTP/1.1", b"Transfer-Encoding: identity"),
                                   400, 5006, "TRANSFER-ENCODING", False),
    "transfer-encoding-unknown": (_head(b"POST " + RUN.encode() + b" HTTP/1.1", b"Transfer-Encoding: foo"), 400,
                                  5006, "Unsupported transfer coding", False),  # gunicorn alone: 501
    "expect-unknown": (_head(b"POST " + RUN.encode() + b" HTTP/1.1", b"Expect: foo", b"Content-Length: 2") + b"{}",
                       417, 5006, "Unable to comply with expectation", False),
}


@pytest.mark.parametrize("name", list(REQUESTS))
def test_what_gunicorn_refuses_is_a_json_envelope(server, name):
    data, status, code, words, openai = REQUESTS[name]
    message = refusal(exchange(server.port, data), status, code, openai=openai)
    assert words in message, message
    still_serves(server)


def test_gzip_then_chunked_is_read_as_chunked(server):
    """`Transfer-Encoding: gzip, chunked` is accepted by gunicorn (chunked last) and the app sees the
    chunked body undecoded: here an empty one, so 400 / 5006 for the JSON, not a 5xx."""
    data = _head(b"POST " + RUN.encode() + b" HTTP/1.1", b"Transfer-Encoding: gzip, chunked") + b"0\r\n\r\n"
    message = refusal(exchange(server.port, data), 400, 5006)
    assert "invalid JSON body" in message, message
    still_serves(server)


def test_a_head_that_never_ends_is_closed_without_bytes(server):
    """Bare LF line ends: the head never completes (`\\r\\n\\r\\n`); when the client ends its side the
    connection is closed with no answer."""
    assert exchange(server.port, b"GET /health HTTP/1.1\nHost: x\n\n", half_close=True) == b""
    still_serves(server)
