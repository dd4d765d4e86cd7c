"""What lives outside the pod in the egress test: upstreams and bystanders, in their own network namespace.

``python peers.py LOG CERT KEY`` serves, on every address of its namespace: HTTP on 8080, HTTPS on
8443 (CERT/KEY, issued for ``payments.test``), raw TCP on 9000 (IPv4 and IPv6), UDP echo on 53 and
5353. Every request, connection and datagram is appended to LOG as a JSON line, so the test can
assert what actually arrived outside the pod — not just what the agent was told. Prints ``ready``.
"""

from __future__ import annotations

import json
import socket
import ssl
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LOCK = threading.Lock()


def record(log: str, **event: object) -> None:
    with LOCK, open(log, "a", encoding="utf-8") as out:
        out.write(json.dumps(event) + "\n")


def handler(log: str, port: int) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            record(log, kind="http", port=port, local=self.connection.getsockname()[0], path=self.path,
                   authorization=self.headers.get("Authorization"), host=self.headers.get("Host"))
            body = json.dumps({"ok": True, "path": self.path}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    return Handler


def tcp(log: str, family: int, port: int) -> None:
    server = socket.socket(family, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        server.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    server.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
    server.listen(16)

    def serve() -> None:
        while True:
            conn, peer = server.accept()
            record(log, kind="tcp", port=port, family=int(family), local=conn.getsockname()[0], peer=peer[0])
            conn.settimeout(1)
            try:
                conn.sendall(b"peer says hello\n")
            finally:
                conn.close()

    threading.Thread(target=serve, daemon=True).start()


def udp(log: str, port: int) -> None:
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("0.0.0.0", port))

    def serve() -> None:
        while True:
            data, peer = server.recvfrom(2048)
            record(log, kind="udp", port=port, peer=peer[0], size=len(data))
            server.sendto(data, peer)

    threading.Thread(target=serve, daemon=True).start()


def main() -> None:
    log, cert, key = sys.argv[1:4]
    plain = ThreadingHTTPServer(("0.0.0.0", 8080), handler(log, 8080))
    secure = ThreadingHTTPServer(("0.0.0.0", 8443), handler(log, 8443))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    secure.socket = context.wrap_socket(secure.socket, server_side=True)
    for server in (plain, secure):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    tcp(log, socket.AF_INET, 9000)
    tcp(log, socket.AF_INET6, 9000)
    udp(log, 53)
    udp(log, 5353)
    print("ready", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
