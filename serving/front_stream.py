"""The front's stream continuation: what a ``/generate`` stream has sent so far, and the request
that has a restarted group make the rest (the prompt plus the token ids already sent)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp


class StreamProgress:
    """What a ``/generate`` stream has sent so far, and the request for the rest."""

    def __init__(self, payload: dict[str, Any]) -> None:
        self.payload = payload
        self.tokens: list[int] = []
        self.text: list[str] = []
        self.done = False

    def can_continue(self, path: str) -> bool:
        return path == "/generate" and not self.done

    async def relay(self, response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
        """Rank 0's events, one by one; raises a ``CUT`` error where the stream ends without ``[DONE]``."""
        async for raw in response.content:  # line by line
            line = raw.decode().rstrip("\r\n")
            if not line.startswith("data: "):
                continue
            data = line.removeprefix("data: ")
            if data == "[DONE]":
                self.done = True
                yield b"data: [DONE]\n\n"
                return
            chunk = json.loads(data)
            if "token_id" in chunk:
                self.tokens.append(int(chunk["token_id"]))
                self.text.append(str(chunk.get("text", "")))
            elif isinstance(chunk.get("usage"), dict) and self.tokens:
                chunk["usage"] = self.usage(chunk["usage"])
                data = json.dumps(chunk)
            yield f"data: {data}\n\n".encode()
        raise aiohttp.ClientPayloadError("the stream ended before [DONE]")

    def usage(self, usage: dict[str, Any]) -> dict[str, Any]:
        """The whole stream's usage (a continued stream's last part counts only itself)."""
        first = self.payload.get("_front_prompt_tokens")
        completion = len(self.tokens)
        return {**usage, "completion_tokens": completion} | ({"prompt_tokens": first} if first else {})

    def rest(self) -> bytes:
        """The request for the rest: the prompt plus the tokens sent, and that many fewer to make."""
        rest = {k: v for k, v in self.payload.items() if not k.startswith("_front")}
        if "input_ids" in rest:
            rest["input_ids"] = [[*rest["input_ids"][0], *self.tokens]]
            self.payload.setdefault("_front_prompt_tokens", len(self.payload["input_ids"][0]))
        else:  # no token ids were given: the text sent so far follows the prompt
            rest["prompt"] = str(rest["prompt"]) + "".join(self.text)
        wanted = rest.get("max_new_tokens")
        if isinstance(wanted, int):
            rest["max_new_tokens"] = max(1, wanted - len(self.tokens))
        return json.dumps(rest).encode()


def sse(chunk: dict[str, Any]) -> bytes:
    """One server-sent event of ``chunk``."""
    return f"data: {json.dumps(chunk)}\n\n".encode()
