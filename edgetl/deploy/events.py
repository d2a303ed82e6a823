"""Events, not frames: a change of a stream's class, debounced, published to MQTT and/or a webhook.

`Debouncer` turns a stream's smoothed probabilities into a state that changes only when a class has
held for `hold` frames or seconds, with hysteresis on the threshold (a class enters at `threshold`
and leaves below `threshold - hysteresis`; another class must beat it by `hysteresis`). Each change is
one event (a dict, see `event`). A `Sink` delivers events in order from a bounded buffer on a thread
of its own: `put` never blocks; while the broker or the webhook is down the buffer keeps the newest
`limit` events (the oldest are dropped and counted) and delivers them in order when it returns.
Torch-free; MQTT needs the `events` extra (paho-mqtt).
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import datetime
import json
import os
import random
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import numpy as np

from edgetl.deploy.video import UNKNOWN
from edgetl.errors import EdgetlError


class EventError(EdgetlError):
    pass


@dataclasses.dataclass(frozen=True)
class Hold:
    """How long a new class must hold before it is the state: `frames` frames or `seconds` seconds."""

    frames: int = 0
    seconds: float = 0.0

    @classmethod
    def parse(cls, text: str) -> "Hold":
        """'5' → 5 frames; '1.5s' → 1.5 seconds. EventError otherwise."""
        t = str(text).strip().lower()
        try:
            if t.endswith("s"):
                v = float(t[:-1])
                if v < 0 or v != v:
                    raise ValueError
                return cls(seconds=v)
            v = int(t)
            if v < 1:
                raise ValueError
            return cls(frames=v)
        except ValueError:
            raise EventError(f"--hold {text!r}: give frames (e.g. 5) or seconds (e.g. 1.5s)") from None

    def __str__(self) -> str:
        return f"{self.seconds:g}s" if self.seconds else f"{self.frames} frames"


class Debouncer:
    """A stream's state from its smoothed probabilities. `update` returns (from, to, prob) on a change,
    else None. The first stable class is a change from None."""

    def __init__(self, classes: list[str], threshold: float = 0.0, hysteresis: float = 0.05, hold: Hold = Hold(3)):
        self.classes, self.threshold, self.hysteresis, self.hold = classes, threshold, hysteresis, hold
        self.state: str | None = None
        self.prob = 0.0
        self.since: float | None = None  # when the state began (seconds, the caller's clock)
        self._candidate: str | None = None
        self._count = 0
        self._t0 = 0.0

    def _label(self, probs: np.ndarray) -> tuple[str, float]:
        top = int(np.argmax(probs))
        p_top = float(probs[top])
        cur = self.state
        if cur is not None and cur != UNKNOWN:
            p_cur = float(probs[self.classes.index(cur)])
            if p_cur >= self.threshold - self.hysteresis and (top == self.classes.index(cur)
                                                              or p_top < p_cur + self.hysteresis):
                return cur, p_cur  # hysteresis: the current class stays until it clearly loses
        if p_top >= self.threshold:
            return self.classes[top], p_top
        return UNKNOWN, p_top

    def update(self, probs: np.ndarray, t: float):
        label, p = self._label(probs)
        if label == self.state:
            self._candidate, self._count, self.prob = None, 0, p
            return None
        if label != self._candidate:
            self._candidate, self._count, self._t0 = label, 0, t
        self._count += 1
        held = (self._count >= self.hold.frames) if self.hold.frames else (t - self._t0 >= self.hold.seconds)
        if not held:
            return None
        old, self.state, self.prob, self.since = self.state, label, p, t
        self._candidate, self._count = None, 0
        return old, label, p


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def event(stream: str, old: str | None, new: str, prob: float, frame: int, model_sha256: str, seq: int,
          snapshot_jpeg: bytes | None = None) -> dict:
    """The event: what every sink delivers (MQTT payload, webhook body), as a JSON object."""
    e = {"stream": stream, "from": old, "to": new, "prob": round(float(prob), 6), "time": now_iso(), "frame": frame,
         "seq": seq, "model_sha256": model_sha256}
    if snapshot_jpeg is not None:
        e["snapshot_jpeg"] = base64.b64encode(snapshot_jpeg).decode("ascii")
    return e


def backoff_delay(attempt: int, base: float, cap: float) -> float:
    """Exponential backoff with jitter, bounded: in [0.5, 1] × min(cap, base × 2^attempt)."""
    return min(cap, base * (2 ** min(attempt, 30))) * (0.5 + 0.5 * random.random())


class Sink:
    """A bounded, ordered event buffer with a delivery thread. Subclasses implement `_deliver`
    (True: done with this event; False: keep it and try again after a backoff) and `_ready`."""

    what = "events"
    retry_max = 0.0  # the longest wait between two tries of one event (0: backoff_max)

    def __init__(self, limit: int = 1000, log=lambda line: None, backoff_max: float = 10.0):
        self.limit, self.log, self.backoff_max = max(1, limit), log, backoff_max
        self.buffer: collections.deque = collections.deque()
        self.delivered = 0
        self.dropped = 0  # buffer full: the oldest event was dropped
        self.rejected = 0  # the receiver refused the event (HTTP 4xx): not retried
        self._cond = threading.Condition()
        self._closing = False
        self._head_busy = False  # the oldest event is being delivered: it is not the one dropped
        self._down = False
        self._thread = threading.Thread(target=self._loop, name=f"edgetl-{self.what}", daemon=True)

    def start(self) -> "Sink":
        self._thread.start()
        return self

    def put(self, ev: dict) -> None:
        """Queue an event; never blocks. A full buffer drops its oldest event (counted)."""
        with self._cond:
            if len(self.buffer) >= self.limit:
                idx = 1 if self._head_busy and len(self.buffer) > 1 else 0
                del self.buffer[idx]
                if not self.dropped:
                    self.log(f"{self.what}: buffer full ({self.limit} events); dropping the oldest")
                self.dropped += 1
            self.buffer.append(dict(ev))  # a copy: each sink marks its own
            self._cond.notify_all()

    def _loop(self) -> None:
        attempt = 0
        while True:
            with self._cond:
                while not self.buffer and not self._closing:
                    self._cond.wait()
                if not self.buffer:
                    return
                ev = self.buffer[0]
                self._head_busy = True
            try:
                ok = self._deliver(ev)
            except Exception as e:  # noqa: BLE001 - a peer that lies costs one line, never the loop
                self._lost(f"{type(e).__name__}: {e}")
                ok = False
            with self._cond:
                self._head_busy = False
                if ok:
                    if self.buffer and self.buffer[0] is ev:
                        self.buffer.popleft()
                    attempt = 0
                    continue
                if self._closing and time.monotonic() > self._close_by:
                    return
            delay = backoff_delay(attempt, 0.2, self.retry_max or self.backoff_max)
            attempt += 1
            with self._cond:
                self._cond.wait_for(lambda: self._closing and time.monotonic() > self._close_by, delay)

    def _lost(self, why: str) -> None:
        if not self._down and not self._closing:
            self._down = True
            self.log(f"{self.what}: cannot deliver ({why}); keeping up to {self.limit} events and retrying")

    def _back(self) -> None:
        if self._down:
            self._down = False
            self.log(f"{self.what}: delivering again ({len(self.buffer)} events waiting)")

    def _deliver(self, ev: dict) -> bool:
        raise NotImplementedError

    def close(self, timeout: float = 2.0) -> None:
        """Deliver what is buffered for up to `timeout` seconds, then stop."""
        with self._cond:
            self._closing = True
            self._close_by = time.monotonic() + timeout
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout + 0.5)

    def stats(self) -> dict:
        return {"delivered": self.delivered, "waiting": len(self.buffer), "dropped": self.dropped,
                "rejected": self.rejected, "down": self._down}

    _close_by = float("inf")


def redact(url: str) -> str:
    """A URL without its password, for logs and stats."""
    try:
        p = urllib.parse.urlsplit(url)
    except ValueError:
        return url
    if p.password is None:
        return url
    host = p.hostname or ""
    netloc = f"{p.username}:***@{host}" + (f":{p.port}" if p.port else "")
    return urllib.parse.urlunsplit(p._replace(netloc=netloc))


class WebhookSink(Sink):
    """POST each event as JSON to `url`; 2xx delivers, 4xx rejects (one line, not retried), anything
    else (refused, timeout, 5xx) keeps it for a retry."""

    what = "webhook"

    def __init__(self, url: str, timeout: float = 5.0, **kw):
        p = urllib.parse.urlsplit(url)
        if p.scheme not in ("http", "https") or not p.hostname:
            raise EventError(f"--webhook {redact(url)}: give an http:// or https:// URL")
        super().__init__(**kw)
        self.url, self.timeout = url, timeout

    def _deliver(self, ev: dict) -> bool:
        req = urllib.request.Request(self.url, data=json.dumps(ev).encode(), method="POST",
                                     headers={"Content-Type": "application/json", "User-Agent": "edgetl"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                r.read(65536)
        except urllib.error.HTTPError as e:
            if 400 <= e.code < 500 and e.code not in (408, 429):
                self.rejected += 1
                self.log(f"webhook: {redact(self.url)} refused event {ev.get('seq')} (HTTP {e.code}); not retried")
                return True
            self._lost(f"HTTP {e.code}")
            return False
        except (urllib.error.URLError, OSError, ValueError) as e:
            self._lost(str(getattr(e, "reason", e)))
            return False
        self._back()
        self.delivered += 1
        return True


def parse_mqtt_url(url: str) -> tuple[str, int, str, str | None, str | None]:
    """mqtt://[USER:PASS@]HOST[:PORT]/TOPIC → (host, port, topic prefix, user, password)."""
    p = urllib.parse.urlsplit(url, allow_fragments=False)
    topic = p.path.strip("/")
    if p.scheme not in ("mqtt", "tcp") or not p.hostname:
        raise EventError(f"--mqtt {redact(url)}: give mqtt://HOST[:PORT]/TOPIC")
    if not topic or any(c in topic for c in "+#"):
        raise EventError(f"--mqtt {redact(url)}: give a topic prefix without + or # (e.g. mqtt://HOST/edgetl)")
    try:
        port = p.port or 1883
    except ValueError:
        raise EventError(f"--mqtt {redact(url)}: the port is not a number") from None
    return p.hostname, port, topic, p.username, p.password


