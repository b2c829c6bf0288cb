"""`babyllama serve` through the official `openai` client and raw HTTP: replies equal the Engine's,
streaming equals non-streaming, concurrent clients each get what they get alone, every bad request
gets OpenAI's error object with the right status and the server keeps serving, a client that goes
away frees its row."""

import json
import threading
import time

import httpx
import openai
import pytest

from babyllama.checkpoint import load_model
from babyllama.infer.engine import Engine
from babyllama.infer.sampling import SamplingConfig
from babyllama.tokenizer import load_tokenizer
from babyllama.tokenizer.chat import ChatTemplate, Message
from tests.serve.conftest import API_KEY, start_server

GREEDY = dict(temperature=0, extra_body={"repetition_penalty": 1.0})
QUESTIONS = ["你好", "今天天气怎么样？", "推荐一本书", "价格便宜吗", "物流很快", "这家店怎么样"]


@pytest.fixture(scope="module")
def client(server):
    url, _ = server
    return openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def engine(float_run):
    model, _ = load_model(float_run)
    return Engine(model, load_tokenizer(float_run / "tokenizer"), compile_step=False)


def _alone(engine, question, n=24):
    """The Engine's greedy reply ids and text, one request at a time."""
    template = ChatTemplate(engine.tokenizer)
    prompt = template.prompt_ids([Message("user", question)])
    greedy = SamplingConfig(temperature=0, repetition_penalty=1.0)
    ids = engine.generate([prompt], n, greedy, stop_ids=(template.end_id, engine.tokenizer.eos_id))[0]
    return ids, engine.tokenizer.decode(ids)


def test_models_health_and_a_chat_reply_equal_to_the_engine(client, server, engine):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    health = httpx.get(server[0] + "/health").json()
    assert health["status"] == "ok" and health["max_batch"] == 4
    ids, text = _alone(engine, "你好")
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "你好"}],
                                           max_tokens=24, **GREEDY)
    assert reply.choices[0].message.content == text and reply.choices[0].message.role == "assistant"
    assert reply.usage.completion_tokens == len(ids)
    assert reply.choices[0].finish_reason == ("length" if len(ids) == 24 else "stop")


def test_streaming_gives_the_same_text_and_usage(client):
    messages = [{"role": "system", "content": "你是助手。"}, {"role": "user", "content": "推荐一本书"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=20, **GREEDY)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=20, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # it streamed


def test_completions_n_seed_and_stop(client, engine):
    tok = engine.tokenizer
    prompt = [tok.eos_id] + tok.encode("今天天气")
    greedy = SamplingConfig(temperature=0, repetition_penalty=1.0)
    expected = tok.decode(engine.generate([prompt], 16, greedy, stop_ids=(tok.eos_id,))[0])
    got = client.completions.create(model="tiny", prompt="今天天气", max_tokens=16, **GREEDY)
    assert got.choices[0].text == expected
    sampled = dict(temperature=1.0, seed=7, n=3, max_tokens=12)
    a = client.completions.create(model="tiny", prompt="今天天气", **sampled)
    b = client.completions.create(model="tiny", prompt="今天天气", **sampled)
    assert [c.text for c in a.choices] == [c.text for c in b.choices] and len(a.choices) == 3
    assert len({c.text for c in a.choices}) > 1  # n draws, each its own seed
    stop = expected[2:4]
    cut = client.completions.create(model="tiny", prompt="今天天气", max_tokens=16, stop=[stop], **GREEDY)
    assert cut.choices[0].text == expected[:expected.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_concurrent_streams_each_get_what_they_get_alone(client, engine):
    expected = {q: _alone(engine, q)[1] for q in QUESTIONS}
    got = {}

    def ask(question):
        stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": question}],
                                                max_tokens=24, stream=True, **GREEDY)
        got[question] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    threads = [threading.Thread(target=ask, args=(q,)) for q in QUESTIONS]  # 6 clients, 4 rows: 2 wait, then join
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert got == expected


def _post(url, path, body=None, key=API_KEY, raw=None, headers=None):
    head = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {}), **(headers or {})}
    return httpx.post(url + path, content=raw if raw is not None else json.dumps(body), headers=head, timeout=60)


