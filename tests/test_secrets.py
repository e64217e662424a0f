"""Server secrets shared through Redis (worker/secrets.py) and the unsubscribe key
(worker/optout.py `unsubscribe_key`), against a real Redis."""

from __future__ import annotations

import base64
import subprocess
import sys

import pytest
from pydantic import SecretStr

from tests.conftest import ROOT
from worker.optout import make_token, read_token, unsubscribe_key
from worker.secrets import SECRET_BYTES, secret_key, server_secret
from worker.settings import Settings
from worker.store import connect


def test_one_secret_for_every_client_and_process(redis_server, redis_client):
    first = server_secret(redis_client, "rx", "unsubscribe")
    assert len(first) == SECRET_BYTES
    stored = redis_client.get("rx:secret:unsubscribe")
    assert base64.urlsafe_b64decode(stored + "=" * (-len(stored) % 4)) == first
    assert redis_client.ttl("rx:secret:unsubscribe") == -1  # never expires
    other = connect(redis_server.url)
    try:
        assert server_secret(other, "rx", "unsubscribe") == first
    finally:
        other.close()
    # Another process (no shared memory, no shared disk) reads the same bytes.
    code = ("import sys; from worker.store import connect; from worker.secrets import "
            "server_secret; print(server_secret(connect(sys.argv[1]), 'rx', "
            "'unsubscribe').hex())")
    out = subprocess.run([sys.executable, "-c", code, redis_server.url], cwd=ROOT,
                         capture_output=True, text=True, check=True, timeout=30)
    assert out.stdout.strip() == first.hex()
    # Names and prefixes are separate secrets.
    assert server_secret(redis_client, "rx", "contact") != first
    assert server_secret(redis_client, "ry", "unsubscribe") != first


def test_two_makers_at_once_agree(redis_client):
    """Both processes find no secret, both make one: the first SET NX wins, the second
    process discards its own and returns the winner's."""

    class Late:
        """A client whose first GET answers 'none yet' after a rival has written."""

        def __init__(self, real):
            self.real, self.calls = real, 0

        def get(self, key):
            self.calls += 1
            if self.calls == 1:
                self.rival = server_secret(self.real, "rx", "unsubscribe")
                return None
            return self.real.get(key)

        def set(self, *args, **kwargs):
            return self.real.set(*args, **kwargs)

    late = Late(redis_client)
    mine = server_secret(late, "rx", "unsubscribe")  # type: ignore[arg-type]
    assert mine == late.rival


def test_a_damaged_secret_is_refused_by_name(redis_client):
    redis_client.set("rx:secret:unsubscribe", "short")
    with pytest.raises(ValueError, match="rx:secret:unsubscribe"):
        server_secret(redis_client, "rx", "unsubscribe")
    with pytest.raises(ValueError, match="secret name"):
        secret_key("rx", "Bad Name")


CONFIGURED = "configured-secret-of-at-least-32-chars"


def test_the_configured_secret_wins(redis_client, tmp_path):
    plain = Settings(data_dir=tmp_path, _env_file=None)
    shared = unsubscribe_key(plain, redis_client, "rx")
    assert shared == server_secret(redis_client, "rx", "unsubscribe")
    assert not (tmp_path / "unsubscribe.secret").exists()  # nothing kept on local disk
    set_ = Settings(data_dir=tmp_path, unsubscribe_secret=SecretStr(CONFIGURED),
                    _env_file=None)
    assert unsubscribe_key(set_, redis_client, "rx") == CONFIGURED.encode()
    # A token made with the configured text reads with it (as before) and not with the
    # shared secret.
    token = make_token(CONFIGURED, "glow", "email", "ana@example.com")
    assert read_token(unsubscribe_key(set_, redis_client, "rx"), token) is not None
    assert read_token(shared, token) is None
