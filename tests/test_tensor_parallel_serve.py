"""``torchrun --nproc-per-node 2 -m infllm_lite serve --tensor-parallel`` (infllm_lite.parallel.serve)
on the tiny random Llama (4 heads, 2 KV heads: one of each per rank, gloo), started once
for the module (torchrun and its ranks are always killed at the end), driven by the
official ``openai`` client:

* greedy chat and completion answers, streamed and not, equal in-process ``generate`` on
  one process for ``full`` and ``infllm`` (a 64-token local window and a ~400-token
  prompt: blocks are selected), and a seeded sample too;
* a few concurrent streaming clients get ``generate``'s answers;
* two conversations over two requests each, under a budget (per rank) that holds one: each
  turn evicts the other (every rank saves its own snapshot, the ranks agree) and loads
  its own back; the answers are a never-evicted ``ChatSession``'s; a load that fails on
  rank 1 only is refused on both, which go on;
* SIGTERM to torchrun ends every rank, each saving the conversation it holds to its own
  file; a one-process server refuses that folder;
* a second launch: rank 0 killed, the other rank (which ignores torchrun's SIGTERM) exits
  with an error well before torchrun's SIGKILL;
* a launcher (FAULTY_LAUNCHER, run by torchrun instead of ``-m infllm_lite``) whose
  ``Engine.step`` fails when a prompt says so: a step failed on every rank fails its
  requests (503, the API's error body naming the failed step: a completion, a stream, a
  conversation's turn, which stays as it was) and the server goes on (a greedy answer
  follows);
* SIGINT to torchrun ends every rank cleanly (no error), each saving the conversation it
  holds to its own file; a second launch on that folder continues the conversation with a
  never-restarted ``ChatSession``'s answer; there a step failed on rank 1 only fails the
  open request (503, the message naming rank 1) and every rank exits with the message
  (rank 0 with ``error: ...`` and status 1, not torchrun's SIGTERM), saving nothing;
* a third launch: rank 1 killed while a stream is open: the stream ends with an error event
  naming the failed collective, rank 0 exits with ``error: ...`` (status 1) and torchrun
  ends, well before the collective timeout.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import ExitStack, contextmanager
from functools import partial
from pathlib import Path

import httpx
import openai
import pytest

from infllm_lite import MemoryConfig, generate
from infllm_lite.chat import ChatSession
from infllm_lite.errors import InfLLMLiteError
from infllm_lite.server.process import free_port
from torchrun_ranks import children, kill_with_ranks

KERNEL = "window-eager"
SMALL = {"n_init": 4, "n_local": 64, "block_size": 16, "topk": 2, "exc_block_size": 32, "max_cached_blocks": 4}
BUDGET = "450KiB"  # per rank: one SMALL conversation at ~400 tokens (~270 KiB a rank) fits, two do not
LONG = " ".join(f"item {i} is {i * 7 % 13}." for i in range(48))  # ~400 tokens: beyond the 64-token window


# Run by torchrun instead of ``-m infllm_lite``: the same main, with Engine.step failing when
# a prompt it holds (waiting or running) says so: before the step on every rank (nothing
# ran: every rank fails alike), or after the step on rank 1 only (its collectives matched
# rank 0's, then only rank 1 reports a failure).
FAULTY_LAUNCHER = """\
import sys

import torch.distributed as dist

from infllm_lite.cli import main
from infllm_lite.engine import Engine

step = Engine.step


def faulty_step(self):
    text = " ".join(self.tokenizer.decode(s.prompt) for s in [*self.waiting, *self.running])
    if "FAIL_EVERYWHERE" in text:
        raise RuntimeError(f"injected failure on rank {dist.get_rank()}")
    events = step(self)
    if "FAIL_ON_RANK_1" in text and dist.get_rank() == 1:
        raise RuntimeError("injected failure on rank 1 only")
    return events


