"""Several streams at once, reconnection and events, with real parts: RTSP (Debian's ffmpeg publishing
into a small RTSP relay), HTTP/MJPEG and garbage servers on 127.0.0.1, Debian's mosquitto, a real
webhook receiver, and `edgetl run` as a process where signals matter."""

import contextlib
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import photo

from edgetl.cli import main
from edgetl.deploy import events, runtime, streams

ROOT = Path(__file__).resolve().parents[1]
SERVERS = Path(__file__).with_name("stream_servers.py")
FFMPEG = shutil.which("ffmpeg")
MOSQUITTO = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)
need_ffmpeg = pytest.mark.skipif(FFMPEG is None, reason="Debian's ffmpeg is not installed (apt-get install ffmpeg)")
need_mosquitto = pytest.mark.skipif(MOSQUITTO is None, reason="Debian's mosquitto is not installed "
                                                              "(apt-get install mosquitto)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port}")


class Server:
    """A server process (its own process group, so that its ffmpeg child goes with it)."""

    def __init__(self, *args, port: int):
        self.args, self.port = [str(a) for a in args], port
        self.proc = None

    def start(self) -> "Server":
        self.proc = subprocess.Popen(self.args, start_new_session=True, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_port(self.port)
        return self

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


@contextlib.contextmanager
def servers(*made):
    try:
        yield [s.start() for s in made]
    finally:
        for s in made:
            s.kill()


def stream_server(kind: str, *args) -> Server:
    port = free_port()
    return Server(sys.executable, SERVERS, kind, port, *args, port=port)


CLASSES = ("red", "green", "blue")


def picture(cls: int, seed: int, size=(320, 240)) -> np.ndarray:
    """A synthetic BGR picture of class `cls` (a colour shift the tiny backbone separates), as in conftest."""
    img = np.asarray(photo(seed, size=size)).astype(np.int16)
    img[..., cls] = np.clip(img[..., cls] + 110, 0, 255)
    return img.astype(np.uint8)[..., ::-1].copy()


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """320x240 JPEGs of the three classes in turn, and an H.264 clip of them made with ffmpeg (two
    pictures a second, a keyframe a second, as cameras send)."""
    tmp = tmp_path_factory.mktemp("media")
    jpg = tmp / "jpg"
    jpg.mkdir()
    held = tmp / "held"  # each picture for 5 frames: a class that holds, as in a camera's view
    held.mkdir()
    for i in range(12):
        cv2.imwrite(str(jpg / f"{i:03d}.jpg"), picture(i % 3, 500 + i))
        for k in range(5):
            shutil.copy(jpg / f"{i:03d}.jpg", held / f"{i:03d}-{k}.jpg")
    clip = None
    if FFMPEG:
        clip = tmp / "clip.mp4"
        subprocess.run([FFMPEG, "-nostdin", "-loglevel", "error", "-y", "-framerate", "2", "-i", str(jpg / "%03d.jpg"),
                        "-vf", "fps=15,format=yuv420p", "-c:v", "libx264", "-preset", "ultrafast", "-g", "15",
                        str(clip)], check=True)
    return {"jpg": jpg, "held": held, "clip": clip}


@pytest.fixture(scope="module")
def model_path(tmp_path_factory, tiny_onnx):
    """A real fused model (tiny backbone) trained on pictures of the three classes."""
    tmp = tmp_path_factory.mktemp("streams_model")
    data = tmp / "data"
    for k, c in enumerate(CLASSES):
        (data / c).mkdir(parents=True)
        for i in range(8):
            cv2.imwrite(str(data / c / f"{i}.jpg"), picture(k, 100 * k + i))
    r = CliRunner().invoke(main, ["train-head", str(data), "--backbone", str(tiny_onnx), "--cache", str(tmp / "cache"),
                                  "-o", str(tmp / "out")])
    assert r.exit_code == 0, r.output
    return tmp / "out" / "model.onnx"


def test_the_test_pictures_change_class(model_path, media):
    """The streams below show the classes in turn, so that a stream's class changes (events) as it plays."""
    m = runtime.load_model(model_path)
    got = [top[0][0] for _, top, _ in runtime.predict(m, sorted(media["jpg"].glob("*.jpg")))]
    assert sum(g == CLASSES[i % 3] for i, g in enumerate(got)) >= 9 and set(got) == set(CLASSES), got


class Collector:
    """Consumes a Streams' results on a thread: rows with their arrival time."""

    def __init__(self, hub):
        self.rows, self.hub = [], hub
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self):
        for row in self.hub.results():
            if row is not None:
                self.rows.append((time.monotonic(), row))

    def count(self, name, since=0.0, until=float("inf")):
        return sum(1 for t, r in self.rows if r["stream"] == name and since <= t < until)


