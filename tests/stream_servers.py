"""Network video sources on 127.0.0.1 for the stream tests and scripts/bench_streams.py.

    python tests/stream_servers.py rtsp PORT VIDEO     an RTSP server; Debian's ffmpeg publishes VIDEO into
                                                       it at real time, looped (the camera), and every
                                                       player gets the packets (the server relays them)
    python tests/stream_servers.py mjpeg PORT FOLDER FPS   an HTTP multipart/x-mixed-replace (MJPEG) stream
                                                       of the JPEGs in FOLDER, FPS frames a second
    python tests/stream_servers.py garbage PORT         an HTTP server that answers random bytes

ffmpeg can publish to an RTSP server but cannot be one, so the server here is a small RTSP relay over
TCP (ANNOUNCE/RECORD in from ffmpeg, DESCRIBE/SETUP/PLAY out to players, RTP interleaved on the TCP
connection), as a camera or MediaMTX speaks it. Each runs until it is killed; kill its process group to
take the camera away (the ffmpeg publisher is its child).
"""

from __future__ import annotations

import http.server
import os
import socket
import socketserver
import subprocess
import sys
import threading
import time
from pathlib import Path


class RtspRelay(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, port: int):
        super().__init__(("127.0.0.1", port), RtspHandler)
        self.sdp: bytes | None = None
        self.players: list = []  # (socket, lock, channel) of playing clients
        self.lock = threading.Lock()


class RtspHandler(socketserver.BaseRequestHandler):
    def handle(self):
        sock, srv = self.request, self.server
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        f = sock.makefile("rb")
        wlock = threading.Lock()
        me = None
        publishing = False
        channel = 0
        try:
            while True:
                first = f.read(1)
                if not first:
                    return
                if first == b"$":  # an interleaved packet: from the publisher, relay it; from a player, ignore
                    hdr = f.read(3)
                    if len(hdr) < 3:
                        return
                    data = f.read(int.from_bytes(hdr[1:3], "big"))
                    if publishing and hdr[0] == 0:
                        with srv.lock:
                            players = list(srv.players)
                        for p_sock, p_lock, p_ch in players:
                            try:
                                with p_lock:
                                    p_sock.sendall(b"$" + bytes([p_ch]) + len(data).to_bytes(2, "big") + data)
                            except OSError:
                                with srv.lock:
                                    if (p_sock, p_lock, p_ch) in srv.players:
                                        srv.players.remove((p_sock, p_lock, p_ch))
                    continue
                lines = [first + f.readline()]
                while lines[-1] not in (b"\r\n", b"\n", b""):
                    lines.append(f.readline())
                method, url = lines[0].decode("latin-1").split()[:2]
                headers = {}
                for raw in lines[1:]:
                    if b":" in raw:
                        k, v = raw.decode("latin-1").split(":", 1)
                        headers[k.strip().lower()] = v.strip()
                body = f.read(int(headers.get("content-length", "0")))
                cseq = headers.get("cseq", "0")
                extra, out_body, code = {}, b"", "200 OK"
                if method == "OPTIONS":
                    extra["Public"] = "DESCRIBE, ANNOUNCE, SETUP, PLAY, RECORD, TEARDOWN, OPTIONS, GET_PARAMETER"
                elif method == "ANNOUNCE":
                    srv.sdp = body
                elif method == "DESCRIBE":
                    if srv.sdp is None:
                        code = "404 Not Found"
                    else:
                        out_body = srv.sdp
                        extra["Content-Base"] = url.rstrip("/") + "/"
                        extra["Content-Type"] = "application/sdp"
                elif method == "SETUP":
                    transport = headers.get("transport", "")
                    if "TCP" not in transport.upper():
                        code = "461 Unsupported Transport"
                    else:
                        if "interleaved=" in transport:
                            channel = int(transport.split("interleaved=")[1].split("-")[0].split(";")[0])
                        extra["Transport"] = transport
                        extra["Session"] = "12345678"
                elif method == "RECORD":
                    publishing = True
                    extra["Session"] = "12345678"
                elif method == "PLAY":
                    extra["Session"] = "12345678"
                    extra["Range"] = "npt=0.000-"
                elif method == "TEARDOWN":
                    code = "200 OK"
                head = f"RTSP/1.0 {code}\r\nCSeq: {cseq}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in extra.items())
                if out_body:
                    head += f"Content-Length: {len(out_body)}\r\n"
                with wlock:
                    sock.sendall(head.encode() + b"\r\n" + out_body)
                if method == "PLAY" and me is None:
                    me = (sock, wlock, channel)
                    with srv.lock:
                        srv.players.append(me)
                if method == "TEARDOWN":
                    return
        except (OSError, ValueError, IndexError):
            return
        finally:
            if me is not None:
                with srv.lock:
                    if me in srv.players:
                        srv.players.remove(me)
            if publishing:
                srv.sdp = None


def serve_rtsp(port: int, video: str) -> None:
    relay = RtspRelay(port)
    threading.Thread(target=relay.serve_forever, daemon=True).start()
    cmd = ["ffmpeg", "-nostdin", "-loglevel", "error", "-re", "-stream_loop", "-1", "-i", video, "-an", "-c", "copy",
           "-f", "rtsp", "-rtsp_transport", "tcp", f"rtsp://127.0.0.1:{port}/live"]
    while True:  # the camera: publish, and publish again should ffmpeg stop
        subprocess.run(cmd)
        time.sleep(0.2)


class MjpegHandler(http.server.BaseHTTPRequestHandler):
    frames: list[bytes] = []
    fps = 10.0
    delay = 0.0

    def log_message(self, *a):
        pass

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        try:
            time.sleep(self.delay)
            i, t0 = 0, time.monotonic()
            while True:
                jpg = self.frames[i % len(self.frames)]
                self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: "
                                 + str(len(jpg)).encode() + b"\r\n\r\n" + jpg + b"\r\n")
                self.wfile.flush()
                i += 1
                time.sleep(max(0.0, t0 + i / self.fps - time.monotonic()))
        except OSError:
            return


class GarbageHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        try:
            for _ in range(200):
                self.wfile.write(os.urandom(4096))
                time.sleep(0.01)
        except OSError:
            return


def main(argv: list[str]) -> None:
    kind, port = argv[0], int(argv[1])
    if kind == "rtsp":
        serve_rtsp(port, argv[2])
    elif kind in ("mjpeg", "slow"):
        MjpegHandler.frames = [p.read_bytes() for p in sorted(Path(argv[2]).glob("*.jpg"))]
        MjpegHandler.fps = float(argv[3])
        if kind == "slow":  # the first frame after a minute, then one a minute
            MjpegHandler.delay = 60.0
        http.server.ThreadingHTTPServer.daemon_threads = True
        http.server.ThreadingHTTPServer(("127.0.0.1", port), MjpegHandler).serve_forever()
    elif kind == "garbage":
        http.server.ThreadingHTTPServer.daemon_threads = True
        http.server.ThreadingHTTPServer(("127.0.0.1", port), GarbageHandler).serve_forever()
    else:
        raise SystemExit(f"unknown server kind {kind}")


if __name__ == "__main__":
    main(sys.argv[1:])