Engine.step = faulty_step
sys.exit(main())
"""


@contextmanager
def launched(folder, root, *args, script=None):
    """torchrun with 2 ranks serving ``folder`` on a free port until /health answers;
    torchrun and its ranks (each in a session of its own) are killed at the end, whatever
    happened; ``script``: a file torchrun runs instead of ``-m infllm_lite``."""
    port = free_port()
    program = ["-m", "infllm_lite"] if script is None else [str(script)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), *program, "serve", "--tensor-parallel",
           "--model", str(folder), "--host", "127.0.0.1", "--port", str(port), "--attention-kernel", KERNEL,
           "--log-level", "warning", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", INFLLM_LITE_DIST_TIMEOUT="30")
    log_path = root / "server.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    workers = []
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "the server did not answer /health within 120 s"
            try:
                with urllib.request.urlopen(base + "/health", timeout=2):
                    break
            except OSError:
                time.sleep(0.3)
        workers = children(proc.pid)  # torchrun starts each rank in a session of its own
        yield dict(proc=proc, base=base, log=log_path, model=folder.name)
    finally:
        kill_with_ranks(proc, workers)
        log.close()


def rank_pids(proc) -> dict[int, int]:
    """torchrun's workers by rank."""
    found = {}
    for pid in children(proc.pid):
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        found[int(next(e for e in env if e.startswith(b"RANK="))[5:])] = int(pid)
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def server(tiny_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("tp_serve")
    with launched(tiny_folder, root, "--snapshot-dir", str(root / "snaps"), "--memory-budget", BUDGET) as s:
        s["snaps"] = root / "snaps"
        yield s


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server["base"] + "/v1", api_key="unused", max_retries=0, timeout=60)


def chat(text):
    return [{"role": "user", "content": text}]


DOC, QUESTION = "Remember this list. " + LONG, "Which item is 3?"


@pytest.fixture(scope="module")
def reference(tiny):
    """A never-evicted, never-restarted ``ChatSession``'s two answers (DOC in 4 tokens, then
    QUESTION in 8) and its length after them."""
    model, tok = tiny
    session = ChatSession(model, tok, attention="infllm", memory=MemoryConfig.for_model(model.args, **SMALL),
                          kernel=KERNEL, max_new_tokens=4)
    first = session.send(DOC)
    session.max_new_tokens = 8
    second = session.send(QUESTION)
    return first, second, session.state.length


def turn(server, cid, text, n):
    """A conversation's answer to ``text`` (greedy, ``n`` tokens at most)."""
    return client(server).chat.completions.create(
        model=server["model"], messages=chat(text), max_tokens=n, temperature=0,
        extra_body={"conversation_id": cid}).choices[0].message.content


def ended(proc, ranks, within):
    """Whether torchrun and every rank ended within ``within`` seconds."""
    deadline = time.monotonic() + within
    try:
        proc.wait(within)
    except subprocess.TimeoutExpired:
        return False
    while any(map(alive, ranks.values())) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not any(map(alive, ranks.values()))


def exit_code(log: str, pid: int) -> int | None:
    """A rank's exit code in torchrun's report of failed ranks (in ``log``)."""
    found = re.search(rf"exitcode\s*:\s*(-?\d+) \(pid: {pid}\)", log)
    return None if found is None else int(found[1])


def stream_events(base, body, on_first=None, timeout=60):
    """The ``data:`` payloads of a streamed completion (the HTTP status first);
    ``on_first()`` runs after the first payload arrives."""
    out = []
    with httpx.stream("POST", base + "/v1/completions", json={**body, "stream": True}, timeout=timeout) as r:
        out.append(r.status_code)
        if r.status_code != 200:
            r.read()
            return out + [r.json()]
        for line in r.iter_lines():
            if line.startswith("data: "):
                out.append(line[6:] if line == "data: [DONE]" else json.loads(line[6:]))
                if len(out) == 2 and on_first is not None:
                    on_first()
    return out


def test_greedy_and_seeded_answers_equal_one_process(server, tiny):
    model, tok = tiny
    c = client(server)
    messages = chat("Read this list. " + LONG + " Which item is 5?")
    for mode, extra in (("full", {"attention": "full"}), ("infllm", {"attention": "infllm", "memory": SMALL})):
        memory = MemoryConfig.for_model(model.args, **SMALL) if mode == "infllm" else None
        expected = generate(model, tok, messages, max_new_tokens=10, attention=mode, memory=memory,
                            attention_kernel=KERNEL)
        r = c.chat.completions.create(model=server["model"], messages=messages, max_tokens=10, temperature=0,
                                      extra_body=extra)
        assert r.choices[0].message.content == expected, mode
        assert r.usage.prompt_tokens > 350
        stream = c.chat.completions.create(model=server["model"], messages=messages, max_tokens=10, temperature=0,
                                           stream=True, extra_body=extra)
        assert "".join(ch.choices[0].delta.content or "" for ch in stream) == expected, mode
    prompt = "Once upon a time"
    expected = generate(model, tok, prompt, max_new_tokens=8)
    r = c.completions.create(model=server["model"], prompt=prompt, max_tokens=8, temperature=0, n=2,
                             extra_body={"attention": "full"})
    assert [ch.text for ch in r.choices] == [expected, expected]
    seeded = c.completions.create(model=server["model"], prompt=prompt, max_tokens=8, temperature=0.9, seed=7,
                                  extra_body={"attention": "full"})
    assert seeded.choices[0].text == generate(model, tok, prompt, max_new_tokens=8, temperature=0.9, seed=7)


