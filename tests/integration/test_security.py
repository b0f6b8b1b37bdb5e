"""TLS, mutual TLS and bearer-token auth of a real server, with certificates made in the test."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import grpc
import pytest
from conftest import start_server, stop_server
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from servers import QUESTION, tiny_args

from ragmix.config import load_config
from ragmix.errors import ValidationError
from ragmix.service.security import load_tokens, token_accepted
from ragmix_client.proto import ragmix_pb2 as pb
from ragmix_client.proto import ragmix_pb2_grpc as pb_grpc

TOKENS = ("alpha-7f3c9e", "beta-19d2b4")


# ------------------------------------------------------------------------ certificates


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, key, issuer: str, issuer_key, *, ca: bool, server: bool = False):
    now = datetime.datetime.now(datetime.UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if server:
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        b = b.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


class Authority:
    """A self-signed CA that issues server and client certificates as PEM bytes."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.pem = _cert(name, self.key, name, self.key, ca=True).public_bytes(
            serialization.Encoding.PEM
        )

    def issue(self, subject: str, *, server: bool) -> tuple[bytes, bytes]:
        """(certificate PEM, private key PEM)."""
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert(subject, key, self.name, self.key, ca=False, server=server)
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return cert.public_bytes(serialization.Encoding.PEM), key_pem


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    """CA, server cert/key, a client cert/key from the CA, and an unrelated CA, as files."""
    folder = tmp_path_factory.mktemp("pki")
    ca, other = Authority("ragmix test CA"), Authority("someone else's CA")
    files = {"ca": ca.pem, "other_ca": other.pem}
    files["server_cert"], files["server_key"] = ca.issue("localhost", server=True)
    files["client_cert"], files["client_key"] = ca.issue("client-1", server=False)
    files["stranger_cert"], files["stranger_key"] = other.issue("stranger", server=False)
    files["tokens"] = f"# rotated monthly\n{TOKENS[0]}\n\n{TOKENS[1]}\n".encode()
    paths = {}
    for name, data in files.items():
        paths[name] = folder / f"{name}.pem"
        paths[name].write_bytes(data)
    return paths


def _serve(dirs, pki, tmp_path_factory, *extra: str):
    log = tmp_path_factory.mktemp("secure") / "server.log"
    tls = ("--tls-cert", str(pki["server_cert"]), "--tls-key", str(pki["server_key"]))
    return start_server(tiny_args(*dirs, "--max-new-tokens", "48", *tls, *extra), log)


@pytest.fixture(scope="module")
def dirs(tiny_generator_dir, tiny_encoder_dir, tiny_index_dir):
    return tiny_generator_dir, tiny_encoder_dir, tiny_index_dir


@pytest.fixture(scope="module")
def tls_server(dirs, pki, tmp_path_factory):
    """TLS without client certificates, and bearer tokens."""
    server = _serve(dirs, pki, tmp_path_factory, "--auth-token-file", str(pki["tokens"]))
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def mtls_server(dirs, pki, tmp_path_factory):
    server = _serve(dirs, pki, tmp_path_factory, "--tls-client-ca", str(pki["ca"]))
    yield server
    stop_server(server)


def _channel(target: str, root: Path, cert: Path | None = None, key: Path | None = None):
    creds = grpc.ssl_channel_credentials(
        root.read_bytes(),
        key.read_bytes() if key else None,
        cert.read_bytes() if cert else None,
    )
    return grpc.secure_channel(target, creds)


def _bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def _code(fn) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        fn()
    return err.value.code()


# ------------------------------------------------------------------------ TLS + tokens


def test_tls_with_the_right_root_and_token_serves(tls_server, pki):
    with _channel(tls_server.target, pki["ca"]) as ch:
        stub = pb_grpc.RagServiceStub(ch)
        for token in TOKENS:  # every token in the file is accepted
            info = stub.GetInfo(pb.GetInfoRequest(), metadata=_bearer(token), timeout=30)
            assert info.generator.startswith("tiny-llama")
        request = pb.GenerateRequest(
            query=QUESTION, top_k=2, decoding=pb.DecodingParams(max_new_tokens=4)
        )
        events = list(stub.Generate(request, metadata=_bearer(TOKENS[1]), timeout=60))
        assert events[-1].WhichOneof("event") == "done"


def test_tls_refuses_plaintext_and_an_unknown_ca(tls_server, pki):
    meta = _bearer(TOKENS[0])
    with grpc.insecure_channel(tls_server.target) as ch:
        stub = pb_grpc.RagServiceStub(ch)
        assert _code(lambda: stub.GetInfo(pb.GetInfoRequest(), metadata=meta, timeout=10)) == (
            grpc.StatusCode.UNAVAILABLE
        )
    with _channel(tls_server.target, pki["other_ca"]) as ch:
        stub = pb_grpc.RagServiceStub(ch)
        assert _code(lambda: stub.GetInfo(pb.GetInfoRequest(), metadata=meta, timeout=10)) == (
            grpc.StatusCode.UNAVAILABLE
        )


