"""A stand-in managed side for the link's node-side tests: a real gRPC server speaking link.proto over TLS.

It runs on its own event loop in a thread, with a CA and a server certificate the test generates, and is scripted
from the test's thread: refuse links (as the managed side does: a status plus `scaigrid-error-code`), record what
the node sends (hellos, heartbeats, ConfigApplied, usage batches, tunnel frames), push snapshots, ack usage, open,
credit and cancel tunnels, drop the stream, fall silent, stop and start again on the same port.
"""

import asyncio
import datetime
import ipaddress
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from appliance import devstack
from scaigrid.hybrid import assertion, protocol
from scaigrid.rpc.generated.scaigrid.hybrid.v1 import link_pb2, link_pb2_grpc
from scaigrid.rpc.interceptors import ERROR_CODE_KEY
from tests.support.waiting import eventually

NODE_ID = "hn_fake"
MANAGED_VERSION = "0.1.0"
HEARTBEAT_INTERVAL_S = 1


def _pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def make_certificates(directory: Path) -> tuple[Path, bytes, bytes]:
    """A CA (written to directory/ca.pem, for HYBRID_CA_FILE) and a server certificate it signed for localhost and
    127.0.0.1; returns (ca file, server certificate PEM, server key PEM)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fake managed CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    server = (x509.CertificateBuilder()
              .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
              .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
              .add_extension(x509.SubjectAlternativeName(
                  [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
              .sign(ca_key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    ca_file = directory / "ca.pem"
    ca_file.write_bytes(_pem(ca))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return ca_file, _pem(server), key_pem


@dataclass
class Tunnel:
    """One tunnel the fake opened: the frames the node sent back, as they came."""

    tunnel_id: str
    auto_credit: bool
    frames: list[Any] = field(default_factory=list)

    @property
    def ended(self) -> bool:
        return bool(self.frames) and self.frames[-1].WhichOneof("kind") == "end"

    @property
    def head(self) -> Any:
        return self.frames[0].head

    @property
    def body(self) -> bytes:
        return b"".join(frame.data for frame in self.frames if frame.WhichOneof("kind") == "data")

    @property
    def end(self) -> Any:
        return self.frames[-1].end


class _Drop:
    """Queued for a link's writer: abort the stream."""