def test_concurrent_streaming_clients(server, tiny):
    model, tok = tiny
    prompts = [f"A short story about a {w}:" for w in ("river", "candle", "violin", "harbor")]
    expected = [generate(model, tok, p, max_new_tokens=8) for p in prompts]
    got = [None] * len(prompts)

    def one(i):
        stream = client(server).completions.create(model=server["model"], prompt=prompts[i], max_tokens=8,
                                                   temperature=0, stream=True, extra_body={"attention": "full"})
        got[i] = "".join(ch.choices[0].text for ch in stream)
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert got == expected
    assert httpx.get(server["base"] + "/health").json()["running"] == 0


def test_conversations_continue_across_evictions(server, reference):
    doc, question = DOC, QUESTION
    first, second, length = reference
    h = httpx.Client(base_url=server["base"], timeout=60)
    a, b = (h.post("/v1/conversations", json={"attention": "infllm", "memory": SMALL}).json()["id"] for _ in "ab")

    def send(cid, text, n):
        return turn(server, cid, text, n)

    def in_memory(cid):
        return h.get(f"/v1/conversations/{cid}").json()["in_memory"]

    assert send(a, doc, 4) == first and in_memory(a)
    assert send(b, doc, 4) == first  # a is evicted: every rank saved its own file
    assert not in_memory(a) and in_memory(b)
    assert sorted(p.name for p in server["snaps"].glob(f"{a}*")) == [
        f"{a}.json", f"{a}.rank0-of-2.snap", f"{a}.rank1-of-2.snap"]
    assert send(a, question, 8) == second  # loaded back on both ranks (b evicted)
    assert in_memory(a) and not in_memory(b)
    assert send(b, question, 8) == second
    assert h.get(f"/v1/conversations/{b}").json()["tokens"] == length
    c2 = h.post("/v1/conversations", json={"attention": "infllm", "memory": SMALL}).json()["id"]
    assert h.delete(f"/v1/conversations/{c2}").json()["deleted"]  # deleted on every rank
    # a load that fails on rank 1 only (its snapshot gone) is refused on both; they go on
    d = h.post("/v1/conversations", json={"attention": "infllm", "memory": SMALL}).json()["id"]
    assert send(d, doc, 4) == first and not in_memory(b)
    (server["snaps"] / f"{b}.rank1-of-2.snap").unlink()
    with pytest.raises(openai.RateLimitError, match="rank 1: .*does not exist"):
        send(b, question, 8)
    assert send(d, question, 8) == second
    server["kept"] = d  # in memory at shutdown


def test_sigterm_ends_every_rank_and_saves_per_rank(server, tiny):
    proc = server["proc"]
    ranks = rank_pids(proc)
    assert sorted(ranks) == [0, 1]
    proc.send_signal(signal.SIGTERM)
    proc.wait(45)
    deadline = time.monotonic() + 10
    while any(map(alive, ranks.values())) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(map(alive, ranks.values()))
    log = server["log"].read_text()
    assert "error: " not in log and "[rank 1]" not in log and "ERROR" not in log, log[-3000:]
    kept = server.get("kept")
    if kept is not None:  # saved at shutdown, a file per rank
        names = {p.name for p in server["snaps"].glob(f"{kept}*")}
        assert {f"{kept}.rank0-of-2.snap", f"{kept}.rank1-of-2.snap"} <= names
        meta = json.loads((server["snaps"] / f"{kept}.json").read_text())
        assert meta["id"] == kept
    from infllm_lite.engine import Engine
    from infllm_lite.server.conversations import ConversationStore
    model, tok = tiny
    with pytest.raises(InfLLMLiteError, match="saved by a server of 2 tensor-parallel ranks, this one has one process"):
        ConversationStore(model, tok, Engine(model, tok), snapshot_dir=server["snaps"], capacity=2048)