def wait_for(cond, timeout, what):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class Webhook:
    """A real HTTP receiver of events on a loopback port."""

    def __init__(self, port=None):
        self.events, outer = [], self

        class H(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                outer.events.append((time.monotonic(), json.loads(self.rfile.read(int(self.headers["Content-Length"])))))
                self.send_response(204)
                self.end_headers()

        self.port = port or free_port()
        self.srv = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), H)
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.port}/hook"

    def close(self):
        self.srv.shutdown()
        self.srv.server_close()


# --- sources, names, the streams file -----------------------------------------------------------------

def test_sources_names_and_streams_file(tmp_path, media):
    clip = media["jpg"] / "000.jpg"
    got = streams.parse_sources([f"door={'rtsp://u:secret@127.0.0.1:1/live'}", "rtsp://127.0.0.1:1/cam/front",
                                 str(media["jpg"]), str(media["jpg"])], cameras=[3])
    assert [s.name for s in got] == ["door", "front", "jpg", "jpg-2", "camera3"]
    assert [s.kind for s in got] == ["stream", "stream", "files", "files", "camera"]
    assert got[0].live and not got[2].live and got[0].retries is None
    st = streams.Stream(type("H", (), {"t0": 0.0})(), got[0])
    assert "secret" not in st.shown() and st.shown() == "rtsp://u:***@127.0.0.1:1/live"
    toml = tmp_path / "s.toml"
    toml.write_text(f'[[stream]]\nname = "a"\nsource = "{clip}"\nrealtime = false\n\n'
                    '[[stream]]\nname = "b"\ncamera = 1\nretries = 4\n')
    a, b = streams.parse_sources(streams_file=str(toml))
    assert (a.name, a.kind, a.live, b.kind, b.target, b.retries) == ("a", "files", False, "camera", 1, 4)
    for text, msg in [('[[stream]]\nname = "a"\nsorce = "x"\n', "unknown key 'sorce'"),
                      ('[[stream]]\nname = "a"\n', "exactly one of source"),
                      ('[[stream]]\nname = "a b"\ncamera = 0\n', "use letters, digits"),
                      ('[[stream]]\nname = "a"\ncamera = 0\n[[stream]]\nname = "a"\ncamera = 1\n', "two streams are named"),
                      ("[[stream]\n", "not valid TOML"), ("[cams]\n", "unknown table 'cams'")]:
        toml.write_text(text)
        with pytest.raises(streams.SourceError, match=msg):
            streams.parse_sources(streams_file=str(toml))
    with pytest.raises(streams.SourceError, match="no such file"):
        streams.parse_sources([str(tmp_path / "missing.mp4"), "rtsp://127.0.0.1:1/x"])


def test_cli_usage_errors_are_one_line(model_path, tmp_path):
    def run(*args):
        r = CliRunner().invoke(main, ["run", "--model", str(model_path), *map(str, args)])
        return r.exit_code, r.output.strip()

    code, out = run("--source", tmp_path / "missing.mp4", "--source", "rtsp://127.0.0.1:1/x", "--headless")
    assert code == 1 and out.startswith("Error: no such file") and len(out.splitlines()) == 1
    code, out = run("--source", "rtsp://127.0.0.1:1/a", "--source", "rtsp://127.0.0.1:1/b")
    assert code == 2 and "add --headless" in out
    code, out = run("--source", "rtsp://127.0.0.1:1/a", "--source", "rtsp://127.0.0.1:1/b", "--save", tmp_path / "x.mp4")
    assert code == 2 and "--save works with one source" in out
    code, out = run("--source", "rtsp://127.0.0.1:1/a", "--mqtt", "mqtt://127.0.0.1/a/#")
    assert code == 1 and "without + or #" in out
    code, out = run("--source", "rtsp://127.0.0.1:1/a", "--webhook", "ftp://x/y")
    assert code == 1 and "http:// or https://" in out
    code, out = run("--source", "rtsp://127.0.0.1:1/a", "--stats", "1", "--hold", "soon")
    assert code == 1 and "--hold 'soon'" in out


