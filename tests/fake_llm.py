"""The tests' one in-process chat model (the ChatModel protocol, no HTTP).

`FakeChatModel(answer)` replies with `answer(messages, call)` (call counts from 1); the answer may
raise, as a broken endpoint does. It counts its calls and closes. For the HTTP path, see
fake_openai.py.
"""

from __future__ import annotations

import asyncio

from embedforge.llm import Completion


def passage_of(messages: list[dict]) -> str:
    """The passage text of the last user message, without the delimiter lines."""
    content = messages[-1]["content"].splitlines()
    return "\n".join(line for line in content if not line.startswith("####") and line != "Passage:")


def from_passage(passage: str, call: int) -> str:
    words = passage.split()
    return f"what about {words[1]} {words[4]} history"


class FakeChatModel:
    def __init__(self, answer=None, name: str = "fake"):
        self.identity = {"model": name, "base_url": "memory"}
        self.answer = answer or (lambda messages, call: from_passage(passage_of(messages), call))
        self.calls = 0
        self.closed = 0

    async def complete(self, messages, *, temperature, max_tokens, response_format="text", seed=None):
        self.calls += 1
        text = self.answer(messages, self.calls)
        await asyncio.sleep(0)
        return Completion(text=text, finish_reason="stop", usage={"prompt_tokens": 10, "completion_tokens": 5})

    async def aclose(self):
        self.closed += 1