def test_a_dead_rank_0_ends_the_follower_with_an_error(tiny_folder, tmp_path):
    """The follower ignores torchrun's SIGTERM (it waits for rank 0's shutdown): when rank 0
    dies instead, its next broadcast fails and it exits with an error, well before
    torchrun's 30 s SIGKILL."""
    with launched(tiny_folder, tmp_path) as s:
        ranks = rank_pids(s["proc"])
        start = time.monotonic()
        os.kill(ranks[0], signal.SIGKILL)
        s["proc"].wait(40)
        while alive(ranks[1]) and time.monotonic() - start < 40:
            time.sleep(0.2)
        assert not alive(ranks[1]) and time.monotonic() - start < 20
        log = s["log"].read_text()
        assert "[rank 1] error: rank 1: a broadcast failed: another rank died" in log, log[-3000:]


# ---------------------------------------------------------------------- failures, SIGINT, a restart
@pytest.fixture(scope="module")
def faulty(tiny_folder, tmp_path_factory):
    """FAULTY_LAUNCHER's server on a snapshot folder; ``faulty["relaunch"]()`` starts it again
    on the same folder (the earlier one ended), its keys then the new launch's."""
    root = tmp_path_factory.mktemp("tp_faults")
    script = root / "faulty_serve.py"
    script.write_text(FAULTY_LAUNCHER)
    state = dict(snaps=root / "snaps")
    with ExitStack() as stack:
        def launch(name):
            (root / name).mkdir()
            state.update(stack.enter_context(launched(tiny_folder, root / name, "--snapshot-dir", str(state["snaps"]),
                                                      script=script)))
            return state
        launch("first")
        state["relaunch"] = partial(launch, "second")
        yield state


def failure(message):
    """The API's error body of a request ended by a failure of the ranks (503)."""
    return {"error": {"message": message, "type": "server_error", "param": None, "code": "cancelled"}}


def test_a_step_failed_on_every_rank_fails_its_requests_and_the_server_goes_on(faulty, tiny, reference):
    model, tok = tiny
    first = reference[0]
    h = httpx.Client(base_url=faulty["base"], timeout=60)
    cid = h.post("/v1/conversations", json={"attention": "infllm", "memory": SMALL}).json()["id"]
    faulty["conversation"] = cid  # for the tests below
    assert turn(faulty, cid, DOC, 4) == first
    tokens = h.get(f"/v1/conversations/{cid}").json()["tokens"]
    failed = failure("an engine step failed on every rank (injected failure on rank 0); the request was cancelled")
    body = dict(model=faulty["model"], prompt="FAIL_EVERYWHERE, says this prompt", max_tokens=8, temperature=0,
                attention="full")
    r = h.post("/v1/completions", json=body)
    assert (r.status_code, r.json()) == (503, failed)
    assert stream_events(faulty["base"], body) == [503, failed]  # its first event is the failure: no stream
    with pytest.raises(openai.InternalServerError) as e:  # a conversation's turn: the conversation stays as it was
        turn(faulty, cid, "FAIL_EVERYWHERE", 8)
    assert (e.value.status_code, e.value.response.json()) == (503, failed)
    assert h.get(f"/v1/conversations/{cid}").json()["tokens"] == tokens
    prompt = "Once upon a time"  # the server goes on, on every rank
    r = client(faulty).completions.create(model=faulty["model"], prompt=prompt, max_tokens=8, temperature=0,
                                          extra_body={"attention": "full"})
    assert r.choices[0].text == generate(model, tok, prompt, max_new_tokens=8)
    log = faulty["log"].read_text()
    assert log.count("ERROR: engine step failed on every rank (injected failure on rank 0); "
                     "cancelling the running sequences") == 3, log[-3000:]
    assert "error: " not in log and "[rank 1]" not in log, log[-3000:]


