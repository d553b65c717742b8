"""Real servers on localhost for the remote-slide tests and benchmark (no mocks of what is tested).

* :class:`RangeServer`: an HTTP/1.1 file server that honours ``Range`` requests (``206 Partial
  Content``), with keep-alive, as web servers and CDNs serve slides;
* :class:`Proxy`: an HTTP proxy in front of another server (moto's S3), forwarding every request
  as it is (signatures stay valid);
* :func:`moto_server`: moto's S3 API server in its own process, with IAM authentication on, so that
  wrong credentials are refused as S3 refuses them.

Both HTTP servers count the requests they answer and can add latency to each and answer chosen
requests with an error status (``fail``), which is how throttling (503 ``SlowDown``) and outages
are injected.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

_RANGE = re.compile(r"bytes=(\d*)-(\d*)$")


class _Faults:
    """Requests counted, latency added, errors injected (thread-safe)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: list[tuple[str, str, str]] = []  # (method, path, Range header)
        self.agents: list[str] = []  # the User-Agent header of each request, in the same order
        self.latency_s = 0.0
        self._failures: list[list[Any]] = []  # [substring, status, times left, code]

    def fail(self, substring: str, status: int, times: int, code: str = "SlowDown") -> None:
        """Answer the next ``times`` requests whose path contains ``substring`` with ``status``."""
        with self.lock:
            self._failures.append([substring, status, times, code])

    def reset(self) -> None:
        with self.lock:
            self.requests.clear()
            self.agents.clear()
            self._failures.clear()

    def count(self, method: str | None = None, substring: str = "") -> int:
        with self.lock:
            return sum(
                1 for m, p, _ in self.requests if (method is None or m == method) and substring in p
            )

    def admit(self, method: str, path: str, range_: str, agent: str = "") -> tuple[int, str] | None:
        """Record a request; the (status, code) to fail it with, or None."""
        with self.lock:
            self.requests.append((method, path, range_))
            self.agents.append(agent)
            latency = self.latency_s
            failure = None
            for entry in self._failures:
                if entry[0] in path and entry[2] > 0:
                    entry[2] -= 1
                    failure = (entry[1], entry[3])
                    break
        if latency:
            time.sleep(latency)
        return failure


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: clients reuse their connections
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _control(self) -> bool:
        """Answer the test's control requests (``/__control__/...``; not counted)."""
        if not self.path.startswith("/__control__/"):
            return False
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length) or b"{}") if length else {}
        faults = self.server.faults
        command = self.path[len("/__control__/") :]
        answer: Any = None
        if command == "fail":
            faults.fail(body["substring"], int(body["status"]), int(body["times"]), body.get("code", "SlowDown"))
        elif command == "reset":
            faults.reset()
        elif command == "latency":
            faults.latency_s = float(body["seconds"])
        elif command == "agents":
            with faults.lock:
                answer = list(faults.agents)
        elif command == "requests":
            with faults.lock:
                answer = list(faults.requests)
        payload = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)
        return True

    def _injected(self) -> bool:
        if self._control():
            return True
        failure = self.server.faults.admit(
            self.command, self.path, self.headers.get("Range", ""), self.headers.get("User-Agent", "")
        )
        if failure is None:
            return False
        status, code = failure
        body = (
            f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
            f"<Message>injected by the test server</Message></Error>"
        ).encode()
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body) if self.command != "HEAD" else 0))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        return True


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    faults: _Faults


class _FileHandler(_Handler):
    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def do_POST(self) -> None:  # control requests only
        if not self._control():
            self.send_response(405)
            self.send_header("Content-Length", "0")
            self.end_headers()

    def _serve(self, body: bool) -> None:
        if self._injected():
            return
        root: Path = self.server.root  # type: ignore[attr-defined]
        file = (root / self.path.split("?", 1)[0].lstrip("/")).resolve()
        if root.resolve() not in file.parents or not file.is_file():
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        size = file.stat().st_size
        start, end = 0, size
        match = _RANGE.match(self.headers.get("Range", ""))
        if "norange" in self.path:  # a server that ignores Range and sends the whole file
            match = None
        if match and (match.group(1) or match.group(2)):
            if match.group(1):
                start = int(match.group(1))
                end = min(size, int(match.group(2)) + 1) if match.group(2) else size
            else:  # the last N bytes
                start = max(0, size - int(match.group(2)))
            if start >= size:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        else:
            self.send_response(200)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start))
        self.send_header("ETag", f'"{file.stat().st_mtime_ns:x}-{size:x}"')
        self.end_headers()
        if body:
            with open(file, "rb") as handle:
                handle.seek(start)
                self.wfile.write(handle.read(end - start))


class _ProxyHandler(_Handler):
    def _forward(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if self._injected():
            return
        payload = self.rfile.read(length) if length else None
        host, port = self.server.target  # type: ignore[attr-defined]
        local = self.server.local  # type: ignore[attr-defined]
        connection = getattr(local, "connection", None)
        if connection is None:
            connection = local.connection = http.client.HTTPConnection(host, port, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "keep-alive")}
        try:
            connection.request(self.command, self.path, body=payload, headers=headers)
            response = connection.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException):
            local.connection = None
            connection.close()
            raise
        self.send_response(response.status)
        for key, value in response.getheaders():
            if key.lower() not in ("connection", "keep-alive", "transfer-encoding", "content-length", "server", "date"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(data) if self.command != "HEAD" else response.getheader("Content-Length") or 0))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward


