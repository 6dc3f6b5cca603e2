"""kiam's gRPC protocol through grpcio, an independent gRPC implementation (C core).

  kiam_grpc.py client TARGET CA CERT KEY   reads a JSON list of calls on stdin, prints results
  kiam_grpc.py server CA CERT KEY          serves a kiam-v4-like server, prints "PORT n"

The server answers as kiam v4 servers do: every error has code UNKNOWN and kiam's message.
Stubs are generated from proto/kiam/service.proto at start, so nothing generated is committed.
"""

import json
import os
import shutil
import sys
import tempfile
from concurrent import futures

import grpc
from grpc_tools import protoc

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))


def stubs():
    out = tempfile.mkdtemp(prefix="kiam-grpcio-")
    proto_dir = os.path.join(ROOT, "proto")
    include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    rc = protoc.main(["protoc", f"-I{proto_dir}", f"-I{include}", f"--python_out={out}",
                      f"--grpc_python_out={out}", os.path.join(proto_dir, "kiam", "service.proto")])
    if rc != 0:
        raise SystemExit(f"protoc failed: {rc}")
    sys.path.insert(0, out)
    try:
        from kiam import service_pb2, service_pb2_grpc  # noqa: E402
    finally:
        # Imported modules live on in memory; the files are not needed again. Removing them now
        # (not at exit) also covers a peer that its test stops with SIGKILL.
        sys.path.remove(out)
        shutil.rmtree(out, ignore_errors=True)
    return service_pb2, service_pb2_grpc


def read(path):
    with open(path, "rb") as f:
        return f.read()


def client(target, ca, cert, key):
    pb, rpc = stubs()
    creds = grpc.ssl_channel_credentials(read(ca), read(key), read(cert))
    channel = grpc.secure_channel(target, creds, options=[("grpc.ssl_target_name_override", "kiam-server")])
    stub = rpc.KiamServiceStub(channel)
    results = []
    for call in json.load(sys.stdin):
        try:
            if call["rpc"] == "GetPodCredentials":
                r = stub.GetPodCredentials(pb.GetPodCredentialsRequest(ip=call["ip"], role=call["role"]), timeout=call.get("timeout", 10))
                results.append({"ok": {"code": r.code, "type": r.type, "access_key_id": r.access_key_id,
                                       "secret_access_key": bool(r.secret_access_key), "token": bool(r.token),
                                       "expiration": r.expiration, "last_updated": r.last_updated}})
            elif call["rpc"] == "GetPodRole":
                r = stub.GetPodRole(pb.GetPodRoleRequest(ip=call["ip"]), timeout=call.get("timeout", 10))
                results.append({"ok": {"name": r.name}})
            else:
                r = stub.GetHealth(pb.GetHealthRequest(), timeout=call.get("timeout", 10))
                results.append({"ok": {"message": r.message}})
        except grpc.RpcError as e:
            results.append({"code": e.code().name, "details": e.details()})
    print(json.dumps(results))


def server(ca, cert, key):
    pb, rpc = stubs()

    class Kiam(rpc.KiamServiceServicer):
        def GetPodRole(self, request, context):
            if request.ip in ("127.0.0.71", "127.0.0.72"):
                return pb.Role(name="py-role")
            context.abort(grpc.StatusCode.UNKNOWN, "pod not found")

        def GetPodCredentials(self, request, context):
            if request.ip == "127.0.0.71" and request.role == "py-role":
                return pb.Credentials(code="Success", type="AWS-HMAC", access_key_id="ASIAPYTHONSERVER0001",
                                      secret_access_key="py-secret", token="py-token",
                                      expiration="2099-01-01T00:00:00Z", last_updated="2026-11-22T00:00:00Z")
            if request.ip == "127.0.0.72":
                context.abort(grpc.StatusCode.UNKNOWN, "forbidden by policy")
            context.abort(grpc.StatusCode.UNKNOWN, "no pod found")

        def GetHealth(self, request, context):
            return pb.HealthStatus(message="ok")

    creds = grpc.ssl_server_credentials([(read(key), read(cert))], root_certificates=read(ca),
                                        require_client_auth=True)
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    rpc.add_KiamServiceServicer_to_server(Kiam(), srv)
    port = srv.add_secure_port("127.0.0.1:0", creds)
    srv.start()
    print(f"PORT {port}", flush=True)
    # Serve until the test closes stdin (or kills us).
    sys.stdin.read()
    srv.stop(0)


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "client":
        client(*sys.argv[2:6])
    elif mode == "server":
        server(*sys.argv[2:5])
    else:
        raise SystemExit(f"unknown mode {mode}")
