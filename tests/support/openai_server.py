"""Helpers of the server tests: a uvicorn server in a thread, its metrics, and OpenAI-shaped errors."""

import contextlib
import re
import socket
import threading
import time

import httpx
import uvicorn

from pagedformers.entrypoints.async_engine import AsyncLLM


@contextlib.contextmanager
def running_server(app):
    """uvicorn on 127.0.0.1 in a background thread; the socket is bound first, so no port race."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def metric(server: str, name: str, labels: str = "") -> float:
    text = httpx.get(f"{server}/metrics").text
    match = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def wait_until_idle(server: str, engine: AsyncLLM) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        gauges = [metric(server, f"pagedformers:{g}") for g in
                  ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc")]
        if gauges == [0.0, 0.0, 0.0] and not engine.engine.has_unfinished_requests():
            return
        time.sleep(0.02)
    raise AssertionError(f"the engine still holds requests or blocks: {gauges}")


def assert_openai_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == status and error["message"]
    if param is not None:
        assert error["param"] == param
    return error
