"""A conversation over HTTP reads a passkey haystack longer than the embedded model's
pre-training window (8,192 tokens) in one request; a later request asks, and gets the key,
reading only its own message; so it does after the conversation was evicted to its
snapshot (another request needed the room) and loaded back, and after a server restart
(saved at shutdown, loaded on its next request). A real server (uvicorn in a child process) driven by the official ``openai`` client.

The conversation's InfLLM memory is small (a 256-token local window, 3 of the ~65 blocks
retrieved, 4 fast slots) to keep the read short (about 40 s on 2 cores); the key sits at
depth 0.3, about 5,800 tokens before the question, far outside the window.
"""

from __future__ import annotations

import httpx
import openai
import pytest

from infllm_lite import MemoryConfig
from infllm_lite.attention.footprint import state_bytes
from infllm_lite.eval.passkey import PASSKEY, make_passkey_sample, score_passkey
from infllm_lite.server.process import ServerProcess

MODEL = "SmolLM2-135M-Instruct"
MEMORY = {"n_local": 256, "topk": 3, "max_cached_blocks": 4}
HAYSTACK_TOKENS = 8_400
QUESTION = "What is the pass key? Answer with the number only."


@pytest.fixture(scope="module")
def server(tmp_path_factory, smollm):
    model, _ = smollm
    folder = tmp_path_factory.mktemp("serve_long")
    # room for the conversation at its longest and 8 MiB: a 2,000-token full-attention request
    # (88 MiB of cache; the conversation leaves at most ~50 MiB free) makes the server evict the
    # idle conversation to its snapshot
    budget = state_bytes("infllm", model.args, HAYSTACK_TOKENS + 400, MemoryConfig.for_model(model.args, **MEMORY))
    args = ["--snapshot-dir", str(folder / "snaps"), "--max-prompt-tokens", "12000",
            "--memory-budget", str(budget + (8 << 20)),
            "--attention-kernel", "window-eager"]  # eager: no compile per shape in a fresh process
    with ServerProcess(args, log=folder / "server.log") as proc:
        proc.snaps = folder / "snaps"
        yield proc


def test_a_conversation_reads_past_the_model_window_once_and_answers_after_a_restart(server, smollm):
    model, tok = smollm
    window = model.args.max_position_embeddings
    sample = make_passkey_sample(tok, n_tokens=HAYSTACK_TOKENS, depth=0.3, seed=1)
    h = httpx.Client(base_url=server.base, timeout=300)
    c = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=300)
    r = h.post("/v1/conversations", json={"attention": "infllm", "memory": MEMORY})
    assert r.status_code == 200, r.text
    cid = r.json()["id"]

    def ask(text: str, max_tokens: int):
        r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": text}],
                                      max_tokens=max_tokens, temperature=0, extra_body={"conversation_id": cid})
        return r.choices[0].message.content, r.usage.prompt_tokens

    _, read = ask(PASSKEY.instruction + "\n\n" + sample.context, 2)
    assert read > window  # one request, longer than the model was trained on
    answer, read = ask(QUESTION, 12)
    assert score_passkey(answer, sample.key), answer
    assert read < 40  # only the new message is read
    assert h.get(f"/v1/conversations/{cid}").json()["tokens"] > window

    # another request needs the room: the idle conversation is saved and evicted, then loaded back
    r = c.completions.create(model=MODEL, prompt=" ".join(["river"] * 2000), max_tokens=2, temperature=0,
                             extra_body={"attention": "full"})
    assert r.usage.prompt_tokens >= 2000
    info = h.get(f"/v1/conversations/{cid}").json()
    assert not info["in_memory"] and (server.snaps / f"{cid}.snap").exists()
    again, read = ask(QUESTION, 12)
    assert score_passkey(again, sample.key) and read < 40, again
    tokens = h.get(f"/v1/conversations/{cid}").json()["tokens"]

    server.restart()
    h = httpx.Client(base_url=server.base, timeout=300)
    c = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=300)
    info = h.get(f"/v1/conversations/{cid}").json()
    assert info["tokens"] == tokens and not info["in_memory"]  # on disk, not read again
    again, read = ask(QUESTION, 12)
    assert score_passkey(again, sample.key) and read < 40, again
    assert h.delete(f"/v1/conversations/{cid}").json()["deleted"] is True
    assert not list(server.snaps.glob(f"{cid}.*"))
