"""A real ScaiInfer node for the tests: heartbeats to the grpc mode, serves scaiinfer.v1 InferenceService.

    python -m tests.scaiinfer_node --port P --gateway HOST:PORT --node-id ID [--models a,b] [--wrong-token]
        [--tls-cert F --tls-key F [--client-ca F]]

Its service token comes from SCAIINFER_NODE_TOKEN (the environment, never the command line); it accepts the
gateway's calls only with the credential the last heartbeat reply gave it, as a real node does. The model a
request names selects its behaviour, as with tests/backends.py:
  ok / anything else  3 chunks "tok0 tok1 tok2 ", then finish "stop", then usage (prompt = words in, completion 3)
  slow-S              waits S seconds before the first chunk, then like ok
  fail-CODE           aborts at once with the gRPC status CODE (e.g. fail-UNAVAILABLE)
  cut-N               N chunks, then aborts with INTERNAL (a stream broken mid-way)
  short-N             N chunks, then ends the stream with status OK but no finish_reason (a node that gave up)
It serves TLS with --tls-cert/--tls-key (and requires a client certificate signed by --client-ca when given), plaintext
without them. Every call is appended as a JSON line to --calls (node id, model, request_id, authorization valid or not,
max_tokens, the common name of the gateway's client certificate).
It prints "serving" once the first heartbeat is accepted (or refused, with --wrong-token) and logs refusals.
"""

import argparse
import asyncio
import contextlib
import hmac
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import grpc

from scaigrid.rpc.generated.scaiinfer.v1 import scaiinfer_pb2, scaiinfer_pb2_grpc


class Inference(scaiinfer_pb2_grpc.InferenceServiceServicer):
    def __init__(self, node_id: str, models: list[str], calls: Path | None) -> None:
        self._node_id = node_id
        self._models = models
        self._calls = calls
        self.gateway_token = ""  # from the gateway's heartbeat replies

    def _record(self, request: Any, authorized: bool, client_cn: str | None) -> None:
        if self._calls is not None:
            line = {"node": self._node_id, "model": request.model, "request_id": request.request_id,
                    "authorized": authorized,
                    "max_tokens": request.max_tokens if request.HasField("max_tokens") else None,
                    "messages": [[m.role, m.content] for m in request.messages], "client_cn": client_cn}
            with self._calls.open("a") as calls:
                calls.write(json.dumps(line) + "\n")

    def _authorized(self, context: Any) -> bool:
        expected = f"Bearer {self.gateway_token}"
        return bool(self.gateway_token) and any(
            key == "authorization" and hmac.compare_digest(value.encode(), expected.encode())
            for key, value in context.invocation_metadata() or ())

    async def StreamInference(self, request: Any, context: Any) -> Any:
        authorized = self._authorized(context)
        common_names = (context.auth_context() or {}).get("x509_common_name") or [b""]
        self._record(request, authorized, common_names[0].decode() or None)
        if not authorized:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "no valid gateway token")
        behaviour, _, arg = request.model.partition("-")
        if behaviour == "fail":
            await context.abort(grpc.StatusCode[arg], f"failing on purpose with {arg}")
        if behaviour == "slow":
            await asyncio.sleep(float(arg))  # a slow node is the behaviour asked for, not an ordering wait
        count = int(arg) if behaviour in ("cut", "short") else 3
        for index in range(count):
            yield scaiinfer_pb2.InferenceChunk(delta=f"tok{index} ")
            await asyncio.sleep(0.01)  # tokens paced as a real node streams them, not an ordering wait
        if behaviour == "cut":
            await context.abort(grpc.StatusCode.INTERNAL, "the model crashed mid-stream")
        if behaviour == "short":
            return
        yield scaiinfer_pb2.InferenceChunk(finish_reason="stop")
        prompt_tokens = sum(len(message.content.split()) for message in request.messages)
        yield scaiinfer_pb2.InferenceChunk(usage=scaiinfer_pb2.Usage(prompt_tokens=prompt_tokens,
                                                                     completion_tokens=count))

    async def ListModels(self, request: Any, context: Any) -> Any:
        return scaiinfer_pb2.ListModelsResponse(models=self._models)


async def heartbeats(args: argparse.Namespace, inference: Inference, stop: asyncio.Event) -> None:
    token = "sst_wrong.token" if args.wrong_token else os.environ["SCAIINFER_NODE_TOKEN"]
    announced = False
    async with grpc.aio.insecure_channel(args.gateway) as channel:
        stub = scaiinfer_pb2_grpc.HeartbeatServiceStub(channel)
        interval_s = 0.5
        while not stop.is_set():
            try:
                reply = await stub.Heartbeat(scaiinfer_pb2.HeartbeatRequest(
                    node_id=args.node_id, endpoint=f"127.0.0.1:{args.port}", models=args.models.split(","),
                    capacity=8, load=1, version="test-node 1.0"), metadata=(("authorization", f"Bearer {token}"),),
                    timeout=5)
                interval_s = reply.heartbeat_interval_s
                inference.gateway_token = reply.gateway_token
                if not announced:
                    print("serving", flush=True)
                    announced = True
            except grpc.aio.AioRpcError as exc:
                print(f"heartbeat refused: {exc.code().name} {exc.details()}", flush=True)
                if args.wrong_token and not announced:
                    print("serving", flush=True)
                    announced = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval_s)


def server_credentials(args: argparse.Namespace) -> grpc.ServerCredentials:
    client_ca = Path(args.client_ca).read_bytes() if args.client_ca else None
    return grpc.ssl_server_credentials([(Path(args.tls_key).read_bytes(), Path(args.tls_cert).read_bytes())],
                                       root_certificates=client_ca, require_client_auth=client_ca is not None)


async def main(args: argparse.Namespace) -> None:
    server = grpc.aio.server()
    inference = Inference(args.node_id, args.models.split(","), Path(args.calls) if args.calls else None)
    scaiinfer_pb2_grpc.add_InferenceServiceServicer_to_server(inference, server)
    if args.tls_cert:
        server.add_secure_port(f"127.0.0.1:{args.port}", server_credentials(args))
    else:
        server.add_insecure_port(f"127.0.0.1:{args.port}")
    await server.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await heartbeats(args, inference, stop)
    await server.stop(1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--gateway", required=True, help="host:port of the grpc mode")
    parser.add_argument("--node-id", required=True)
    parser.add_argument("--models", default="ok")
    parser.add_argument("--calls", help="file to append each call to, as a JSON line")
    parser.add_argument("--wrong-token", action="store_true", help="heartbeat with a token the gateway refuses")
    parser.add_argument("--tls-cert", help="serve TLS with this certificate (PEM)")
    parser.add_argument("--tls-key", help="the key of --tls-cert")
    parser.add_argument("--client-ca", help="require a client certificate signed by this CA")
    asyncio.run(main(parser.parse_args()))
    sys.exit(0)
