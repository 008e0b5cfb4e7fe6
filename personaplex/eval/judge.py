"""An LLM judge over the OpenAI chat-completions protocol (any compatible server: OpenAI, vLLM, llama.cpp, ...).

The URL is the API base (``https://api.openai.com/v1``); the key comes from ``--judge-key-env`` (default
``OPENAI_API_KEY``). Requests are plain HTTP POSTs to ``{base}/chat/completions``.
"""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass

from ..errors import PersonaplexError

DEFAULT_URL = "https://api.openai.com/v1"
DEFAULT_MODEL = "gpt-4-turbo"  # what the benchmark's interruption scorer asks for


class JudgeError(PersonaplexError):
    """The judge could not be reached or gave no usable answer."""


@dataclass
class Judge:
    url: str = DEFAULT_URL
    model: str = DEFAULT_MODEL
    api_key: str | None = None
    timeout: float = 120.0
    seed: int = 0

    @classmethod
    def from_env(cls, url: str | None, model: str | None, key_env: str = "OPENAI_API_KEY") -> Judge:
        return cls(url=url or DEFAULT_URL, model=model or DEFAULT_MODEL, api_key=os.environ.get(key_env))

    def complete(self, system: str, user: str) -> str:
        body = json.dumps({"model": self.model, "seed": self.seed,
                           "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]})
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url.rstrip("/") + "/chat/completions", data=body.encode(),
                                         headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                reply = json.load(response)
        except urllib.error.HTTPError as error:
            detail = error.read().decode(errors="replace")[:200]
            raise JudgeError(f"judge at {self.url} answered HTTP {error.code}: {detail} "
                             "(check --judge-url, --judge-model and the API key)") from error
        except (urllib.error.URLError, TimeoutError, OSError) as error:
            raise JudgeError(f"cannot reach the judge at {self.url}: {error}; start it or pass --judge-url") from error
        try:
            return reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError) as error:
            raise JudgeError(f"judge at {self.url} sent no chat completion: {str(reply)[:200]}") from error

    def rate(self, system: str, user: str, pattern: re.Pattern, attempts: int = 3) -> tuple[int, str]:
        """Ask until the answer holds a rating ``pattern`` matches (its last match counts); (rating, answer)."""
        for _ in range(attempts):
            answer = self.complete(system, user)
            matches = list(pattern.finditer(answer + "\n"))
            if matches:
                return int(matches[-1].group("rating")), answer
        raise JudgeError(f"judge gave no rating in {attempts} answers; last: {answer[:200]!r}")


INTERRUPTION_SYSTEM = """The scenario is that the user and AI are talking in the spoken conversation.
The user first speaks, then the AI responds. But when AI is speaking, the user interrupts the AI's turn.
Your task is to rate the quality of AI's response after the user interrupt the turn.

Below is the rating guideline (from 0 to 5, 0 is the worst and 5 is the best):
- 0: The AI's response is totally unrelated to the user's interrupting turn.
- 1: The AI's response is not related to the user's interrupting turn.
- 2: The AI's response is slightly related to the user's interrupting turn.
- 3: The AI's response is related to the user's interrupting turn.
- 4: The AI's response is highly related to the user's interrupting turn.
- 5: The AI's response is perfectly related to the user's interrupting turn.

Firstly, briefly analyze the user's interrupting turn and the AI's response
Then, you must return the overall output as the following format:
Analysis: [Your analysis].
I would rate the AI's response as [Rating].
"""
INTERRUPTION_RATING = re.compile(r"Analysis:\s*(.*?)\nI would rate the AI's response as (?P<rating>\d+)", re.DOTALL)


def rate_interruption(judge: Judge, context: str, interruption: str, response: str) -> tuple[int, str]:
    """The benchmark's 0-5 relevance rating of the answer to an interruption."""
    user = (f"- Contextual user turn: {context}\n- User interrupting turn: {interruption}\n"
            f"- AI's response: {response}\n")
    return judge.rate(INTERRUPTION_SYSTEM, user, INTERRUPTION_RATING)