class FakeManaged(link_pb2_grpc.HybridLinkServicer):
    def __init__(self, directory: Path, credential: str) -> None:
        self.ca_file, self._cert, self._key = make_certificates(directory)
        self.credential = credential
        self.port = devstack.free_port()
        self.refusal: tuple[str, str] | None = None  # (error code, message): every Connect is refused with it
        self.ack_heartbeats = True
        self.ack_usage = True
        self.drop_after_ack = False  # each link breaks right after its first heartbeat ack
        self.attempts: list[str] = []  # each Connect: "welcomed" or the error code it was refused with
        self.hellos: list[Any] = []
        self.heartbeats: list[Any] = []
        self.applied: list[Any] = []
        self.batches: list[Any] = []
        self.tunnels: dict[str, Tunnel] = {}
        self.closed_by_node = 0  # links the node ended by closing its side of the stream
        self._link: asyncio.Queue[Any] | None = None
        self._server: Any = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fake-managed", daemon=True)
        self._thread.start()

    @property
    def target(self) -> str:
        return f"localhost:{self.port}"

    @property
    def linked(self) -> bool:
        return self._link is not None

    def _call(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(15)

    # --- lifecycle ---

    def start(self) -> "FakeManaged":
        """Serves on its port; a no-op when serving (gRPC binds with SO_REUSEPORT: a second server on the same port
        would succeed, outlive stop() and keep answering links)."""
        if self._server is not None:
            return self

        async def serve() -> None:
            self._server = grpc.aio.server()
            link_pb2_grpc.add_HybridLinkServicer_to_server(self, self._server)
            credentials = grpc.ssl_server_credentials([(self._key, self._cert)])
            self._server.add_secure_port(f"127.0.0.1:{self.port}", credentials)
            await self._server.start()

        self._call(serve())
        return self

    def stop(self) -> None:
        """Stops serving at once (open links break); start() serves again on the same port."""
        if self._server is not None:
            self._call(self._server.stop(0))
            self._server = None

    def close(self) -> None:
        self.stop()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def reset(self) -> None:
        """Forgets what was recorded and scripted, for the next test."""
        self.refusal = None
        self.ack_heartbeats = self.ack_usage = True
        self.drop_after_ack = False
        for record in (self.attempts, self.hellos, self.heartbeats, self.applied, self.batches):
            record.clear()
        self.tunnels.clear()
        self.closed_by_node = 0

    # --- scripting ---

    def wait_for(self, condition: Callable[[], bool], what: str, timeout_s: float = 30) -> None:
        eventually(condition, f"fake managed side: {what}", timeout_s)

    def push(self, message: Any) -> None:
        """Sends a ManagedMessage down the current link."""
        link = self._link
        assert link is not None, "no node is linked"
        self._loop.call_soon_threadsafe(link.put_nowait, message)

    def push_snapshot(self, version: int, body_json: str, sha256: str) -> None:
        self.push(link_pb2.ManagedMessage(config=link_pb2.ConfigSnapshot(
            version=version, body_json=body_json, sha256=sha256)))

    def open_tunnel(self, tunnel_id: str, path: str, body: bytes, caller: assertion.Caller | None,
                    credit: int = protocol.TUNNEL_WINDOW, auto_credit: bool = True,
                    headers: dict[str, str] | None = None) -> Tunnel:
        """Sends a TunnelRequest for `caller` (signed as the managed side's relay does, for this tunnel; None: no
        assertion); with auto_credit, each frame received is credited at once (a fast consumer)."""
        tunnel = self.tunnels[tunnel_id] = Tunnel(tunnel_id, auto_credit)
        signed = "" if caller is None else assertion.sign(assertion.credential_key(self.credential), replace(
            caller, node_id=NODE_ID, request_id=tunnel_id))
        self.push(link_pb2.ManagedMessage(tunnel_request=link_pb2.TunnelRequest(
            tunnel_id=tunnel_id, node_id=NODE_ID, method="POST", path=path, body=body, credit=credit,
            headers={"content-type": "application/json", **(headers or {})}, assertion=signed)))
        return tunnel

    def credit(self, tunnel_id: str, frames: int) -> None:
        self.push(link_pb2.ManagedMessage(tunnel_credit=link_pb2.TunnelCredit(tunnel_id=tunnel_id, frames=frames)))

    def cancel(self, tunnel_id: str) -> None:
        self.push(link_pb2.ManagedMessage(tunnel_cancel=link_pb2.TunnelCancel(tunnel_id=tunnel_id)))

    def drop(self) -> None:
        """Breaks the current link's stream (status UNAVAILABLE), as a managed replica going away would."""
        self.push(_Drop())

    # --- the service ---

    async def Connect(self, request_iterator: Any, context: Any) -> None:
        first = await context.read()
        if first is grpc.aio.EOF:
            return
        self.hellos.append(first.hello)
        metadata = dict(context.invocation_metadata() or ())
        if metadata.get("authorization") != f"Bearer {self.credential}":
            await self._refuse(context, grpc.StatusCode.UNAUTHENTICATED, "NODE_CREDENTIAL_INVALID",
                               "the node credential is not valid")
        if self.refusal is not None:
            await self._refuse(context, grpc.StatusCode.FAILED_PRECONDITION, *self.refusal)
        self.attempts.append("welcomed")
        await context.write(link_pb2.ManagedMessage(welcome=link_pb2.Welcome(
            node_id=NODE_ID, software_version=MANAGED_VERSION, protocol_version=protocol.LINK_PROTOCOL_VERSION,
            heartbeat_interval_s=HEARTBEAT_INTERVAL_S)))
        outgoing: asyncio.Queue[Any] = asyncio.Queue()
        self._link = outgoing
        reader = asyncio.create_task(self._receive(context, outgoing))
        getting: asyncio.Task[Any] | None = None
        try:
            while True:
                getting = asyncio.create_task(outgoing.get())
                await asyncio.wait([getting, reader], return_when=asyncio.FIRST_COMPLETED)
                if not getting.done():
                    return  # the node ended its side
                message = getting.result()
                if isinstance(message, _Drop):
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "dropped by the test")
                await context.write(message)
        finally:
            if self._link is outgoing:
                self._link = None
            for task in (reader, getting):
                if task is not None:
                    task.cancel()
            await asyncio.gather(reader, *([getting] if getting else []), return_exceptions=True)

    async def _refuse(self, context: Any, status: Any, code: str, message: str) -> None:
        self.attempts.append(code)
        context.set_trailing_metadata(((ERROR_CODE_KEY, code),))
        await context.abort(status, message)

    async def _receive(self, context: Any, outgoing: "asyncio.Queue[Any]") -> None:
        while True:
            message = await context.read()
            if message is grpc.aio.EOF:
                self.closed_by_node += 1
                return
            kind = message.WhichOneof("kind")
            if kind == "heartbeat":
                self.heartbeats.append(message.heartbeat)
                if self.ack_heartbeats:
                    outgoing.put_nowait(link_pb2.ManagedMessage(
                        heartbeat_ack=link_pb2.HeartbeatAck(seq=message.heartbeat.seq)))
                    if self.drop_after_ack:
                        outgoing.put_nowait(_Drop())
            elif kind == "config_applied":
                self.applied.append(message.config_applied)
            elif kind == "usage":
                self.batches.append(message.usage)
                if self.ack_usage:
                    outgoing.put_nowait(link_pb2.ManagedMessage(usage_ack=link_pb2.UsageAck(
                        batch_id=message.usage.batch_id, stored=len(message.usage.records_json))))
            elif kind == "tunnel":
                frame = message.tunnel
                tunnel = self.tunnels[frame.tunnel_id]
                tunnel.frames.append(frame)
                if tunnel.auto_credit:
                    outgoing.put_nowait(link_pb2.ManagedMessage(
                        tunnel_credit=link_pb2.TunnelCredit(tunnel_id=frame.tunnel_id, frames=1)))
