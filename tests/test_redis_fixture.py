from __future__ import annotations

from tests.helpers import RedisServer


def test_redis_server_fixture_answers_set_and_get(redis_server: RedisServer) -> None:
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"
    client = redis_server.client()
    try:
        assert client.set("ltx-sidecar:probe", b"hello")
        assert client.get("ltx-sidecar:probe") == b"hello"
    finally:
        client.close()
