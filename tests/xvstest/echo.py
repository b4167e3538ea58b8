"""A backend's long-lived TCP service for tests: greets each connection
with the backend's name, then echoes every line back."""
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


if __name__ == "__main__":
    Server(("0.0.0.0", PORT), Echo).serve_forever()
