"""The teacher interface: a chat backend turns conversations into generations.

Backends that run inside a Ray Data actor (transformers, openai) implement `ChatBackend`;
the vLLM backend is a Ray Data processor instead (see `vllm_backend.py`). Every generation
carries its token counts, so stages can account for teacher compute.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

__all__ = ["Generation", "GenParams", "ChatBackend", "Messages"]

Messages = list[dict[str, str]]


@dataclass
class GenParams:
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    top_logprobs: int = 0  # > 0: ask for that many alternatives per generated token (backends that can)


@dataclass
class Generation:
    text: str
    input_tokens: int
    output_tokens: int
    finish_reason: str  # "stop", "length" (hit max_new_tokens) or "error"
    error: str | None = None
    # With GenParams.top_logprobs: per generated token, {token text: logprob} of its top alternatives;
    # None when the backend was not asked or the server sent none.
    top_logprobs: list[dict[str, float]] | None = None


class ChatBackend(Protocol):
    def generate(self, conversations: list[Messages], params: GenParams) -> list[Generation]:
        """One generation per conversation, in order."""
        ...
