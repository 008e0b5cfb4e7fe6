"""The judge client against a local OpenAI-compatible chat-completions server (aiohttp, in a thread)."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest
from aiohttp import web

from personaplex.eval.judge import Judge, JudgeError, rate_interruption


class FakeChatServer:
    """Answers POST /v1/chat/completions with the next scripted reply; records each request."""

    def __init__(self, replies=None, status: int = 200, reply_for=None):
        self.replies = list(replies or [])
        self.reply_for = reply_for  # callable(request body) -> reply text, when no scripted replies are left
        self.status = status
        self.requests: list[dict] = []
        self.headers: list[dict] = []

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        if self.status != 200:
            return web.json_response({"error": {"message": "invalid api key"}}, status=self.status)
        text = self.replies.pop(0) if self.replies else self.reply_for(body)
        return web.json_response({"id": "x", "object": "chat.completion", "model": body["model"],
                                  "choices": [{"index": 0, "finish_reason": "stop",
                                               "message": {"role": "assistant", "content": text}}]})

    def __enter__(self):
        self.loop = asyncio.new_event_loop()
        started = threading.Event()

        async def start():
            app = web.Application()
            app.router.add_post("/v1/chat/completions", self._handle)
            self.runner = web.AppRunner(app)
            await self.runner.setup()
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            await site.start()
            self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/v1"
            started.set()

        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(start(), self.loop)
        assert started.wait(10)
        return self

    def __exit__(self, *exc):
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def test_interruption_rating_over_the_wire():
    reply = "Analysis: The answer talks about cats as asked.\nI would rate the AI's response as 4."
    with FakeChatServer([reply]) as server:
        judge = Judge(url=server.url, model="judge-model", api_key="sk-test")
        rating, answer = rate_interruption(judge, "tell me about dogs", "wait, cats instead", "cats are great")
    assert rating == 4 and answer == reply
    body, headers = server.requests[0], server.headers[0]
    assert body["model"] == "judge-model" and body["seed"] == 0
    assert [m["role"] for m in body["messages"]] == ["system", "user"]
    assert "User interrupting turn: wait, cats instead" in body["messages"][1]["content"]
    assert "AI's response: cats are great" in body["messages"][1]["content"]
    assert headers["Authorization"] == "Bearer sk-test"


def test_answers_without_a_rating_are_asked_again():
    replies = ["I cannot decide.", "Analysis: off topic.\nI would rate the AI's response as 1."]
    with FakeChatServer(replies) as server:
        rating, _ = rate_interruption(Judge(url=server.url), "a", "b", "c")
    assert rating == 1 and len(server.requests) == 2
    with FakeChatServer(["no rating"] * 3) as server, pytest.raises(JudgeError, match="no rating in 3 answers"):
        rate_interruption(Judge(url=server.url), "a", "b", "c")


def test_http_errors_and_unreachable_servers_are_explained():
    with FakeChatServer(status=401) as server, pytest.raises(JudgeError, match="HTTP 401.*API key"):
        Judge(url=server.url).complete("s", "u")
    with FakeChatServer() as server:
        url = server.url
    with pytest.raises(JudgeError, match="cannot reach the judge"):
        Judge(url=url, timeout=5).complete("s", "u")


def test_key_comes_from_the_named_environment_variable(monkeypatch):
    monkeypatch.setenv("MY_JUDGE_KEY", "secret")
    judge = Judge.from_env("http://localhost:1/v1", None, "MY_JUDGE_KEY")
    assert judge.api_key == "secret" and judge.model == "gpt-4-turbo"
    assert json.loads(json.dumps(judge.__dict__))["url"] == "http://localhost:1/v1"