def test_every_bad_request_gets_an_error_object_and_the_server_goes_on(server, float_run):
    url, _ = server
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "你好"}], "max_tokens": 4}
    long_text = "今天天气很好。" * 200
    cases = [
        (dict(raw=b"{not json"), 400, "invalid_json"),
        (dict(body={**chat, "model": "gpt-4"}), 404, "model_not_found"),
        (dict(body={"model": "tiny"}), 400, None),
        (dict(body={**chat, "messages": []}), 400, None),
        (dict(body={**chat, "messages": [{"role": "user"}]}), 400, None),
        (dict(body={**chat, "messages": [{"role": "wizard", "content": "x"}]}), 400, None),
        (dict(body={**chat, "messages": [{"role": "user", "content": long_text}]}), 400, "context_length_exceeded"),
        (dict(body={**chat, "max_tokens": 0}), 400, None),
        (dict(body={**chat, "max_tokens": 100_000}), 400, "context_length_exceeded"),
        (dict(body={**chat, "temperature": 5}), 400, None),
        (dict(body={**chat, "n": 100}), 400, None),
        (dict(body={**chat, "stop": ["a", "b", "c", "d", "e"]}), 400, None),
        (dict(body=chat, key="wrong"), 401, "invalid_api_key"),
        (dict(body=chat, key=None), 401, "invalid_api_key"),
        (dict(raw=b'{"model": "tiny", "prompt": "' + b"x" * (2 << 20) + b'"}'), 413, "body_too_large"),
    ]
    for kwargs, status, code in cases:
        response = _post(url, "/v1/chat/completions", **kwargs)
        assert response.status_code == status, (kwargs.get("body"), response.text[:200])
        error = response.json()["error"]
        assert error["message"] and error["type"] and (code is None or error["code"] == code)
        assert _post(url, "/v1/chat/completions", chat).status_code == 200  # still serving
    chunked = httpx.post(url + "/v1/completions", content=(b"x" * (1 << 16) for _ in range(40)),
                         headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    assert chunked.status_code == 413 and chunked.json()["error"]["code"] == "body_too_large"
    missing = httpx.get(url + "/v1/nothing", headers={"Authorization": f"Bearer {API_KEY}"})
    assert missing.status_code == 404 and missing.json()["error"]["message"]
    completion = _post(url, "/v1/completions", {"model": "tiny", "prompt": long_text})
    assert completion.status_code == 400 and completion.json()["error"]["param"] == "prompt"


def test_a_client_that_goes_away_frees_its_row(server, monkeypatch):
    url, batcher = server
    step = batcher._step
    monkeypatch.setattr(batcher, "_step", lambda: (time.sleep(0.05), step()))  # 40 tokens: 2 s at least
    body = {"model": "tiny", "messages": [{"role": "user", "content": "你好"}], "max_tokens": 40, "stream": True,
            "temperature": 1.0, "seed": 1}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        while '"content": "' not in next(lines):  # the reply has started: its row is running
            pass
        assert batcher.load()["running"] == 1
        left = time.time()
    while batcher.load()["running"] and time.time() < left + 10:
        time.sleep(0.01)
    assert batcher.load()["running"] == 0 and time.time() - left < 1.0  # freed at once, not after 40 steps


def test_a_full_queue_answers_503_with_retry_after(float_run):
    url, batcher, stop = start_server(float_run, max_batch=1, max_queue=1)
    gate = threading.Event()
    admit = batcher._admit
    batcher._admit = lambda request: (gate.wait(30), admit(request))  # hold the worker: requests pile up
    try:
        body = {"model": "tiny", "prompt": "今天", "max_tokens": 4}
        results = []
        threads = [threading.Thread(target=lambda: results.append(_post(url, "/v1/completions", body, key=None)))
                   for _ in range(2)]
        for t in threads:  # one in the worker's hands, one waiting
            t.start()
            time.sleep(0.3)
        busy = _post(url, "/v1/completions", body, key=None)
        assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
        assert busy.json()["error"]["code"] == "server_busy"
        gate.set()
        for t in threads:
            t.join(30)
        assert [r.status_code for r in results] == [200, 200]
        assert _post(url, "/v1/completions", body, key=None).status_code == 200
    finally:
        gate.set()
        stop()