@pytest.mark.parametrize(
    ("metadata", "says"),
    [
        ((), "needs a bearer token"),
        (_bearer("alpha-7f3c9"), "not accepted"),  # a prefix of a real token
        (_bearer(TOKENS[0] + "x"), "not accepted"),
        ((("authorization", f"Basic {TOKENS[0]}"),), "Bearer <token>"),
        ((("authorization", "Bearer "),), "Bearer <token>"),
    ],
)
def test_auth_refuses_missing_and_wrong_tokens(tls_server, pki, metadata, says):
    with _channel(tls_server.target, pki["ca"]) as ch:
        stub = pb_grpc.RagServiceStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            stub.GetInfo(pb.GetInfoRequest(), metadata=metadata, timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert says in err.value.details()
        with pytest.raises(grpc.RpcError) as err:  # streams too, before any work is done
            list(stub.Generate(pb.GenerateRequest(query=QUESTION), metadata=metadata, timeout=10))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_health_and_reflection_stay_open_without_a_token(tls_server, pki):
    with _channel(tls_server.target, pki["ca"]) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(ch)
        replies = reflect.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
        )
        names = {s.name for r in replies for s in r.list_services_response.service}
        assert "ragmix.v1.RagService" in names


# ------------------------------------------------------------------------ mutual TLS


def test_mutual_tls_accepts_a_client_cert_from_the_ca(mtls_server, pki):
    with _channel(mtls_server.target, pki["ca"], pki["client_cert"], pki["client_key"]) as ch:
        info = pb_grpc.RagServiceStub(ch).GetInfo(pb.GetInfoRequest(), timeout=30)
        assert info.generator.startswith("tiny-llama")


@pytest.mark.parametrize("client", [None, "stranger"])
def test_mutual_tls_refuses_clients_without_a_cert_from_the_ca(mtls_server, pki, client):
    cert = pki[f"{client}_cert"] if client else None
    key = pki[f"{client}_key"] if client else None
    with _channel(mtls_server.target, pki["ca"], cert, key) as ch:
        stub = pb_grpc.RagServiceStub(ch)
        assert _code(lambda: stub.GetInfo(pb.GetInfoRequest(), timeout=10)) == (
            grpc.StatusCode.UNAVAILABLE
        )


# ------------------------------------------------------------------------ settings


def test_security_settings_are_checked_at_start(pki, tmp_path):
    cert, key, ca = str(pki["server_cert"]), str(pki["server_key"]), str(pki["ca"])
    cases = [
        ({"tls_cert": cert}, "tls_key"),
        ({"tls_key": key}, "tls_cert"),
        ({"tls_client_ca": ca}, "tls_client_ca"),
        ({"tls_cert": cert, "tls_key": str(tmp_path / "missing.pem")}, "tls_key"),
        ({"auth_token_file": str(tmp_path)}, "auth_token_file"),  # a folder, not a file
    ]
    for cli, param in cases:
        with pytest.raises(ValidationError) as err:
            load_config(cli, env={})
        assert err.value.param == param, cli
    config = load_config({"tls_cert": cert, "tls_key": key, "tls_client_ca": ca}, env={})
    assert config.tls_client_ca == ca
    env = load_config({}, env={"RAGMIX_AUTH_TOKEN_FILE": str(pki["tokens"])})
    assert env.auth_token_file == str(pki["tokens"])


def test_token_file_parsing_and_comparison(pki, tmp_path):
    tokens = load_tokens(str(pki["tokens"]))
    assert tokens == [t.encode() for t in TOKENS]
    assert token_accepted(TOKENS[1].encode(), tokens)
    assert not token_accepted(TOKENS[1][:-1].encode(), tokens)
    assert not token_accepted(b"", tokens)
    empty = tmp_path / "empty"
    empty.write_text("# no tokens yet\n\n")
    with pytest.raises(ValidationError, match="holds no token"):
        load_tokens(str(empty))
    spaced = tmp_path / "spaced"
    spaced.write_text("two tokens on one line\n")
    with pytest.raises(ValidationError, match="one token per line"):
        load_tokens(str(spaced))


# ------------------------------------------------------------------------ through the SDK


def test_sdk_speaks_tls_and_tokens(tls_server, pki):
    from ragmix_client import RagClient, RagmixError

    with RagClient(
        tls_server.target, root_certificates=pki["ca"], token=TOKENS[0], timeout=60
    ) as client:
        assert client.generate_text(QUESTION, top_k=2, max_new_tokens=3).done.usage.generated_tokens
        assert client.health() == "SERVING"
    with RagClient(tls_server.target, root_certificates=pki["ca"], timeout=30) as anonymous:
        with pytest.raises(RagmixError) as err:
            anonymous.info()
        assert err.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_async_sdk_speaks_mutual_tls(mtls_server, pki):
    import asyncio

    from ragmix_client import AsyncRagClient

    async def run():
        async with AsyncRagClient(
            mtls_server.target,
            root_certificates=pki["ca"],
            certificate_chain=pki["client_cert"],
            private_key=pki["client_key"],
            timeout=60,
        ) as client:
            return (await client.info()).generator

    assert asyncio.run(run()).startswith("tiny-llama")
