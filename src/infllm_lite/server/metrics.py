"""``GET /metrics``: Prometheus counters and gauges in a registry of the server's own (two
servers in one process do not share them)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

TIERS = ("fast", "host", "disk")


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("infllm_requests", "HTTP requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("infllm_prompt_tokens", "prompt tokens read", registry=r)
        self.completion_tokens = Counter("infllm_completion_tokens", "tokens generated", registry=r)
        self.cancelled = Counter("infllm_cancelled_sequences", "sequences cancelled (client gone)", registry=r)
        self.queue = Gauge("infllm_queue_length", "sequences waiting for memory", registry=r)
        self.running = Gauge("infllm_running_sequences", "sequences reading or decoding", registry=r)
        self.reserved = Gauge("infllm_memory_reserved_bytes",
                              "attention memory reserved by running sequences (predicted at their longest)",
                              registry=r)
        self.held = Gauge("infllm_memory_held_bytes", "attention memory held by idle conversations", registry=r)
        self.budget = Gauge("infllm_memory_budget_bytes", "the attention memory budget (0: unlimited)", registry=r)
        self.blocks = Gauge("infllm_memory_blocks", "InfLLM memory blocks of running sequences and held "
                            "conversations, by tier (fast: cached copies in the attention's slots)",
                            ["tier"], registry=r)
        self.conversations = Gauge("infllm_conversations", "conversations, by where their memory is",
                                   ["where"], registry=r)
        self.evictions = Counter("infllm_conversation_evictions", "conversations saved to a snapshot and "
                                 "evicted from memory", registry=r)
        self.loads = Counter("infllm_conversation_loads", "conversations loaded back from their snapshot", registry=r)
        self.ttft = Histogram("infllm_time_to_first_token_seconds", "from submission to the first token",
                              buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120), registry=r)

    def engine_state(self, engine, memories: list) -> None:
        """The gauges from the engine (queue, running, memory) and ``memories``' block tiers."""
        self.queue.set(len(engine.waiting))
        self.running.set(len(engine.running))
        self.reserved.set(engine.reserved)
        self.held.set(engine.held_bytes)
        self.budget.set(engine.memory_budget or 0)
        counts = dict.fromkeys(TIERS, 0)
        for state in memories:
            pool = state.stats() if state is not None else None
            if pool is not None:
                counts["fast"] += pool.blocks_fast
                counts["host"] += pool.blocks_host
                counts["disk"] += pool.blocks_disk
        for tier, n in counts.items():
            self.blocks.labels(tier=tier).set(n)

    def render(self) -> bytes:
        return generate_latest(self.registry)
