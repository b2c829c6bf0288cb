"""A real server on a free loopback port, in a thread of the test process, over the tiny pretrained run."""

import socket
import threading
import time

import pytest

API_KEY = "test-key"


def start_server(ckpt, **job):
    import uvicorn

    from babyllama.serve.stage import ServeJob, build

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app, batcher = build(ServeJob(ckpt=str(ckpt), port=port, model_name="tiny", **job))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.05)

    def stop():
        server.should_exit = True
        thread.join(timeout=10)
        batcher.close()

    return f"http://127.0.0.1:{port}", batcher, stop


@pytest.fixture(scope="package")
def server(float_run):
    """(base URL, batcher) of a server with an API key and 4 rows."""
    url, batcher, stop = start_server(float_run, api_key=API_KEY, max_batch=4, max_queue=8)
    yield url, batcher
    stop()
