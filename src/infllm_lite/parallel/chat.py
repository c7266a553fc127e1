"""``infllm-lite chat --tensor-parallel`` under ``torchrun``: rank 0 reads the user's
lines and broadcasts each one (commands too) to the other ranks; every rank then runs the
same :class:`~infllm_lite.chat.ChatSession` step on its shard
(:func:`infllm_lite.chat_cli.run_chat` with ``peers``), so greedy and seeded answers are
the single process's, token for token. Only rank 0's stdout is real
(:func:`~.launch.load_tensor_parallel`).

After each step the ranks compare its outcome (one ``all_gather`` of the error, if any,
and the memory's length), so a step that failed on one rank only (``/load`` of a file
another rank lacks, a full disk) is undone or reported on every rank alike; an answer
that left the ranks' memories different ends the chat on every rank.

The lines travel over a gloo group of their own, whose timeout is the user's thinking
time: ``INFLLM_LITE_CHAT_WAIT`` seconds (default a day), not the collective timeout. An
end of input ends every rank (exit 0); an error on rank 0 while it reads (Ctrl-C too:
torchrun stops every rank on it) is sent to the others, which exit with an error; a
rank that dies closes its connections and the others' next collective fails.
"""

from __future__ import annotations

from datetime import timedelta

import torch.distributed as dist

from ..errors import InfLLMLiteError
from .group import all_gather_object, broadcast_object, env_seconds

DEFAULT_WAIT_S = 24 * 3600.0
WAIT = "INFLLM_LITE_CHAT_WAIT"


class ChatPeers:
    """The ranks of a tensor-parallel chat, as :func:`~infllm_lite.chat_cli.run_chat`
    sees them: who reads, how a line reaches everyone, how a step's outcome is agreed."""

    interruptible = False  # Ctrl-C ends the launch (torchrun's own handler); no [stopped]

    def __init__(self, group, wait_s: float | None = None):
        wait_s = env_seconds(WAIT, DEFAULT_WAIT_S) if wait_s is None else wait_s
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        ranks = dist.get_process_group_ranks(group)  # global ranks; ``group``'s rank 0 reads
        self.reader = ranks[0]
        self.lines = dist.new_group(ranks, backend="gloo", timeout=timedelta(seconds=wait_s))
        self.outcomes = dist.new_group(ranks, backend="gloo")  # the collective timeout

    def share_line(self, read):
        """Rank 0's next line (``read()``: the text, or None at the end of input) on every
        rank. An exception in ``read`` is passed on to the other ranks, which raise
        :class:`InfLLMLiteError`, and re-raised on rank 0."""
        if self.rank != 0:
            line = broadcast_object(None, self.lines, self.reader, WAIT)
            if isinstance(line, tuple):  # ("abort", why): rank 0 failed
                raise InfLLMLiteError(f"rank 0 ended the chat ({line[1]})")
            return line
        try:
            line = read()
        except BaseException as e:
            why = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            try:
                broadcast_object(("abort", why), self.lines, self.reader, WAIT)
            except InfLLMLiteError:  # the others are gone already (Ctrl-C reached them too)
                pass
            raise
        return broadcast_object(line, self.lines, self.reader, WAIT)

    def settle(self, error: Exception | None, *, length: int | None = None) -> str | None:
        """Every rank's outcome of the step just run: None when it succeeded everywhere,
        else the message to show (rank 0's, or ``rank R: ...``). ``length``: for an
        answer, this rank's memory length after it. Raises :class:`InfLLMLiteError` when an
        answer failed on some ranks only, or left the memories at different lengths: the
        ranks cannot go on together."""
        seen = all_gather_object((None if error is None else str(error), length), self.outcomes)
        failed = [(r, message) for r, (message, _) in enumerate(seen) if message is not None]
        differ = len({n for _, n in seen}) > 1
        if not failed and not differ:
            return None
        if failed:
            r, message = failed[0]
            message = message if r == 0 else f"rank {r}: {message}"
        else:
            message = f"the answer left the ranks' memories at different lengths {[n for _, n in seen]}"
        if differ or (length is not None and len(failed) < len(seen)):
            raise InfLLMLiteError(f"{message}; the ranks' memories now differ, so the chat ends")
        return message
