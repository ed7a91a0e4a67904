"""The body limit and keep-alive on a real uvicorn (127.0.0.1, in a thread of this process):
chunked bodies over the limit get 413 before they end, a declared length over the limit gets 413
before any byte of the body, and error responses keep the connection open."""

from __future__ import annotations

import http.client
import json
import socket

import pytest

from tests.adversarial.corpus import MAX_BODY
from tests.helpers import image_b64


def _response(sock: socket.socket) -> tuple[int, dict]:
    reader = sock.makefile("rb")
    status = int(reader.readline().split()[1])
    headers = {}
    while (line := reader.readline().strip()):
        k, _, v = line.decode().partition(":")
        headers[k.lower()] = v.strip()
    body = reader.read(int(headers["content-length"]))
    return status, json.loads(body)


@pytest.mark.parametrize("route", ["/v1/embeddings", "/v1/adapters", "/v1/classify"])
def test_chunked_body_over_the_limit_is_413_before_it_ends(live, route):
    with socket.create_connection(("127.0.0.1", live), timeout=30) as sock:
        sock.sendall(f"POST {route} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
        chunk = b" " * 65536
        for _ in range(MAX_BODY // len(chunk) + 1):  # one chunk past the limit, and no final chunk
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        status, body = _response(sock)
    assert status == 413 and body["error"]["type"] == "payload_too_large"


def test_declared_length_over_the_limit_is_413_before_the_body(live):
    with socket.create_connection(("127.0.0.1", live), timeout=30) as sock:
        sock.sendall(f"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {10**12}\r\n\r\n".encode())
        status, body = _response(sock)
    assert status == 413 and body["error"]["type"] == "payload_too_large"


def test_error_responses_keep_the_connection_alive(live):
    conn = http.client.HTTPConnection("127.0.0.1", live, timeout=30)
    bad = [
        ("POST", "/v1/embeddings", b'{"input": ["%%%"]}', 400),
        ("POST", "/v1/embeddings", b'{"model": "nope", "input": ["x"]}', 404),
        ("POST", "/v1/embeddings", b"{oops", 422),
        ("POST", "/v1/embeddings", b"\xff\xfe", 400),
        ("POST", "/v1/adapters", b'{"name": "x", "path": "a1\\u0000"}', 422),
        ("POST", "/v1/adapters", b"[" * 5000, 413),
        ("GET", "/v1/adapters/nope", None, 404),
        ("GET", "/nowhere", None, 404),
    ]
    conn.connect()
    sock = conn.sock
    for method, url, body, status in bad:
        conn.request(method, url, body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == status and json.loads(resp.read())["error"]["type"]
        assert not resp.will_close and resp.getheader("connection", "").lower() != "close", (url, body)
    conn.request("POST", "/v1/embeddings", body=json.dumps({"model": "a1", "input": [image_b64(0)]}), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and len(json.loads(resp.read())["data"]) == 1
    assert conn.sock is sock  # the same connection throughout
    conn.close()
