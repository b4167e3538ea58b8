"""A backend's long-lived TCP service for tests: greets each connection
with the backend's name, then echoes every line back, over IPv4 and IPv6."""
import socket
import socketserver
import sys

NAME = sys.argv[1].encode()
PORT = int(sys.argv[2])


class Echo(socketserver.StreamRequestHandler):
    def handle(self):
        self.wfile.write(NAME + b"\n")
        for line in self.rfile:
            self.wfile.write(line)


class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    address_family = socket.AF_INET6

    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)   # IPv4 too
        super().server_bind()


if __name__ == "__main__":
    Server(("::", PORT), Echo).serve_forever()
