"""An upstream API that runs in a pod of the capgate image: stdlib only, it prints what it receives.

HTTP (or HTTPS, when ``TLS_DIR`` holds ``tls.crt``/``tls.key``) on ``PORT``, a raw TCP listener on
``RAW_PORT`` and a UDP listener on ``PORT``. Every request, connection or datagram is one JSON line on
stdout, so a test reads with ``kubectl logs`` exactly what reached the upstream (the Authorization it
got, any X-Capgate-* header that leaked) and what never did.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

NAME = os.environ.get("NAME", "upstream")
PORT = int(os.environ.get("PORT", "8080"))
RAW_PORT = int(os.environ.get("RAW_PORT", "9000"))


PRINTING = threading.Lock()


def seen(**fields: object) -> None:
    line = json.dumps({"seen": NAME, **fields}) + "\n"
    with PRINTING:  # print() writes the line and its newline apart: requests at once would share a line
        sys.stdout.write(line)
        sys.stdout.flush()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        seen(method=self.command, path=self.path, host=self.headers.get("Host"),
             authorization=self.headers.get("Authorization"),
             capgate_headers=sorted(h for h in self.headers if h.lower().startswith("x-capgate-")),
             body=body.decode(errors="replace")[:200])
        payload = json.dumps({"upstream": NAME, "path": self.path, "id": "ch_1"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = answer

    def log_message(self, format: str, *args: object) -> None:
        pass  # one JSON line per request is printed by answer()


def raw_tcp() -> None:
    listener = socket.create_server(("0.0.0.0", RAW_PORT))
    while True:
        connection, peer = listener.accept()
        with connection:
            connection.settimeout(2)
            try:
                data = connection.recv(4096)
            except OSError:
                data = b""
            seen(tcp=data.decode(errors="replace"), peer=peer[0])
            if data:
                connection.sendall(b"RAW-ANSWER\n")


def udp() -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", PORT))
    while True:
        data, peer = sock.recvfrom(4096)
        seen(udp=data.decode(errors="replace"), peer=peer[0])


def main() -> None:
    server = ThreadingHTTPServer(("0.0.0.0", PORT), Handler)
    tls_dir = os.environ.get("TLS_DIR")
    if tls_dir:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(f"{tls_dir}/tls.crt", f"{tls_dir}/tls.key")
        server.socket = context.wrap_socket(server.socket, server_side=True)
    for target in (raw_tcp, udp):
        threading.Thread(target=target, daemon=True).start()
    seen(listening=PORT, tls=bool(tls_dir))
    server.serve_forever()


if __name__ == "__main__":
    main()
