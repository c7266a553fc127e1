"""ChatSession: every turn reads only its new tokens, the memory holds the whole
conversation, snapshots continue identically in this process and in a new one."""

import json
import subprocess
import sys
from dataclasses import replace

import pytest

from infllm_lite.chat import ChatSession
from infllm_lite.errors import InfLLMLiteError
from infllm_lite.memory_config import MemoryConfig
from infllm_lite.snapshot import save_snapshot

MEMORY = MemoryConfig(n_init=4, n_local=64, block_size=16, topk=2, exc_block_size=32,
                      chunk_size=256, max_cached_blocks=4)


def _session(tiny, **kw):
    model, tokenizer = tiny
    options = dict(attention="infllm", memory=MEMORY, kernel="torch", max_new_tokens=12)
    options.update(kw)
    return ChatSession(model, tokenizer, **options)


def test_each_turn_reads_only_its_new_tokens(tiny):
    _, tokenizer = tiny
    chat = _session(tiny, system="You are terse.")
    chat.send("Hello there, how are you today?")
    first = chat.last_stats.prompt_tokens
    whole_first = tokenizer.apply_chat_template(chat.messages[:2], add_generation_prompt=True)
    assert first == len(tokenizer.encode(whole_first, add_special_tokens=False))
    read_before = chat.state.length
    chat.send("Tell me more.")
    # the second turn read the end of the reply (its last token, the end-of-turn) and the new
    # message with its template, nothing of the history
    suffix = "<|im_end|>\n<|im_start|>user\nTell me more.<|im_end|>\n<|im_start|>assistant\n"
    new = chat.last_stats.prompt_tokens
    assert new <= len(tokenizer.encode(suffix, add_special_tokens=False)) + 1
    assert new < 0.5 * read_before
    assert chat.state.length == len(chat.tokens)
    # what the memory read is the conversation as the template renders it
    rendered = tokenizer.apply_chat_template(chat.messages, add_generation_prompt=False)
    read = tokenizer.decode(chat.tokens)
    assert rendered.startswith(read)
    assert [m["role"] for m in chat.messages] == ["system", "user", "assistant", "user", "assistant"]


def test_document_then_questions(tiny):
    chat = _session(tiny)
    n = chat.read("The harbour of Brenn freezes in January. " * 40, progress=False)
    assert n > 300 and chat.state.length == n == len(chat.tokens)
    assert chat.stats()["blocks"] > 0
    chat.send("When does the harbour freeze?")
    assert chat.last_stats.prompt_tokens < 30
    with pytest.raises(InfLLMLiteError, match="empty"):
        chat.read("   ")


def test_stop_keeps_the_memory_consistent(tiny):
    chat = _session(tiny, max_new_tokens=40)
    pieces = []
    for piece in chat.send("Count to twenty.", stream=True):
        pieces.append(piece)
        if len(pieces) == 3:
            chat.stop()
    assert 3 <= len(pieces) <= 5
    assert chat.messages[-1] == {"role": "assistant", "content": "".join(pieces)}
    assert chat.state.length == len(chat.tokens)
    chat.send("Go on.")
    assert chat.state.length == len(chat.tokens)


def test_snapshot_continues_identically(tiny, tiny_folder, tmp_path):
    chat = _session(tiny)
    chat.read("Lena fed the wolf bread every evening. " * 30, progress=False)
    chat.send("Who fed the wolf?")
    chat.save(tmp_path / "chat.snap")
    loaded = ChatSession.load(tmp_path / "chat.snap", *tiny, kernel="torch", max_new_tokens=12)
    assert loaded.messages == chat.messages and loaded.tokens == chat.tokens
    expected = chat.send("What did she feed it?")
    assert loaded.send("What did she feed it?") == expected
    assert loaded.tokens == chat.tokens
    # a new process
    script = f"""
import torch
from infllm_lite.chat import ChatSession
from infllm_lite.loading import load_model
model, tok = load_model({str(tiny_folder)!r}, dtype=torch.float32, device="cpu", progress=False)
chat = ChatSession.load({str(tmp_path / "chat.snap")!r}, model, tok, kernel="torch", max_new_tokens=12)
print(repr(chat.send("What did she feed it?")))
"""
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True,
                         timeout=300).stdout
    assert out.strip().splitlines()[-1] == repr(expected)


@pytest.mark.parametrize("attention", ["streaming", "full"])
def test_other_modes(tiny, tmp_path, attention):
    chat = _session(tiny, attention=attention, capacity=600)
    chat.send("Hi!")
    chat.send("And again?")
    assert chat.state.length == len(chat.tokens) and chat.stats()["tokens"] == len(chat.tokens)
    chat.save(tmp_path / "c.snap")
    loaded = ChatSession.load(tmp_path / "c.snap", *tiny, kernel="torch", max_new_tokens=12)
    assert loaded.send("Once more.") == chat.send("Once more.")


def test_full_attention_refuses_more_than_it_holds(tiny):
    chat = _session(tiny, attention="full", capacity=64)
    with pytest.raises(InfLLMLiteError, match="full attention holds 64 tokens"):
        chat.send("word " * 80)
    assert chat.messages == []  # the refused turn left no trace
    chat.send("Hi")


def test_refused_snapshots(tiny, smollm, tmp_path):
    model, _ = tiny
    chat = _session(tiny)
    chat.send("Hi")
    # a memory snapshot that is not a chat's
    save_snapshot(tmp_path / "plain.snap", chat.state, model=model, mode="infllm", memory=MEMORY,
                  tokens=chat.tokens)
    with pytest.raises(InfLLMLiteError, match="not a chat"):
        ChatSession.load(tmp_path / "plain.snap", *tiny)
    path = chat.save(tmp_path / "chat.snap")
    with pytest.raises(InfLLMLiteError, match="another model"):
        ChatSession.load(path, *smollm)
    with pytest.raises(InfLLMLiteError, match="another config"):
        ChatSession.load(path, *tiny, memory=replace(MEMORY, topk=3))
    data = path.read_bytes()
    (tmp_path / "cut.snap").write_bytes(data[:-1000])
    with pytest.raises(InfLLMLiteError):
        ChatSession.load(tmp_path / "cut.snap", *tiny)
    assert json.loads(json.dumps(chat.stats()))