def test_sigint_ends_every_rank_cleanly_and_saves_per_rank(faulty):
    """torchrun passes SIGINT to every rank: rank 0 shuts down (the followers ignore it and
    end with rank 0's shutdown), each saving the conversation it holds to its own file."""
    cid = faulty["conversation"]
    snaps, proc = faulty["snaps"], faulty["proc"]
    assert not list(snaps.glob(f"{cid}*.snap"))  # never evicted: in memory only
    ranks = rank_pids(proc)
    assert sorted(ranks) == [0, 1]
    before = len(faulty["log"].read_text())
    proc.send_signal(signal.SIGINT)
    assert ended(proc, ranks, 45)
    log = faulty["log"].read_text()[before:]
    assert "error: " not in log and "[rank 1]" not in log and "ERROR" not in log, log[-3000:]
    assert sorted(p.name for p in snaps.glob(f"{cid}*")) == [f"{cid}.json", f"{cid}.rank0-of-2.snap",
                                                             f"{cid}.rank1-of-2.snap"]
    assert json.loads((snaps / f"{cid}.json").read_text())["id"] == cid


def test_a_restarted_server_continues_its_conversations(faulty, reference):
    _, second, length = reference
    cid = faulty["conversation"]
    s = faulty["relaunch"]()  # the same --snapshot-dir
    h = httpx.Client(base_url=s["base"], timeout=60)
    assert not h.get(f"/v1/conversations/{cid}").json()["in_memory"]
    assert turn(s, cid, QUESTION, 8) == second  # loaded on every rank: a never-restarted ChatSession's answer
    assert h.get(f"/v1/conversations/{cid}").json()["tokens"] == length


def test_a_step_failed_on_rank_1_only_stops_every_rank(faulty):
    """Rank 1's engine no longer matches rank 0's: the open request fails, every rank exits
    with the message, nothing is saved (the memories may differ)."""
    proc, snaps, cid = faulty["proc"], faulty["snaps"], faulty["conversation"]
    ranks = rank_pids(proc)
    saved = {p.name: p.read_bytes() for p in snaps.glob(f"{cid}*")}
    message = ("rank 1: an engine step failed (injected failure on rank 1 only) on some ranks only: their engines "
               "now differ, so the server stops")
    start = time.monotonic()
    body = dict(model=faulty["model"], prompt="FAIL_ON_RANK_1, says this prompt", max_tokens=8, temperature=0,
                attention="full")
    assert stream_events(faulty["base"], body) == [503, failure(message)]
    assert ended(proc, ranks, 30) and time.monotonic() - start < 20
    log = faulty["log"].read_text()
    assert f"ERROR: stopping the server: {message}\n" in log, log[-3000:]
    assert re.search(f"^error: {re.escape(message)}$", log, re.M), log[-3000:]  # rank 0's exit
    assert exit_code(log, ranks[0]) == 1, log[-3000:]  # not killed by torchrun's SIGTERM (rank 1 failed)
    assert f"[rank 1] error: {message}\n" in log, log[-3000:]
    assert {p.name: p.read_bytes() for p in snaps.glob(f"{cid}*")} == saved


def test_a_dead_follower_fails_the_open_stream_and_ends_rank_0(tiny_folder, tmp_path):
    """Rank 1 killed while a stream is open: rank 0's next collective fails at once; the
    stream ends with an error event, rank 0 exits with an error naming the collective,
    torchrun ends, well before the collective timeout (30 s here)."""
    with launched(tiny_folder, tmp_path) as s:
        ranks = rank_pids(s["proc"])
        killed = []

        def kill():
            killed.append(time.monotonic())
            os.kill(ranks[1], signal.SIGKILL)
        body = dict(model=s["model"], prompt="Once upon a time", max_tokens=1000, temperature=0, attention="full")
        events = stream_events(s["base"], body, on_first=kill)
        collective = r"rank 0: an? (all_reduce|broadcast|all_gather) failed: another rank died"
        assert events[0] == 200 and events[-1] == "[DONE]" and all("choices" in e for e in events[1:-2]), events
        error = events[-2]["error"]
        assert re.match(collective, error["message"]), error
        assert (error["type"], error["code"]) == ("server_error", "cancelled")
        assert ended(s["proc"], {0: ranks[0]}, 30) and time.monotonic() - killed[0] < 15
        log = s["log"].read_text()
        assert re.search("^ERROR: stopping the server: " + collective, log, re.M), log[-3000:]
        assert re.search("^error: " + collective, log, re.M), log[-3000:]
        assert exit_code(log, ranks[0]) == 1, log[-3000:]  # not killed by torchrun's SIGTERM (rank 1 died)
