"""registryd against a nats-server that demands authentication: user and
password, token, NKey (seed file and seed string), a credentials file (user JWT
and seed, the server in decentralized JWT mode) and TLS with client
certificates. Each test starts its own nats-server (JetStream, loopback, a free
port) configured that way, a registryd subprocess with the matching
REGISTRY_NATS_* settings, and a client that authenticates the same way.

The daemon runs at debug level, and no secret may show in its output nor in
its `$SRV.INFO` reply. There is no `nsc` here, so the operator, account and
user JWTs of the credentials-file tests are built and signed by the tests.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import secrets
import signal
import ssl
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nacl.signing
import nats
import nkeys
import pytest
from nats.aio.client import Client as NATS

from daemon import embedded
from tests.support import Client, Registryd, eventually, serving

# A slow test: real processes, faults or load (pytest -m "not slow" skips it).
pytestmark = pytest.mark.slow

# ---------------------------------------------------------------- helpers


async def serves(
    daemon: Registryd, prefix: str, url: str, secret_texts: list[str], **auth: Any
) -> None:
    """The daemon serves `list` and `register` to a client authenticating with
    `auth`, and none of `secret_texts` shows in its output or $SRV.INFO reply."""
    nc: NATS = await nats.connect(url, max_reconnect_attempts=-1, reconnect_time_wait=0.2, **auth)
    try:
        client = Client(nc, prefix)
        assert await serving(client, daemon) == []
        node = await client.register("gpu-1")
        assert node["name"] == "gpu-1"
        assert [n["id"] for n in await client.call("list")] == [node["id"]]

        info = await nc.request("$SRV.INFO.registry", b"", timeout=10)
        assert prefix.encode() in info.data
        daemon.assert_running()
        for secret in secret_texts:
            assert secret.encode() not in info.data, info.data
    finally:
        await nc.close()
    # It drains and stops cleanly over the authenticated connection too.
    daemon.send(signal.SIGTERM)
    assert await daemon.exit_code() == 0, daemon.output()
    output = daemon.output()
    assert "serving" in output and "stopped" in output, output
    for secret in secret_texts:
        assert secret not in output, f"secret in the daemon's output:\n{output}"


async def refused_and_retrying(daemon: Registryd, secret: str) -> None:
    """The server refuses the daemon, which keeps trying and never prints `secret`."""

    async def refused_twice() -> bool | None:
        daemon.assert_running()
        lines = [line for line in daemon.output().splitlines() if "authorization" in line.lower()]
        return True if len(lines) >= 2 else None

    # Two attempts refused and the daemon is still there: it keeps retrying.
    await eventually(refused_twice, "the daemon to be refused twice")
    daemon.assert_running()
    assert "serving" not in daemon.output(), daemon.output()
    # A signal while it is still connecting stops it at once and cleanly.
    daemon.send(signal.SIGTERM)
    assert await daemon.exit_code() == 0, daemon.output()
    assert secret not in daemon.output(), daemon.output()


def debug_env(daemon_env: dict[str, str], url: str, **settings: str) -> dict[str, str]:
    env = daemon_env | {"REGISTRY_NATS_URL": url, "REGISTRY_LOG_LEVEL": "debug"}
    env.update({f"REGISTRY_NATS_{k.upper()}": v for k, v in settings.items()})
    return env


Spawn = Callable[..., Awaitable[Registryd]]
NatsWith = Callable[[str], embedded.NatsServer]


# ---------------------------------------------------------------- user and password


async def test_user_and_password(
    nats_with: NatsWith, daemon_env: dict[str, str], spawn: Spawn
) -> None:
    password = "pw-" + secrets.token_hex(12)
    server = nats_with(
        f'authorization {{ users = [ {{ user: "alice", password: "{password}" }} ] }}'
    )
    env = debug_env(daemon_env, server.url, user="alice", password=password)
    daemon = await spawn(env=env)
    await serves(
        daemon,
        env["REGISTRY_SUBJECT_PREFIX"],
        server.url,
        [password],
        user="alice",
        password=password,
    )


async def test_wrong_password_retries_without_logging_it(
    nats_with: NatsWith, daemon_env: dict[str, str], spawn: Spawn
) -> None:
    server = nats_with('authorization { users = [ { user: "alice", password: "right-one" } ] }')
    wrong = "wrong-" + secrets.token_hex(12)
    daemon = await spawn(env=debug_env(daemon_env, server.url, user="alice", password=wrong))
    await refused_and_retrying(daemon, wrong)


# ---------------------------------------------------------------- token


async def test_token(nats_with: NatsWith, daemon_env: dict[str, str], spawn: Spawn) -> None:
    token = "tok-" + secrets.token_hex(16)
    server = nats_with(f'authorization {{ token: "{token}" }}')
    env = debug_env(daemon_env, server.url, token=token)
    daemon = await spawn(env=env)
    await serves(daemon, env["REGISTRY_SUBJECT_PREFIX"], server.url, [token], token=token)


# ---------------------------------------------------------------- NKey


def new_nkey(prefix: int) -> tuple[str, str]:
    """A new NKey of the kind `prefix` (nkeys.PREFIX_BYTE_*): (seed, public key)."""
    raw = nacl.signing.SigningKey.generate().encode()
    seed = nkeys.encode_seed(raw, prefix)
    public = nkeys.from_seed(bytearray(seed)).public_key
    return seed.decode(), public.decode()


def user_nkey() -> tuple[str, str]:
    """A new user NKey: (seed, public key)."""
    return new_nkey(nkeys.PREFIX_BYTE_USER)


@pytest.mark.parametrize("given_as", ["file", "string"])
async def test_nkey(
    given_as: str,
    nats_with: NatsWith,
    daemon_env: dict[str, str],
    spawn: Spawn,
    tmp_path: Path,
) -> None:
    seed, public = user_nkey()
    assert seed.startswith("SU") and public.startswith("U")
    server = nats_with(f'authorization {{ users = [ {{ nkey: "{public}" }} ] }}')
    seed_file = tmp_path / "user.nk"
    seed_file.write_text(seed + "\n")
    seed_file.chmod(0o600)
    nkey = str(seed_file) if given_as == "file" else seed
    env = debug_env(daemon_env, server.url, nkey=nkey)
    daemon = await spawn(env=env)
    await serves(daemon, env["REGISTRY_SUBJECT_PREFIX"], server.url, [seed], nkeys_seed_str=seed)


# ---------------------------------------------------------------- credentials file (JWT)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwt(subject: str, name: str, nats_claims: dict[str, Any], signer_seed: str) -> str:
    """A NATS v2 JWT about `subject`, signed with the NKey `signer_seed`."""
    signer = nkeys.from_seed(bytearray(signer_seed.encode()))
    standard = {
        "iat": int(time.time()),
        "iss": signer.public_key.decode(),
        "name": name,
        "sub": subject,
    }
    # As nats-io/jwt does: jti is SHA-512/256 of the standard claims without
    # jti, compact JSON in the Go struct's field order, base32 without padding.
    digest = hashlib.new("sha512_256", json.dumps(standard, separators=(",", ":")).encode())
    jti = base64.b32encode(digest.digest()).rstrip(b"=").decode()
    claims = {"jti": jti, **standard, "nats": nats_claims}
    header = {"typ": "JWT", "alg": "ed25519-nkey"}
    signing_input = ".".join(
        b64url(json.dumps(part, separators=(",", ":")).encode()) for part in (header, claims)
    )
    return signing_input + "." + b64url(signer.sign(signing_input.encode()))


def account_jwt(account: str, name: str, operator_seed: str, *, jetstream: bool) -> str:
    limits: dict[str, Any] = {
        "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
        "wildcards": True, "conn": -1, "leaf": -1,
    }  # fmt: skip
    if jetstream:
        # Non-zero storage limits are what enable JetStream for the account;
        # the server refuses to start if the system account has them.
        limits |= {"mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}
    nats_claims = {
        "limits": limits,
        "default_permissions": {"pub": {}, "sub": {}},
        "type": "account",
        "version": 2,
    }
    return jwt(account, name, nats_claims, operator_seed)


def user_jwt(user: str, account_seed: str) -> str:
    nats_claims = {
        "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1,
        "type": "user", "version": 2,
    }  # fmt: skip
    return jwt(user, "registryd", nats_claims, account_seed)


def creds_text(token: str, user_seed: str) -> str:
    return (
        "-----BEGIN NATS USER JWT-----\n"
        f"{token}\n"
        "------END NATS USER JWT------\n"
        "\n"
        "************************* IMPORTANT *************************\n"
        "NKEY Seed printed below can be used to sign and prove identity.\n"
        "\n"
        "-----BEGIN USER NKEY SEED-----\n"
        f"{user_seed}\n"
        "------END USER NKEY SEED------\n"
    )


@dataclass
class Trust:
    """An operator, a system account and an application account, and the
    nats-server config that trusts them."""

    config: str
    account_seed: str


def operator_trust(tmp_path: Path) -> Trust:
    operator_seed, operator = new_nkey(nkeys.PREFIX_BYTE_OPERATOR)
    _, sys_account = new_nkey(nkeys.PREFIX_BYTE_ACCOUNT)
    account_seed, account = new_nkey(nkeys.PREFIX_BYTE_ACCOUNT)
    operator_file = tmp_path / "operator.jwt"
    operator_file.write_text(
        jwt(operator, "test-operator", {"type": "operator", "version": 2}, operator_seed)
    )
    config = (
        f'operator: "{operator_file}"\n'
        f"system_account: {sys_account}\n"
        "resolver: MEMORY\n"
        "resolver_preload: {\n"
        f'  {sys_account}: "{account_jwt(sys_account, "SYS", operator_seed, jetstream=False)}"\n'
        f'  {account}: "{account_jwt(account, "REGISTRY", operator_seed, jetstream=True)}"\n'
        "}\n"
    )
    return Trust(config, account_seed)


def write_creds(path: Path, account_seed: str) -> tuple[str, str]:
    """A creds file for a new user of the account `account_seed`: (user seed, user JWT)."""
    user_seed, user = user_nkey()
    token = user_jwt(user, account_seed)
    path.write_text(creds_text(token, user_seed))
    path.chmod(0o600)
    return user_seed, token


async def server_info(url: str) -> dict[str, Any]:
    """The INFO a nats-server greets a new connection with."""
    host, port = url.removeprefix("nats://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        line = await asyncio.wait_for(reader.readline(), 10)
    finally:
        writer.close()
        await writer.wait_closed()
    assert line.startswith(b"INFO "), line
    return json.loads(line.removeprefix(b"INFO "))


async def test_credentials_file(
    nats_with: NatsWith, daemon_env: dict[str, str], spawn: Spawn, tmp_path: Path
) -> None:
    trust = operator_trust(tmp_path)
    server = nats_with(trust.config)
    # JWT mode: the server demands auth and hands out a nonce to sign. (Read from
    # a raw socket: a refused nats.connect leaks its transport, a ResourceWarning.)
    info = await server_info(server.url)
    assert info.get("auth_required") and info.get("nonce"), info

    creds = tmp_path / "registryd.creds"
    user_seed, token = write_creds(creds, trust.account_seed)
    env = debug_env(daemon_env, server.url, creds=str(creds))
    daemon = await spawn(env=env)
    signature = token.rsplit(".", 1)[1]
    await serves(
        daemon,
        env["REGISTRY_SUBJECT_PREFIX"],
        server.url,
        [user_seed, signature],
        user_credentials=str(creds),
    )


async def test_credentials_of_unknown_account_retries_without_logging_seed(
    nats_with: NatsWith, daemon_env: dict[str, str], spawn: Spawn, tmp_path: Path
) -> None:
    server = nats_with(operator_trust(tmp_path).config)
    stranger_seed, _ = new_nkey(nkeys.PREFIX_BYTE_ACCOUNT)
    creds = tmp_path / "stranger.creds"
    user_seed, _ = write_creds(creds, stranger_seed)
    daemon = await spawn(env=debug_env(daemon_env, server.url, creds=str(creds)))
    # The server knows no such account.
    await refused_and_retrying(daemon, user_seed)


# ---------------------------------------------------------------- TLS


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    assert done.returncode == 0, f"openssl {' '.join(args)}:\n{done.stderr}"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A private CA, a server certificate for 127.0.0.1 and a client certificate."""
    d = tmp_path_factory.mktemp("pki")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl(
        "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=registryd test CA", cwd=d,
    )  # fmt: skip
    for name, ext in [
        ("server", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth"),
        ("client", "extendedKeyUsage=clientAuth"),
    ]:
        (d / f"{name}.ext").write_text(ext + "\n")
        openssl(
            "req", "-new", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN=registryd test {name}", cwd=d,
        )  # fmt: skip
        openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem",
            cwd=d,
        )  # fmt: skip
    return Pki(d / "ca.pem", d / "server.pem", d / "server.key", d / "client.pem", d / "client.key")