def test_paho_missing_is_one_line():
    code = ("import sys; sys.modules['paho'] = None; from edgetl.deploy import events\n"
            "try:\n    events.MqttSink('mqtt://127.0.0.1:1/t')\nexcept events.EventError as e:\n    print(e)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "--mqtt needs the events extra (paho-mqtt is not installed): pip install 'edgetl[events]'"


def test_deploy_streams_and_events_do_not_import_torch():
    code = ("import sys, edgetl.deploy.streams, edgetl.deploy.events; "
            "bad = [k for k in sys.modules if k.split('.')[0] in ('torch', 'torchvision', 'timm', 'onnx', 'PIL')]; "
            "print(bad)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "[]", r.stderr


# --- events: debounce and the bounded buffer ------------------------------------------------------------

def test_debouncer_holds_and_does_not_flap():
    d = events.Debouncer(["cat", "dog"], threshold=0.6, hysteresis=0.1, hold=events.Hold(frames=3))
    seq = [(0.9, 0.1)] * 3 + [(0.55, 0.45)] * 5 + [(0.45, 0.55)] * 2 + [(0.2, 0.8)] * 3 + [(0.45, 0.55)] * 3
    changes = [(i, c) for i, p in enumerate(seq) if (c := d.update(np.array(p), float(i)))]
    # cat after 3 frames; 0.55 stays cat (above 0.6 - 0.1); dog needs 3 frames; 0.55 keeps dog
    assert [(i, c[:2]) for i, c in changes] == [(2, (None, "cat")), (12, ("cat", "dog"))]
    d2 = events.Debouncer(["cat", "dog"], threshold=0.6, hysteresis=0.1, hold=events.Hold.parse("0.5s"))
    out = [d2.update(np.array([0.9, 0.1]), t) for t in (0.0, 0.2, 0.4, 0.6)]
    assert out[:3] == [None, None, None] and out[3][:2] == (None, "cat")
    assert d2.update(np.array([0.3, 0.4]), 0.7) is None  # below 0.5 for cat, dog under threshold: unknown pending
    assert d2.update(np.array([0.3, 0.4]), 1.3)[:2] == ("cat", "unknown")


def test_event_buffer_is_bounded_never_blocks_and_delivers_in_order_later():
    port = free_port()
    logs = []
    sink = events.WebhookSink(f"http://127.0.0.1:{port}/hook", limit=5, log=logs.append, backoff_max=0.3).start()
    t = time.perf_counter()
    for i in range(1, 13):
        sink.put(events.event("door", "a", "b", 0.9, i, "0" * 64, i))
    assert time.perf_counter() - t < 0.05  # never blocks on a receiver that is not there
    wait_for(lambda: sink.dropped >= 7 and sink.stats()["down"], 5, "drops and a failed delivery")
    hook = Webhook(port)
    try:
        wait_for(lambda: sink.delivered >= 5, 10, "delivery after the receiver came up")
        seqs = [e["seq"] for _, e in hook.events]
        assert seqs == [8, 9, 10, 11, 12] and sink.dropped == 7 and sink.stats()["waiting"] == 0
        assert any("cannot deliver" in x for x in logs) and any("dropping the oldest" in x for x in logs), logs
        assert any("delivering again" in x for x in logs), logs
    finally:
        sink.close(1)
        hook.close()


# --- real streams ---------------------------------------------------------------------------------------

@need_ffmpeg
def test_cli_several_streams_json_lines_and_stats(model_path, media):
    """RTSP (ffmpeg), MJPEG over HTTP, a video file at its frame rate and a folder, side by side."""
    with servers(stream_server("rtsp", media["clip"]), stream_server("mjpeg", media["jpg"], 10)) as (rtsp, mj):
        r = subprocess.run([sys.executable, "-m", "edgetl.cli", "run", "--model", str(model_path),
                            "--source", f"cam1=rtsp://127.0.0.1:{rtsp.port}/live",
                            "--source", f"cam2=http://127.0.0.1:{mj.port}/video.mjpg", "--source", str(media["clip"]),
                            "--source", f"photos={media['jpg']}", "--headless", "--stats", "1",
                            "--max-frames", "200"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in r.stdout.splitlines()]
    assert len(rows) == 200 and {x["stream"] for x in rows} == {"cam1", "cam2", "clip", "photos"}
    for name in ("cam1", "cam2", "clip", "photos"):
        frames = [x["frame"] for x in rows if x["stream"] == name]
        assert frames == sorted(frames) and len(set(frames)) == len(frames)  # each stream in its own order
    assert [x["frame"] for x in rows if x["stream"] == "photos"] == list(range(12))  # a folder: every photo
    assert set(rows[0]) == {"stream", "frame", "t", "label", "prob", "top", "latency_ms"}
    err = r.stderr.splitlines()
    assert any(x.startswith("stats cam1: up, in ") for x in err), r.stderr
    assert err[-1].startswith("200 frames from 4 streams") and "Traceback" not in r.stderr


@need_ffmpeg
def test_a_stream_whose_server_dies_reconnects_and_its_events_resume(model_path, media):
    model = runtime.load_model(model_path, spin=False)
    hook = Webhook()
    rtsp, mj = stream_server("rtsp", media["clip"]), stream_server("mjpeg", media["jpg"], 10)
    logs = []
    with servers(rtsp, mj):
        srcs = streams.parse_sources([f"cam=rtsp://127.0.0.1:{rtsp.port}/live", f"other=http://127.0.0.1:{mj.port}/"])
        hub = streams.Streams(model, srcs, hold=events.Hold(2), backoff_max=1.0, silence=3.0, log=logs.append,
                              sinks=[events.WebhookSink(hook.url, backoff_max=0.3, log=logs.append)])
        col = Collector(hub.start())
        try:
            wait_for(lambda: col.count("cam") >= 30 and any(e["stream"] == "cam" for _, e in hook.events), 30,
                     "frames and events from the RTSP stream")
            t_kill = time.monotonic()
            rtsp.kill()
            wait_for(lambda: hub.by_name["cam"].state == "down", 10, "the loss to be seen")
            time.sleep(2.0)
            rtsp.start()
            t_up = time.monotonic()
            wait_for(lambda: col.count("cam", since=t_up) > 0, 15, "the stream to come back")
            back = min(t for t, r in col.rows if r["stream"] == "cam" and t >= t_up) - t_up
            wait_for(lambda: any(e["stream"] == "cam" and t > t_up for t, e in hook.events), 15, "events to resume")
            during = col.count("other", since=t_kill + 0.5, until=t_up)
            before = col.count("other", until=t_kill) / (t_kill - col.rows[0][0])
        finally:
            hub.stop()
            hook.close()
    # the attempt comes within the backoff bound (1 s); then ffmpeg publishes again and a keyframe arrives
    assert back < 1.0 + 4.0, back
    assert hub.by_name["cam"].reconnects == 1 and hub.by_name["other"].reconnects == 0
    assert during >= 0.8 * before * (t_up - t_kill - 0.5), (during, before)  # the other stream did not dip
    lost = [x for x in logs if x.startswith("stream cam: lost")]
    assert len(lost) == 1 and sum(x.startswith("stream cam: back after") for x in logs) == 1, logs
    seqs = [e["seq"] for _, e in hook.events]
    assert seqs == sorted(seqs) and len(seqs) == len(set(seqs))
    assert all(e["model_sha256"] == hub.model_sha256 and len(e["model_sha256"]) == 64 for _, e in hook.events)


@need_mosquitto
@need_ffmpeg
def test_broker_down_inference_goes_on_and_events_arrive_in_order(model_path, media, tmp_path):
    import paho.mqtt.client as mqtt

    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    broker = Server(MOSQUITTO, "-c", conf, port=port)
    got, lock = [], threading.Lock()

    def on_connect(c, u, f, rc, p):
        c.subscribe("home/edgetl/#", qos=1)

    def on_message(c, u, msg):
        with lock:
            got.append((msg.topic, msg.payload.decode(), msg.retain))

    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="test-sub")
    sub.on_connect, sub.on_message = on_connect, on_message
    sub.reconnect_delay_set(0.1, 0.5)
    model = runtime.load_model(model_path, spin=False)
    mj = stream_server("mjpeg", media["held"], 15)
    logs = []
    with servers(broker, mj):
        sub.connect("127.0.0.1", port, keepalive=5)
        sub.loop_start()
        sink = events.MqttSink(f"mqtt://127.0.0.1:{port}/home/edgetl", log=logs.append, backoff_max=1.0)
        hub = streams.Streams(model, streams.parse_sources([f"door=http://127.0.0.1:{mj.port}/"]),
                              hold=events.Hold(2), sinks=[sink], log=logs.append)
        col = Collector(hub.start())
        try:
            wait_for(lambda: sink.delivered >= 2, 30, "events delivered")
            broker.kill()
            n_before, e_before = col.count("door"), hub.events_sent
            wait_for(lambda: hub.events_sent >= e_before + 3, 30, "events while the broker is down")
            assert col.count("door") > n_before + 20  # inference went on
            assert sink.stats()["waiting"] >= 1 and sink.stats()["down"]
            broker.start()
            wait_for(lambda: sink.stats()["waiting"] == 0 and sink.delivered >= e_before + 3, 30, "the backlog")
            time.sleep(0.5)
        finally:
            hub.stop()
            sub.loop_stop()
    ev_msgs = [json.loads(p) for t, p, _ in got if t == "home/edgetl/door/event"]
    seqs = list(dict.fromkeys(e["seq"] for e in ev_msgs))  # QoS 1: a resend after the loss may repeat one
    assert seqs == list(range(1, seqs[-1] + 1)) and seqs[-1] >= e_before + 3, seqs  # all of them, in order
    assert all(e["stream"] == "door" and e["to"] in (*CLASSES, "unknown") for e in ev_msgs)
    states = [json.loads(p) for t, p, _ in got if t == "home/edgetl/door/state"]
    assert states and states[-1]["class"] == ev_msgs[-1]["to"]
    assert ("home/edgetl/status", "online", False) in got or any(t == "home/edgetl/status" for t, _, _ in got)
    assert any("mqtt: cannot deliver" in x for x in logs) and any("mqtt: delivering again" in x for x in logs)


def _default_sigint():
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@need_ffmpeg
def test_bad_sources_are_one_line_each_and_sigterm_ends_within_2s(model_path, media):
    """A port nobody listens on, a URL that answers garbage and a stream whose first frame comes after a
    minute: one line each, the good stream unaffected; SIGTERM ends everything within 2 s."""
    good, garbage, slow = stream_server("mjpeg", media["jpg"], 10), stream_server("garbage"), \
        stream_server("slow", media["jpg"], 10)
    with servers(good, garbage, slow):
        proc = subprocess.Popen([sys.executable, "-m", "edgetl.cli", "run", "--model", str(model_path),
                                 "--source", f"good=http://127.0.0.1:{good.port}/",
                                 "--source", f"refused=rtsp://127.0.0.1:{free_port()}/live",
                                 "--source", f"garbage=http://127.0.0.1:{garbage.port}/",
                                 "--source", f"slow=http://127.0.0.1:{slow.port}/", "--headless", "--backoff-max", "1"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)
        rows = []
        t0 = time.monotonic()
        while time.monotonic() - t0 < 9:
            line = proc.stdout.readline()
            assert line, proc.stderr.read()
            rows.append(json.loads(line))
        proc.send_signal(signal.SIGTERM)
        t_sig = time.monotonic()
        rest, err = proc.communicate(timeout=30)
        took = time.monotonic() - t_sig
    assert proc.returncode == 143 and took < 2.0 + 0.5, (proc.returncode, took, err)  # 0.5: interpreter exit
    assert {r["stream"] for r in rows} == {"good"} and len(rows) >= 50  # 10 fps for 9 s, minus the start
    lines = [x for x in err.splitlines() if x.startswith("stream ") and " of " not in x and "still in a read" not in x]
    for name in ("refused", "garbage", "slow"):
        mine = [x for x in lines if x.startswith(f"stream {name}:")]
        assert len(mine) == 1 and "cannot open" in mine[0], (name, err)
    assert not [x for x in lines if x.startswith("stream good:")] and "terminated (SIGTERM)" in err
    assert "Traceback" not in err and "[tcp @" not in err and "[http @" not in err