@dataclass
class _Running:
    server: _Server
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def faults(self) -> _Faults:
        return self.server.faults

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


def _start(handler: type[_Handler], **attributes: Any) -> _Running:
    server = _Server(("127.0.0.1", 0), handler)
    server.faults = _Faults()
    for key, value in attributes.items():
        setattr(server, key, value)
    thread = threading.Thread(target=server.serve_forever, name="test-http-server", daemon=True)
    thread.start()
    return _Running(server, thread)


class _Controls:
    """The faults of a server running in another process, driven by its control requests."""

    def __init__(self, url: str) -> None:
        self._url = url

    def _post(self, command: str, body: dict[str, Any] | None = None) -> Any:
        request = urllib.request.Request(
            f"{self._url}/__control__/{command}", data=json.dumps(body or {}).encode(), method="POST"
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def fail(self, substring: str, status: int, times: int, code: str = "SlowDown") -> None:
        """Answer the next ``times`` requests whose path contains ``substring`` with ``status``."""
        self._post("fail", {"substring": substring, "status": status, "times": times, "code": code})

    def reset(self) -> None:
        """Forget the requests counted and the failures still to inject."""
        self._post("reset")

    @property
    def requests(self) -> list[tuple[str, str, str]]:
        """(method, path, Range header) of every request answered since the last reset."""
        return [tuple(r) for r in self._post("requests")]  # type: ignore[misc]

    def count(self, method: str | None = None, substring: str = "") -> int:
        return sum(1 for m, p, _ in self.requests if (method is None or m == method) and substring in p)

    @property
    def agents(self) -> list[str]:
        """The User-Agent of every request answered since the last reset (as ``requests``)."""
        return list(self._post("agents"))

    @property
    def latency_s(self) -> float:
        raise AttributeError("latency_s can only be set")

    @latency_s.setter
    def latency_s(self, seconds: float) -> None:
        self._post("latency", {"seconds": seconds})


@dataclass
class Served:
    """A server in its own process (as real servers are: a DataLoader worker forked from the test
    never holds its sockets)."""

    process: subprocess.Popen[str]
    url: str

    @property
    def faults(self) -> _Controls:
        return _Controls(self.url)

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()


def _serve(*arguments: str) -> Served:
    process = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), *arguments],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line.strip().isdigit():
        process.kill()
        raise RuntimeError(f"test server {arguments} did not start: {line!r}")
    return Served(process, f"http://127.0.0.1:{int(line)}")


def range_server(root: Path) -> Served:
    """An HTTP server of the files under ``root`` that honours Range requests (its own process)."""
    return _serve("range", str(Path(root).resolve()))


def proxy(target_url: str) -> Served:
    """An HTTP proxy in front of ``target_url`` (``http://host:port``; its own process)."""
    return _serve("proxy", target_url)


def _main(kind: str, argument: str) -> None:
    if kind == "range":
        running = _start(_FileHandler, root=Path(argument))
    else:
        host, port = argument.rsplit("//", 1)[1].split(":")
        running = _start(_ProxyHandler, target=(host, int(port)), local=threading.local())
    print(running.port, flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        running.thread.join()


# -- moto's S3 ------------------------------------------------------------------------------------


@dataclass
class Moto:
    """A running moto server: its endpoint and the key of a user allowed ``s3:*``."""

    endpoint: str
    key: str
    secret: str
    process: subprocess.Popen[bytes]

    def client(self, endpoint: str | None = None, secret: str | None = None) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=endpoint or self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=self.key,
            aws_secret_access_key=secret or self.secret,
        )

    def storage_options(self, endpoint: str | None = None, secret: str | None = None) -> dict[str, Any]:
        return {"key": self.key, "secret": secret or self.secret, "endpoint_url": endpoint or self.endpoint}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# Actions moto answers before it starts checking signatures: the three IAM calls below.
_SETUP_ACTIONS = 3


@contextlib.contextmanager
def moto_server(module: str = "moto.server", cwd: Path | None = None) -> Iterator[Moto]:
    """moto's S3 server (``python -m moto.server``, or ``module`` taking its arguments, run in
    ``cwd``) with IAM authentication, and a user with a key allowed ``s3:*``; stopped on exit."""
    import boto3

    port = _free_port()
    env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT=str(_SETUP_ACTIONS))
    for name in list(env):
        if name.startswith("AWS_"):
            del env[name]
    process = subprocess.Popen(
        [sys.executable, "-m", module, "-H", "127.0.0.1", "-p", str(port)],
        env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(endpoint + "/moto-api/", timeout=2).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start (exit code {process.poll()})") from None
                time.sleep(0.05)
        iam = boto3.client(
            "iam", endpoint_url=endpoint, region_name="us-east-1",
            aws_access_key_id="setup", aws_secret_access_key="setup",
        )  # fmt: skip
        iam.create_user(UserName="reader")
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
        iam.put_user_policy(UserName="reader", PolicyName="s3", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName="reader")["AccessKey"]
        yield Moto(endpoint, key["AccessKeyId"], key["SecretAccessKey"], process)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


if __name__ == "__main__":
    _main(sys.argv[1], sys.argv[2])
