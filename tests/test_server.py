"""``infllm-lite serve`` end to end: a real server (uvicorn, in a child process on a free
localhost port, started once for the module) driven by the official ``openai`` client
and raw HTTP (httpx), on the embedded SmolLM2-135M.

* greedy answers (chat and completions, streamed and not, n=2, stop strings, per-request
  attention and memory) equal in-process ``generate`` on the same prompt;
* a conversation reads a passkey haystack beyond its memory's local window in one request
  and is asked in a later one, after it was evicted to its snapshot (the budget needed the
  room) and after a server restart: the key, and token for token ChatSession's answer (a
  memory never evicted). To keep this fast the conversations' InfLLM memory has a 256-token
  local window (n_local 256, topk 3 of the 7 blocks at question time, 4 fast slots), so a
  1,200-token haystack with the key at depth 0.3 puts it ~800 tokens beyond the window;
* 16 concurrent streaming clients all finish with the right answers and the queue drains;
  a burst past the bounded queue gets 429;
* bad input (invalid JSON, missing messages, max_tokens 0, unknown model or conversation,
  oversize prompt or body, a request that can never fit, wrong or missing key, another
  key's conversation) gets its status and OpenAI error body while a stream goes on;
* a client that disconnects frees its sequence (the reserved memory back to its baseline).
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time

import httpx
import openai
import pytest

from infllm_lite import MemoryConfig, generate
from infllm_lite.chat import ChatSession
from infllm_lite.eval.passkey import PASSKEY, make_passkey_sample, score_passkey
from infllm_lite.server.process import ServerProcess

MODEL = "SmolLM2-135M-Instruct"
KEYS = ("test-key-alpha", "test-key-beta")
KERNEL = "window-eager"  # no compile per shape in a fresh server process
SMALL = {"n_local": 256, "topk": 3, "max_cached_blocks": 4}  # the conversations' and infllm requests' memory
BUDGET_MIB = 256  # one SMALL conversation at 1.2K tokens (196 MiB predicted) fits, two do not
MAX_SEQUENCES, MAX_QUEUE, MAX_PROMPT = 8, 16, 2048
QUESTION = "What is the pass key? Answer with the number only."
FULL = {"attention": "full"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve")
    args = ["--api-key", KEYS[0], "--api-key", KEYS[1], "--snapshot-dir", str(folder / "snaps"),
            "--memory-budget", f"{BUDGET_MIB}MiB", "--max-sequences", str(MAX_SEQUENCES),
            "--max-queue", str(MAX_QUEUE), "--max-prompt-tokens", str(MAX_PROMPT), "--max-body-bytes", "64KiB",
            "--attention-kernel", KERNEL]
    proc = ServerProcess(args, log=folder / "server.log")
    proc.snaps = folder / "snaps"
    try:
        yield proc.start()
    finally:
        proc.stop()


def client(server, key=KEYS[0]) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url, api_key=key, max_retries=0, timeout=120)


def http(server, key=KEYS[0]) -> httpx.Client:
    return httpx.Client(base_url=server.base, headers={"Authorization": f"Bearer {key}"}, timeout=120)


def metrics(server) -> dict[str, float]:
    text = http(server).get("/metrics").text
    return {m[1]: float(m[2]) for m in re.finditer(r"^(\w+(?:\{[^}]*\})?) ([-+.\deE]+|NaN)$", text, re.M)}


def wait_idle(server, timeout=30.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        health = httpx.get(server.base + "/health").json()
        m = metrics(server)
        if health["running"] == 0 and health["waiting"] == 0 and m["infllm_memory_reserved_bytes"] == 0:
            return m
        time.sleep(0.2)
    raise AssertionError(f"still busy after {timeout} s: {health}")


def chat(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def error_of(response: httpx.Response, status: int, code=None, param=None) -> str:
    assert response.status_code == status, (response.status_code, response.text)
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert code is None or error["code"] == code, error
    assert param is None or error["param"] == param, error
    return error["message"]


def test_health_models_and_metrics(server):
    assert httpx.get(server.base + "/health").json()["status"] == "ok"  # no key needed
    assert [m.id for m in client(server).models.list()] == [MODEL]
    assert client(server, KEYS[1]).models.retrieve(MODEL).id == MODEL
    m = metrics(server)
    for name in ("infllm_queue_length", "infllm_memory_reserved_bytes", "infllm_memory_held_bytes",
                 'infllm_memory_blocks{tier="fast"}', 'infllm_memory_blocks{tier="host"}',
                 'infllm_memory_blocks{tier="disk"}', "infllm_prompt_tokens_total", "infllm_completion_tokens_total"):
        assert name in m, name
    assert m["infllm_memory_budget_bytes"] == BUDGET_MIB << 20


def test_greedy_answers_equal_generate(server, smollm):
    model, tok = smollm
    c = client(server)
    messages = chat("Name the largest planet of the solar system.")
    for mode, extra in (("full", FULL), ("infllm", {"attention": "infllm", "memory": SMALL})):
        memory = MemoryConfig.for_model(model.args, **SMALL) if mode == "infllm" else None
        expected = generate(model, tok, messages, max_new_tokens=12, attention=mode, memory=memory,
                            attention_kernel=KERNEL)
        r = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0, extra_body=extra)
        assert r.choices[0].message.content == expected and r.choices[0].message.role == "assistant"
        assert r.choices[0].finish_reason in ("stop", "length")
        assert r.usage.prompt_tokens == len(tok.encode(tok.apply_chat_template(messages), add_special_tokens=False))
        assert r.usage.completion_tokens <= 12 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        pieces = [ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=12, temperature=0, stream=True, extra_body=extra)]
        assert "".join(pieces) == expected
    prompt = "The three primary colours are"
    expected = generate(model, tok, prompt, max_new_tokens=10)
    r = c.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0, n=2, extra_body=FULL)
    assert [ch.text for ch in r.choices] == [expected, expected] and [ch.index for ch in r.choices] == [0, 1]
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 20
    assert r.usage.prompt_tokens == len(tok.encode(prompt))
    stream = c.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0, stream=True,
                                  extra_body=FULL)
    assert "".join(ch.choices[0].text for ch in stream) == expected
    stopped = generate(model, tok, prompt, max_new_tokens=10, stop=[","])
    r = c.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0, stop=[","], extra_body=FULL)
    assert r.choices[0].text == stopped and r.choices[0].finish_reason == "stop"
    seeded = dict(model=MODEL, prompt=prompt, max_tokens=8, temperature=0.9, seed=7, extra_body=FULL)
    assert c.completions.create(**seeded).choices[0].text == c.completions.create(**seeded).choices[0].text
    assert c.completions.create(**seeded).choices[0].text == generate(model, tok, prompt, max_new_tokens=8,
                                                                       temperature=0.9, seed=7)


def test_raw_http_stream_is_openai_sse(server, smollm):
    model, tok = smollm
    body = {"model": MODEL, "messages": chat("Say hello."), "max_tokens": 6, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "attention": "full"}
    with http(server) as h, h.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in r.iter_lines() if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] >= 1
    assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    assert text == generate(model, tok, body["messages"], max_new_tokens=6)


def test_conversation_reads_once_and_survives_eviction_and_restart(server, smollm):
    model, tok = smollm
    sample = make_passkey_sample(tok, n_tokens=1200, depth=0.3, seed=1)
    haystack = PASSKEY.instruction + "\n\n" + sample.context
    # the reference: one ChatSession, never evicted
    session = ChatSession(model, tok, attention="infllm", memory=MemoryConfig.for_model(model.args, **SMALL),
                          kernel=KERNEL, max_new_tokens=2)
    first_reply = session.send(haystack)
    session.max_new_tokens = 12
    expected = session.send(QUESTION)
    assert score_passkey(expected, sample.key), expected
    h, c = http(server), client(server)

    def create() -> str:
        r = h.post("/v1/conversations", json={"attention": "infllm", "memory": SMALL})
        assert r.status_code == 200 and r.json()["tokens"] == 0
        return r.json()["id"]

    def send(cid, text, max_tokens):
        r = c.chat.completions.create(model=MODEL, messages=chat(text), max_tokens=max_tokens, temperature=0,
                                      extra_body={"conversation_id": cid})
        return r.choices[0].message.content, r.usage.prompt_tokens

    def info(cid) -> dict:
        return h.get(f"/v1/conversations/{cid}").json()

    a, b = create(), create()
    reply, read = send(a, haystack, 2)
    assert reply == first_reply and read > 1100 and info(a)["in_memory"]
    evictions = metrics(server)["infllm_conversation_evictions_total"]
    send(b, haystack, 2)  # b's memory does not fit beside a's: a is saved and evicted
    assert not info(a)["in_memory"] and info(b)["in_memory"]
    assert metrics(server)["infllm_conversation_evictions_total"] == evictions + 1
    assert (server.snaps / f"{a}.snap").exists()
    answer, read = send(a, QUESTION, 12)  # loaded back (b evicted in its turn)
    assert answer == expected and read < 40  # only the new message is read
    assert info(a)["in_memory"] and not info(b)["in_memory"]
    tokens = {cid: info(cid)["tokens"] for cid in (a, b)}
    server.restart()
    assert {cid: info(cid)["tokens"] for cid in (a, b)} == tokens  # both still there
    answer, _ = send(b, QUESTION, 12)
    assert answer == expected and score_passkey(answer, sample.key)
    assert [m["role"] for m in info(b)["history"]] == ["user", "assistant", "user", "assistant"]
    for cid in (a, b):
        assert h.delete(f"/v1/conversations/{cid}").json()["deleted"] is True
        assert not list(server.snaps.glob(f"{cid}.*"))
        error_of(h.get(f"/v1/conversations/{cid}"), 404, "conversation_not_found")
    assert wait_idle(server)["infllm_memory_held_bytes"] == 0


def test_a_conversation_belongs_to_its_key(server):
    alpha, beta = http(server, KEYS[0]), http(server, KEYS[1])
    cid = alpha.post("/v1/conversations", json={"attention": "infllm", "memory": SMALL,
                                                 "system": "Be brief."}).json()["id"]
    assert [c["id"] for c in alpha.get("/v1/conversations").json()["data"]] == [cid]
    assert beta.get("/v1/conversations").json()["data"] == []
    error_of(beta.get(f"/v1/conversations/{cid}"), 404, "conversation_not_found")
    body = {"model": MODEL, "messages": chat("Hi"), "max_tokens": 3, "conversation_id": cid}
    error_of(beta.post("/v1/chat/completions", json=body), 404, "conversation_not_found", "conversation_id")
    error_of(beta.delete(f"/v1/conversations/{cid}"), 404)
    r = alpha.post("/v1/chat/completions", json=body)
    assert r.status_code == 200 and r.json()["conversation_id"] == cid
    assert alpha.delete(f"/v1/conversations/{cid}").status_code == 200
    # a full-attention conversation's cache is the model's whole window (8192 tokens, 360 MiB): it can never fit
    full = alpha.post("/v1/conversations", json={"attention": "full"}).json()["id"]
    assert "whole budget" in error_of(alpha.post("/v1/chat/completions", json={**body, "conversation_id": full}), 400)
    assert alpha.get(f"/v1/conversations/{full}").json()["tokens"] == 0  # nothing changed
    assert alpha.delete(f"/v1/conversations/{full}").status_code == 200


def test_full_attention_takes_a_kv_dtype_and_nothing_else(server, smollm):
    model, tok = smollm
    h = http(server)
    half = {"attention": "full", "memory": {"kv_dtype": "bfloat16"}}
    prompt = "The three primary colours are"
    expected = generate(model, tok, prompt, max_new_tokens=8, attention="full",
                        memory=MemoryConfig.for_model(model.args, kv_dtype="bfloat16"))
    r = h.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0, **half})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected
    wrong = {"model": MODEL, "prompt": prompt, "max_tokens": 2, "attention": "full", "memory": {"n_local": 64}}
    assert "n_local" in error_of(h.post("/v1/completions", json=wrong), 400, param="memory")
    # a bfloat16 cache of the whole window is 180 MiB: the conversation that float32 could never hold fits
    cid = h.post("/v1/conversations", json=half).json()["id"]
    assert h.get(f"/v1/conversations/{cid}").json()["memory"]["kv_dtype"] == "bfloat16"
    body = {"model": MODEL, "messages": chat("Hi"), "max_tokens": 3, "temperature": 0, "conversation_id": cid}
    r = h.post("/v1/chat/completions", json=body)
    assert r.status_code == 200 and h.get(f"/v1/conversations/{cid}").json()["tokens"] > 0
    assert h.delete(f"/v1/conversations/{cid}").status_code == 200
    error_of(h.post("/v1/conversations", json={"attention": "full", "memory": {"topk": 2}}), 400, param="memory")


def test_16_concurrent_streaming_clients_finish_and_the_queue_drains(server, smollm):
    model, tok = smollm
    words = ["river", "mountain", "candle", "garden", "winter", "silver", "harbor", "violin",
             "lantern", "meadow", "thunder", "pepper", "castle", "forest", "island", "rocket"]
    prompts = [chat(f"Write one sentence about a {w}.") for w in words]
    expected = generate(model, tok, prompts, max_new_tokens=8)

    async def one(c, messages):
        pieces, reasons = [], []
        stream = await c.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                                 stream=True, extra_body=FULL)
        async for chunk in stream:
            pieces.append(chunk.choices[0].delta.content or "")
            reasons.append(chunk.choices[0].finish_reason)
        return "".join(pieces), reasons[-1]

    async def all_of():
        c = openai.AsyncOpenAI(base_url=server.url, api_key=KEYS[0], max_retries=0, timeout=120)
        return await asyncio.wait_for(asyncio.gather(*(one(c, p) for p in prompts)), 240)

    before = metrics(server)["infllm_completion_tokens_total"]
    results = asyncio.run(all_of())
    assert [text for text, _ in results] == expected
    assert all(reason in ("stop", "length") for _, reason in results)
    m = wait_idle(server)
    assert m["infllm_queue_length"] == 0
    assert len(prompts) <= m["infllm_completion_tokens_total"] - before <= 8 * len(prompts)


def test_past_the_bounded_queue_requests_get_429(server):
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0, "attention": "full"}

    async def burst():
        async with httpx.AsyncClient(base_url=server.base, headers={"Authorization": f"Bearer {KEYS[0]}"},
                                     timeout=120) as h:
            return await asyncio.gather(*(h.post("/v1/completions", json=body) for _ in range(40)))

    responses = asyncio.run(burst())
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429} and statuses.count(200) >= MAX_SEQUENCES and 429 in statuses, statuses
    assert "queue is full" in error_of(next(r for r in responses if r.status_code == 429), 429, "queue_full")
    assert len({r.json()["choices"][0]["text"] for r in responses if r.status_code == 200}) == 1
    wait_idle(server)


def test_bad_input_gets_its_status_while_others_are_served(server, smollm):
    model, tok = smollm
    h = http(server)
    long_body = {"model": MODEL, "messages": chat("Tell me a story about a lighthouse."), "max_tokens": 40,
                 "temperature": 0, "stream": True, "attention": "full"}
    streamed = {}

    def stream():
        with http(server) as s, s.stream("POST", "/v1/chat/completions", json=long_body) as r:
            streamed["text"] = "".join(json.loads(line[6:])["choices"][0]["delta"].get("content", "")
                                       for line in r.iter_lines() if line.startswith("data: {"))
    worker = threading.Thread(target=stream)
    worker.start()
    ok = {"model": MODEL, "messages": chat("Hi"), "max_tokens": 2}
    error_of(h.post("/v1/chat/completions", content=b'{"model": "x", "messages": ['), 400, "invalid_json")
    error_of(h.post("/v1/chat/completions", json={"model": MODEL}), 400, "missing_required_parameter", "messages")
    error_of(h.post("/v1/chat/completions", json={**ok, "max_tokens": 0}), 400, param="max_tokens")
    error_of(h.post("/v1/chat/completions", json={**ok, "messages": []}), 400, param="messages")
    error_of(h.post("/v1/chat/completions", json={**ok, "temperature": 5}), 400, param="temperature")
    error_of(h.post("/v1/chat/completions", json={**ok, "model": "gpt-4"}), 404, "model_not_found", "model")
    error_of(h.post("/v1/chat/completions", json={**ok, "conversation_id": "conv_nope"}), 404,
             "conversation_not_found")
    error_of(h.post("/v1/chat/completions", json={**ok, "logprobs": True}), 400, "unsupported_parameter")
    error_of(h.post("/v1/chat/completions", json={**ok, "attention": "sparse"}), 400, param="attention")
    error_of(h.post("/v1/chat/completions", json={**ok, "memory": {"n_local": 0}}), 400, param="memory")
    oversize = {**ok, "messages": chat("word " * (MAX_PROMPT + 100))}
    assert "at most 2048" in error_of(h.post("/v1/chat/completions", json=oversize), 400, "context_length_exceeded")
    error_of(h.post("/v1/chat/completions", json={**ok, "messages": chat("x" * 70000)}), 413, "request_too_large")
    never = {**ok, "attention": "infllm"}  # the default InfLLM memory (389 MiB) is more than the whole budget
    assert "whole budget" in error_of(h.post("/v1/chat/completions", json=never), 400)
    error_of(httpx.post(server.url + "/chat/completions", json=ok), 401, "invalid_api_key")
    error_of(httpx.post(server.url + "/chat/completions", json=ok, headers={"Authorization": "Bearer nope-nope"}),
             401, "invalid_api_key")
    error_of(httpx.get(server.base + "/metrics"), 401)
    error_of(h.get("/v1/nothing"), 404)
    with pytest.raises(openai.AuthenticationError):
        client(server, "wrong-key-123").models.list()
    with pytest.raises(openai.NotFoundError):
        client(server).chat.completions.create(model="gpt-4", messages=chat("Hi"))
    worker.join(120)
    assert streamed["text"] == generate(model, tok, long_body["messages"], max_new_tokens=40)
    r = h.post("/v1/chat/completions", json={**ok, "attention": "full", "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]


def test_a_client_disconnect_frees_its_sequence(server):
    baseline = wait_idle(server)
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 400, "temperature": 0, "stream": True,
            "attention": "full"}
    with http(server) as h:
        with h.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: {")
            assert metrics(server)["infllm_memory_reserved_bytes"] > 0
        # leaving the block closes the connection mid-stream
    m = wait_idle(server)
    assert m["infllm_cancelled_sequences_total"] == baseline["infllm_cancelled_sequences_total"] + 1
    assert m["infllm_memory_reserved_bytes"] == baseline["infllm_memory_reserved_bytes"] == 0
    assert m["infllm_memory_held_bytes"] == baseline["infllm_memory_held_bytes"]
    assert m["infllm_completion_tokens_total"] - baseline["infllm_completion_tokens_total"] < 400


@pytest.mark.parametrize("argv, message", [
    (["--port", "70000"], "--port must be in 0..65535"),
    (["--max-prompt-tokens", "0"], "--max-prompt-tokens must be at least 1"),
    (["--max-queue", "0"], "--max-queue must be at least 1"),
    (["--api-key", "short"], "at least 8 characters"),
    (["--api-key-file", "/nonexistent/keys"], "--api-key-file /nonexistent/keys"),
    (["--n-local", "0"], "--n-local must be at least 1"),
])
def test_serve_options_are_checked_before_the_model_loads(capsys, argv, message):
    from infllm_lite.cli import main
    assert main(["serve", *argv]) == 1
    assert message in capsys.readouterr().err


def test_serve_refuses_a_file_as_snapshot_dir(capsys, tmp_path):
    from infllm_lite.cli import main
    (tmp_path / "f").write_text("x")
    assert main(["serve", "--snapshot-dir", str(tmp_path / "f")]) == 1
    err = capsys.readouterr().err
    assert "--snapshot-dir" in err and "is a file" in err
