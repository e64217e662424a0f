"""requests' protocol checks (`isinstance(x, SupportsItems)`, `SupportsRead`), answered by
worker/delivery.py's `quick_protocol` classes: the same verdict as typing's own check for
every kind of object requests is handed, and real requests still go out as before (a real
HTTP server on 127.0.0.1)."""

from __future__ import annotations

import io
import sys
import threading
from collections import OrderedDict
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import requests
import requests.models
import requests.utils
from requests import _types
from requests.cookies import RequestsCookieJar
from requests.structures import CaseInsensitiveDict

from worker import delivery
from worker.delivery import quick_protocol

PROTOCOLS = [_types.SupportsItems, _types.SupportsRead]


class ItemsNone:
    items = None


class ItemsNoneButSet:
    items = None

    def __init__(self) -> None:
        self.items = lambda: []  # set on the instance: typing reads the instance


class MethodButNoneOnInstance:
    def items(self) -> list[tuple[str, str]]:
        return []

    def __init__(self) -> None:
        self.items = None  # type: ignore[method-assign]


class Dynamic:
    def __getattr__(self, name: str) -> Any:
        if name in ("items", "read"):
            return lambda *_: b""
        raise AttributeError(name)


class Proxy:
    """Claims another class (as mocks and proxies do)."""

    @property  # type: ignore[misc]
    def __class__(self) -> type:
        return dict


class Explicit(_types.SupportsItems[str, str], _types.SupportsRead[bytes]):
    pass


class Later:
    pass


def _objects(tmp_path: Any) -> list[Any]:
    handle = open(tmp_path / "f.bin", "wb+")  # noqa: SIM115  # closed by the test
    return [
        {}, {"a": "1"}, OrderedDict(a=1), CaseInsensitiveDict({"A": "1"}), RequestsCookieJar(),
        [("a", "1")], (("a", "1"),), "text", b"bytes", bytearray(b"x"), None, 1, 2.5, True,
        object(), io.BytesIO(b"x"), io.StringIO("x"), handle, (x for x in ()), ItemsNone(),
        ItemsNoneButSet(), MethodButNoneOnInstance(), Dynamic(), Proxy(), Explicit(), dict,
        io.BytesIO, Later(),
    ]


@pytest.mark.skipif(sys.version_info[:2] != (3, 11), reason="the replacement is 3.11's only")
def test_requests_asks_the_quick_classes() -> None:
    assert requests.utils._SupportsItems.__name__ == "QuickSupportsItems"  # type: ignore[attr-defined]
    assert requests.models._SupportsRead.__name__ == "QuickSupportsRead"  # type: ignore[attr-defined]
    assert delivery._REQUESTS_PROTOCOLS


@pytest.mark.parametrize("proto", PROTOCOLS, ids=lambda p: p.__name__)
def test_same_verdict_as_typing(proto: Any, tmp_path: Any) -> None:
    quick = quick_protocol(proto)
    if sys.version_info[:2] != (3, 11):
        assert quick is None
        return
    assert quick is not None
    objects = _objects(tmp_path)
    try:
        for obj in objects:
            # Twice: the first answer may be cached (ABCMeta's caches) and must stay right.
            for _ in range(2):
                assert isinstance(obj, quick) == isinstance(obj, proto), repr(obj)
        # Both verdicts appear (the zoo is not all one kind).
        assert {isinstance(obj, quick) for obj in objects} == {True, False}
        # A class given the member after a first check: both change their answer.
        late = Later()
        assert isinstance(late, quick) == isinstance(late, proto) is False
        member = "items" if proto is _types.SupportsItems else "read"
        setattr(Later, member, lambda self, *_: None)
        try:
            assert isinstance(late, quick) == isinstance(late, proto) is True
        finally:
            delattr(Later, member)
        assert isinstance(late, quick) == isinstance(late, proto) is False
        for kind in (dict, list, Explicit, io.BytesIO):
            assert issubclass(kind, quick) == issubclass(kind, proto)
    finally:
        objects[17].close()


def test_not_a_protocol_is_left_alone() -> None:
    assert quick_protocol(dict) is None
    assert quick_protocol(None) is None
    assert quick_protocol(OrderedDict) is None


def test_requests_behaves_as_before() -> None:
    with pytest.raises(ValueError, match="not 2-tuples"):
        requests.utils.to_key_val_list("text")
    assert requests.utils.to_key_val_list({"a": "1"}) == [("a", "1")]
    assert requests.utils.to_key_val_list([("a", "1")]) == [("a", "1")]
    assert requests.utils.from_key_val_list({"a": "1"}) == OrderedDict(a="1")


class _Recorder(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, str], bytes]] = []

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802
                if self.headers.get("Transfer-Encoding") == "chunked":
                    body = b""
                    while (size := int(self.rfile.readline().strip(), 16)):
                        body += self.rfile.read(size)
                        self.rfile.readline()
                    self.rfile.readline()
                else:
                    body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                server.seen.append((self.path, dict(self.headers), body))
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *_: object) -> None:
                pass

        server = self
        super().__init__(("127.0.0.1", 0), Handler)


@pytest.fixture
def recorder() -> Iterator[_Recorder]:
    server = _Recorder()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_real_requests_through_the_quick_checks(recorder: _Recorder) -> None:
    url = f"http://127.0.0.1:{recorder.server_address[1]}/sms"
    with requests.Session() as session:
        session.headers.update({"X-Session": "s"})
        answers = [
            session.post(url, params=[("to", "+34600111222"), ("a", "1")],
                         headers=CaseInsensitiveDict({"X-One": "1"}), data={"k": "v"},
                         cookies={"c": "1"}, timeout=5),
            session.post(url, params={"b": "2"}, headers={"X-Two": "2"},
                         data=io.BytesIO(b"streamed body"), timeout=5),
            requests.post(url, json={"message": "hi"}, timeout=5),
        ]
    assert [a.status_code for a in answers] == [200, 200, 200]
    (p1, h1, b1), (p2, h2, b2), (p3, h3, b3) = recorder.seen
    assert p1 == "/sms?to=%2B34600111222&a=1" and b1 == b"k=v"
    assert h1["X-One"] == "1" and h1["X-Session"] == "s" and h1["Cookie"] == "c=1"
    assert p2 == "/sms?b=2" and b2 == b"streamed body" and h2["X-Two"] == "2"
    assert p3 == "/sms" and b3 == b'{"message": "hi"}'
