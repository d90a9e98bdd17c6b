"""The append-only cache of raw API responses, kept apart from the parsed results.

One JSON line per answered request: {"key", "model", "response"} where `response` is the server's reply body as it
came. The key is a hash of (model, messages, parameters, prompt version), so a re-run of the same command finds every
answered request and sends none of them again, a changed parser re-reads the same answers, and a changed prompt or
model asks anew. A line torn by a kill is dropped (and cut off before the next append); nothing is ever rewritten.
The file is created with the first answer, so a run that fails before any leaves none behind.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from app.data import intact_json_lines
from app.errors import UserError

FORMAT = "app.cot.cache/1"


def request_key(model: str, messages: list[dict], params: dict, prompt_version: str) -> str:
    """sha256 of the compact, key-sorted JSON of {"messages", "model", "params", "prompt_version"}."""
    return request_keys(model, messages, [params], prompt_version)[0]


def _dumps(value) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def request_keys(model: str, messages: list[dict], variants: list[dict], prompt_version: str) -> list[str]:
    """request_key for each of several parameter sets of one request, the messages serialized and hashed once:
    the bytes of the key-sorted dump ("messages" < "model" < "params" < "prompt_version"), built in that order."""
    head = hashlib.sha256(('{"messages":' + _dumps(messages) + ',"model":' + _dumps(model)).encode("utf-8"))
    tail = ',"prompt_version":' + _dumps(prompt_version) + "}"
    keys = []
    for params in variants:
        h = head.copy()
        h.update((',"params":' + _dumps(params) + tail).encode("utf-8"))
        keys.append(h.hexdigest())
    return keys


class ResponseCache:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.entries: dict[str, dict] = {}
        self.handle = None
        self._end = 0  # byte offset after the last intact line
        self.appended = 0
        if self.path.is_file():
            self._load()
        elif self.path.exists():
            raise UserError(f"{self.path}: the response cache is not a file")

    def _load(self) -> None:
        try:
            data = self.path.read_bytes()
        except OSError as err:
            raise UserError(f"{self.path}: cannot read the response cache ({err.strerror or err})") from None
        values, self._end = intact_json_lines(data)
        if values and not (isinstance(values[0], dict) and values[0].get("format") == FORMAT):
            raise UserError(f"{self.path}: not a response cache of this program (set cache_file to another path)")
        for obj in values:
            if isinstance(obj, dict) and isinstance(obj.get("key"), str) and isinstance(obj.get("response"), dict):
                self.entries.setdefault(obj["key"], obj["response"])

    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    def __len__(self) -> int:
        return len(self.entries)

    def put(self, key: str, model: str, response: dict) -> None:
        if key in self.entries:
            return
        try:
            if self.handle is None:
                self._open()
            self.handle.write(json.dumps({"key": key, "model": model, "response": response}, ensure_ascii=False) + "\n")
            self.handle.flush()  # in the OS once written: a killed process loses nothing it got back
        except OSError as err:
            raise UserError(f"{self.path}: cannot write the response cache ({err.strerror or err})") from None
        self.entries[key] = response
        self.appended += 1

    def _open(self) -> None:
        if self._end > 0:
            self.handle = open(self.path, "r+", encoding="utf-8")
            self.handle.seek(self._end)
            self.handle.truncate()
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(self.path, "w", encoding="utf-8")
        self.handle.write(json.dumps({"format": FORMAT}) + "\n")

    def close(self) -> None:
        if self.handle is not None:
            try:
                self.handle.flush()
                os.fsync(self.handle.fileno())
            except OSError:
                pass
            self.handle.close()
            self.handle = None
