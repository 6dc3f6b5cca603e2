"""The kiam-rs demo: server + agent + moto on loopback, three pods posing by source address.

Pods are told apart by their TCP source address, so each "pod" here is a client bound to its
own 127.0.0.x address, and the server learns the pods from a manifest file (`--manifest`).
"""

import datetime
import http.client
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import boto3
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

BASE_ARN = "arn:aws:iam::123456789012:role/"
PODS = [
    # (namespace, name, ip, role)
    ("team-a", "alpha", "127.0.0.2", "alpha-role"),
    ("team-a", "beta", "127.0.0.3", "beta-role"),
    ("team-b", "gamma", "127.0.0.4", "admin"),
]
MANIFEST = """\
apiVersion: v1
kind: Namespace
metadata:
  name: team-a
  annotations:
    iam.amazonaws.com/permitted: ".*-role"
---
apiVersion: v1
kind: Namespace
metadata:
  name: team-b     # no iam.amazonaws.com/permitted: its pods get no role at all
"""
POD = """\
---
apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: {ns}
  annotations:
    iam.amazonaws.com/role: {role}
spec:
  containers: [{{name: app, image: app}}]
status:
  phase: Running
  podIP: {ip}
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mint_certs(d):
    """A CA, a server certificate (kiam-server, 127.0.0.1) and an agent client certificate."""
    now = datetime.datetime.now(datetime.timezone.utc)

    def cert(subject, issuer, key, issuer_key, ca, sans=(), eku=()):
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5))
             .not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
        if eku:
            b = b.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
        return b.sign(issuer_key, hashes.SHA256())

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write(stem, c, key):
        with open(os.path.join(d, stem + ".pem"), "wb") as f:
            f.write(c.public_bytes(serialization.Encoding.PEM))
        with open(os.path.join(d, stem + "-key.pem"), "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = cert(name("kiam-demo-ca"), name("kiam-demo-ca"), ca_key, ca_key, True)
    write("ca", ca, ca_key)
    skey = ec.generate_private_key(ec.SECP256R1())
    write("server", cert(name("kiam-server"), ca.subject, skey, ca_key, False,
                         [x509.DNSName("kiam-server"), x509.DNSName("localhost"),
                          x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
                         [ExtendedKeyUsageOID.SERVER_AUTH]), skey)
    akey = ec.generate_private_key(ec.SECP256R1())
    write("agent", cert(name("kiam-agent"), ca.subject, akey, ca_key, False, (),
                        [ExtendedKeyUsageOID.CLIENT_AUTH]), akey)


def wait_until(what, check, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise SystemExit(f"demo: {what} did not happen within {timeout:.0f}s")


def http_from(ip, port, method, path, headers=None):
    """One request to the agent from source address `ip`, as the pod with that IP would make."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(ip, 0))
    try:
        conn.request(method, path, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.read().decode()
    finally:
        conn.close()


def main():
    kiam = os.path.abspath(sys.argv[1])
    venv_bin = os.path.dirname(sys.executable)
    work = tempfile.mkdtemp(prefix="kiam-demo-")
    procs = []

    def start(args, log, env=None):
        with open(os.path.join(work, log), "wb") as out:
            procs.append(subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env,
                                          cwd=work, start_new_session=True))

    try:
        mint_certs(work)
        manifest = os.path.join(work, "cluster.yaml")
        with open(manifest, "w") as f:
            f.write(MANIFEST + "".join(POD.format(ns=ns, name=n, ip=ip, role=r) for ns, n, ip, r in PODS))

        moto_port, server_port, agent_port = free_port(), free_port(), free_port()
        moto = f"http://127.0.0.1:{moto_port}"
        print(f"== starting moto (local STS) on {moto}")
        start([os.path.join(venv_bin, "moto_server"), "-H", "127.0.0.1", "-p", str(moto_port)], "moto.log")
        wait_until("moto answering", lambda: _up(moto_port))

        tls = lambda side: ["--cert", f"{work}/{side}.pem", "--key", f"{work}/{side}-key.pem",
                            "--ca", f"{work}/ca.pem"]
        env = {"PATH": os.environ.get("PATH", ""), "AWS_ACCESS_KEY_ID": "demo", "AWS_SECRET_ACCESS_KEY": "demo",
               "AWS_EC2_METADATA_DISABLED": "true"}
        server_addr = f"127.0.0.1:{server_port}"
        print(f"== starting kiam server on {server_addr} (pods from {manifest})")
        start([kiam, "server", "--bind", server_addr, "--manifest", manifest, "--role-base-arn", BASE_ARN,
               "--sts-endpoint", moto, "--level", "info"] + tls("server"), "server.log", env)
        health = [kiam, "health", "--server-address", server_addr, "--timeout", "20s"] + tls("agent")
        if subprocess.run(health, env=env, capture_output=True).returncode != 0:
            raise SystemExit("demo: kiam health never passed; see " + work + "/server.log")
        print("   kiam health: ok")
        print(f"== starting kiam agent on 127.0.0.1:{agent_port}")
        start([kiam, "agent", "--host", "127.0.0.1", "--port", str(agent_port), "--server-address", server_addr,
               "--metadata-addr", "127.0.0.1:1"] + tls("agent"), "agent.log", env)
        wait_until("the agent answering /ping", lambda: _ping(agent_port))

        base = "/latest/meta-data/iam/security-credentials/"
        results = []
        for ns, name, ip, role in PODS:
            print(f"\n== pod {ns}/{name} at {ip} (annotated role {role!r})")
            status, token = http_from(ip, agent_port, "PUT", "/latest/api/token",
                                      {"X-aws-ec2-metadata-token-ttl-seconds": "21600"})
            hdr = {"X-aws-ec2-metadata-token": token}
            status, listed = http_from(ip, agent_port, "GET", base, hdr)
            print(f"   GET {base} -> {status} {listed.strip()}")
            status, body = http_from(ip, agent_port, "GET", base + listed.strip(), hdr)
            if status != 200:
                print(f"   GET {base}{listed.strip()} -> {status} {body.strip()}")
                results.append((name, "denied"))
                continue
            creds = json.loads(body)
            print(f"   GET {base}{listed.strip()} -> 200 AccessKeyId={creds['AccessKeyId']} "
                  f"Expiration={creds['Expiration']}")
            sts = boto3.client("sts", endpoint_url=moto, region_name="us-east-1",
                               aws_access_key_id=creds["AccessKeyId"],
                               aws_secret_access_key=creds["SecretAccessKey"],
                               aws_session_token=creds["Token"])
            arn = sts.get_caller_identity()["Arn"]
            print(f"   boto3 sts.get_caller_identity() with them -> {arn}")
            results.append((name, arn))

        print("\n== summary")
        ok = (results[0][1].endswith("assumed-role/alpha-role/kiam-kiam")
              and results[1][1].endswith("assumed-role/beta-role/kiam-kiam")
              and results[2][1] == "denied")
        for name, outcome in results:
            print(f"   {name:6} {outcome}")
        print("   each pod got exactly its own role; gamma's namespace permits none" if ok
              else "   UNEXPECTED RESULT")
        print(f"   logs: {work}/server.log, {work}/agent.log")
        return 0 if ok else 1
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        print("== stopped moto, server and agent")


def _up(port):
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
        c.request("GET", "/moto-api/")
        return c.getresponse().status == 200
    except OSError:
        return False


def _ping(port):
    try:
        return http_from("127.0.0.1", port, "GET", "/ping")[1] == "pong"
    except OSError:
        return False


if __name__ == "__main__":
    sys.exit(main())