def tls_config(pki: Pki) -> str:
    return (
        "tls {\n"
        f'  cert_file: "{pki.server_cert}"\n'
        f'  key_file: "{pki.server_key}"\n'
        f'  ca_file: "{pki.ca}"\n'
        "  verify: true\n"
        "  timeout: 5\n"
        "}\n"
    )


def key_material(key: Path) -> str:
    """The base64 body of a PEM private key."""
    return "".join(line for line in key.read_text().splitlines() if not line.startswith("-----"))


async def test_tls_with_client_certificate(
    pki: Pki, nats_with: NatsWith, daemon_env: dict[str, str], spawn: Spawn
) -> None:
    server = nats_with(tls_config(pki))
    url = server.url.replace("nats://", "tls://")

    # The server wants a client certificate: a client without one is turned away.
    bare = ssl.create_default_context(cafile=str(pki.ca))
    with pytest.raises(Exception):  # noqa: B017 - TLS alert or connection reset
        await nats.connect(url, tls=bare, allow_reconnect=False, connect_timeout=5)

    env = debug_env(
        daemon_env,
        url,
        tls_ca=str(pki.ca),
        tls_cert=str(pki.client_cert),
        tls_key=str(pki.client_key),
    )
    daemon = await spawn(env=env)
    context = ssl.create_default_context(cafile=str(pki.ca))
    context.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    secrets_ = [key_material(pki.client_key)[:40], key_material(pki.client_key)[-40:]]
    await serves(daemon, env["REGISTRY_SUBJECT_PREFIX"], url, secrets_, tls=context)