class MqttSink(Sink):
    """Publish each event (QoS 1) to TOPIC/<stream>/event and the stream's state, retained, to
    TOPIC/<stream>/state; TOPIC/status is 'online' (retained), 'offline' as the last will. One event
    in flight at a time, each published once: paho resends it after a reconnect, so order holds."""

    what = "mqtt"
    retry_max = 0.5  # paho reconnects with its own backoff; an event waits only for the connection

    def __init__(self, url: str, keepalive: int = 10, **kw):
        self.host, self.port, self.topic, user, password = parse_mqtt_url(url)
        super().__init__(**kw)
        self.url = url
        self._acked: set[int] = set()
        self._ack = threading.Condition()
        self._client = self._connect(user, password, keepalive)

    def _connect(self, user, password, keepalive):
        try:
            import paho.mqtt.client as mqtt
        except ModuleNotFoundError:
            raise EventError("--mqtt needs the events extra (paho-mqtt is not installed): "
                             "pip install 'edgetl[events]'") from None
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"edgetl-{os.getpid()}-{random.randrange(1 << 30)}",
                        protocol=mqtt.MQTTv311)
        if user:
            c.username_pw_set(user, password)
        c.will_set(f"{self.topic}/status", "offline", qos=1, retain=True)
        c.reconnect_delay_set(0.2, max(1, int(self.backoff_max)))

        def on_connect(client, userdata, flags, reason, props):
            if not reason.is_failure:
                client.publish(f"{self.topic}/status", "online", qos=1, retain=True)
                self._back()
            else:
                self._lost(str(reason))

        def on_disconnect(client, userdata, flags, reason, props):
            self._lost(f"disconnected from {self.host}:{self.port}: {reason}")

        def on_connect_fail(client, userdata):
            self._lost(f"cannot connect to {self.host}:{self.port}")

        def on_publish(client, userdata, mid, reason, props):
            with self._ack:
                self._acked.add(mid)
                self._ack.notify_all()

        c.on_connect, c.on_disconnect, c.on_publish = on_connect, on_disconnect, on_publish
        c.on_connect_fail = on_connect_fail
        c.connect_async(self.host, self.port, keepalive)
        c.loop_start()
        return c

    def publish_state(self, stream: str, state: dict) -> None:
        """The stream's current state (retained), for subscribers that join later."""
        self._client.publish(f"{self.topic}/{stream}/state", json.dumps(state), qos=1, retain=True)

    def _deliver(self, ev: dict) -> bool:
        mid = ev.get("_mid")
        if mid is None and not self._client.is_connected():
            time.sleep(0.1)
            return False
        if mid is None:  # publish once; paho keeps and resends it across reconnects
            payload = {k: v for k, v in ev.items() if not k.startswith("_")}
            info = self._client.publish(f"{self.topic}/{ev['stream']}/event", json.dumps(payload), qos=1)
            mid = ev["_mid"] = info.mid
            state = {"class": ev["to"], "prob": ev["prob"], "since": ev["time"], "frame": ev["frame"]}
            self._client.publish(f"{self.topic}/{ev['stream']}/state", json.dumps(state), qos=1, retain=True)
        deadline = time.monotonic() + 1.0
        with self._ack:
            while mid not in self._acked:
                left = deadline - time.monotonic()
                if left <= 0 or self._closing and time.monotonic() > self._close_by:
                    return False  # not yet acknowledged: wait again (it is not published twice)
                self._ack.wait(left)
            self._acked.discard(mid)
        self.delivered += 1
        return True

    def close(self, timeout: float = 2.0) -> None:
        super().close(timeout)
        try:
            self._client.publish(f"{self.topic}/status", "offline", qos=1, retain=True)
            self._client.disconnect()
            self._client.loop_stop()
        except Exception:  # noqa: BLE001 - closing a connection that is already gone
            pass
