"""The server's engine thread (``server.runner.EngineRunner``) when an engine step fails
(a bug, not bad input): every sequence ends and its listener hears it (the one the failed
step had finished with its own reason, the others cancelled and told why), and the thread
goes on serving the next request. In process, on the tiny random Llama."""

from __future__ import annotations

import asyncio

from infllm_lite.engine import Engine, Request
from infllm_lite.server.runner import EngineRunner


def test_a_failed_step_ends_every_sequence_with_its_reason_and_the_runner_goes_on(tiny, monkeypatch):
    model, _ = tiny
    engine = Engine(model, attention_kernel="window-eager")
    sampled, failing = Engine._sampled, set()

    def sampled_or_fail(self, seq, logits):
        if seq.id in failing:
            raise RuntimeError("injected")
        return sampled(self, seq, logits)

    monkeypatch.setattr(Engine, "_sampled", sampled_or_fail)
    runner = EngineRunner(engine, max_queue=8)

    async def answers(requests, fail=()) -> list:
        queue: asyncio.Queue = asyncio.Queue()
        ids = runner.submit(requests, queue)
        failing.update(ids[i] for i in fail)
        ends = {}
        while len(ends) < len(ids):
            item = await asyncio.wait_for(queue.get(), 30)
            if len(item) == 3:  # (tag, event, seq): the end
                ends[item[0]] = item[2]
        return [ends[i] for i in range(len(ids))]

    async def main():
        runner.start()
        try:
            short = Request(list(range(5, 12)), max_new_tokens=1, stop_token_ids=frozenset())
            long = Request(list(range(20, 30)), max_new_tokens=4, stop_token_ids=frozenset())
            done, failed = await answers([short, long], fail=[1])
            assert (done.finish_reason, len(done.token_ids), done.error) == ("length", 1, None)
            assert failed.finish_reason == "cancelled"
            assert failed.error == "an engine step failed (injected); the request was cancelled"
            again, = await answers([long])
            assert again.finish_reason == "length" and len(again.token_ids) == 4
        finally:
            runner.stop()

    asyncio.run(main())
    assert not engine.sequences and engine.reserved == 0
