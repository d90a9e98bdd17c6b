"""Chain-of-thought data generation (`python -m app cot ...`) against a scripted, fault-injecting OpenAI-compatible
server on 127.0.0.1 (tests/cot_server.py), and against `transformers serve` on the tiny model."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from cot_server import ScriptedServer, default_decide  # noqa: E402

pytest.importorskip("openai")

from app.cli import main  # noqa: E402
from app.errors import UserError  # noqa: E402
from app.pipelines.serve import free_port, transformers_serve  # noqa: E402
from app.tasks.nli_cot.datagen import pipeline  # noqa: E402
from app.tasks.nli_cot.datagen.cache import ResponseCache  # noqa: E402
from app.tasks.nli_cot.datagen.config import load_datagen_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-test-not-a-real-key-42"
PLACES = ["museum", "beach", "kitchen", "park", "library", "garden"]


def rows(n: int) -> list[dict]:
    """n distinct rows; the server answers 1 iff 'indoors' matches the place; every third gold label is flipped
    so that the server is wrong on exactly those rows."""
    out = []
    for i in range(n):
        place = PLACES[i % len(PLACES)]
        premise, hypothesis = f"In the {place}, person {i} is reading.", f"Person {i} is reading indoors."
        right = default_decide(premise, hypothesis)
        out.append({"premise": premise, "hypothesis": hypothesis, "label": 1 - right if i % 3 == 0 else right})
    return out


def write_csv(path: Path, data: list[dict]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(data[0]))
        w.writeheader()
        w.writerows(data)
    return path


def read_table(path: Path) -> list[dict]:
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def config(server: ScriptedServer, *extra: str):
    return load_datagen_config(None, [f"--base_url={server.base_url}", "--api_key_env=COT_TEST_KEY",
                                      "--progress=False", "--backoff_base=0.05", "--backoff_max=2", *extra])


@pytest.fixture(autouse=True)
def api_key_env(monkeypatch):
    monkeypatch.setenv("COT_TEST_KEY", KEY)


@pytest.fixture
def server():
    with ScriptedServer(api_key=KEY) as s:
        yield s


# --- the pipeline --------------------------------------------------------------------------------------------------
def test_generate_reflect_combine_judge(server, tmp_path, capsys):
    data = rows(12)
    src = write_csv(tmp_path / "in.csv", data)
    cfg = config(server)
    gen = pipeline.generate(src, tmp_path / "gen.csv", cfg)
    out = read_table(tmp_path / "gen.csv")
    assert [r["premise"] for r in out] == [r["premise"] for r in data]  # one row per input row, in order
    assert gen["requests"] == 12 and gen["failed"] == 0 and gen["accuracy"] == pytest.approx(8 / 12, abs=1e-4)
    assert {r["source"] for r in out} == {"direct"} and {r["prompt_version"] for r in out} == {"v1"}
    assert all(r["thought_process"].startswith("Step 1") and r["predicted_label"] in ("0", "1") for r in out)
    assert server.count(kind="generate") == 12 and all(r["response_format"] for r in server.requests)

    ref = pipeline.reflect(tmp_path / "gen.csv", tmp_path / "ref.jsonl", cfg)
    wrong = {r["premise"] for i, r in enumerate(data) if i % 3 == 0}
    assert set(server.premises(kind="reflect")) == wrong and server.count(kind="reflect") == len(wrong)
    assert ref["reflected"] == 4 and ref["reflection_ok"] == 4
    reflected = read_table(tmp_path / "ref.jsonl")
    assert len(reflected) == 12 and [r["reflected"] for r in reflected] == [i % 3 == 0 for i in range(12)]
    reflect_requests = [r for r in server.requests if r["kind"] == "reflect"]
    assert {r["model"] for r in reflect_requests} == {cfg.reflect_model}

    comb = pipeline.combine(tmp_path / "ref.jsonl", tmp_path / "train.csv", cfg)
    train = read_table(tmp_path / "train.csv")
    assert [int(r["row"]) for r in train] == list(range(12))  # every original row once, in order
    assert [r["source"] for r in train] == ["reflected" if i % 3 == 0 else "direct" for i in range(12)]
    assert all(r["label"] == str(d["label"]) for r, d in zip(train, data))
    assert comb["dropped"] == 0 and {r["model"] for r in train} == {cfg.model, cfg.reflect_model}
    from app.config import load_config
    from app.tasks.nli_cot.task import NliCot  # configs/default.py's training reads it as is

    train_cfg = load_config(ROOT / "configs" / "default.py", [f"--train_file={tmp_path / 'train.csv'}"])
    loaded = NliCot().load_rows(train_cfg, "train")
    assert [r.values["label"] for r in loaded] == [d["label"] for d in data]
    assert [r.values["thought_process"] for r in loaded] == [r["thought_process"] for r in train]

    judged = pipeline.judge(tmp_path / "train.csv", tmp_path / "judge.csv", cfg)
    assert judged["mean"] == {"coherence": 5, "correctness": 4, "brevity": 3} and judged["failed"] == 0

    before = len(server.requests)  # a re-run of every step sends no request
    for step, a, b in (("generate", src, "gen.csv"), ("reflect", tmp_path / "gen.csv", "ref.jsonl"),
                       ("judge", tmp_path / "train.csv", "judge.csv")):
        first = (tmp_path / b).read_bytes()
        assert getattr(pipeline, step)(a, tmp_path / b, cfg)["requests"] == 0
        assert (tmp_path / b).read_bytes() == first
    assert len(server.requests) == before
    assert KEY not in capsys.readouterr().err
    assert not any(KEY in p.read_text(encoding="utf-8") for p in tmp_path.iterdir())


def test_consistency_pass_keeps_only_agreeing_reasoning(server, tmp_path):
    data = rows(9)
    src = write_csv(tmp_path / "in.csv", data)
    cfg = config(server, "--consistency_check=True")
    pipeline.generate(src, tmp_path / "gen.csv", cfg)
    disagree = data[3]["premise"]
    server.consistency = lambda p, h, r: (1 - int(r[-2])) if p == disagree else int(r[-2])
    ref = pipeline.reflect(tmp_path / "gen.csv", tmp_path / "ref.csv", cfg)
    assert ref["consistency"]["checked"] == 3 and server.count(kind="consistency") == 3
    status = {r["premise"]: r["reflection_status"] for r in read_table(tmp_path / "ref.csv")}
    assert status[disagree] == "inconsistent" and sum(s == "ok" for s in status.values()) == 2
    comb = pipeline.combine(tmp_path / "ref.csv", tmp_path / "train.jsonl", cfg)
    assert comb["dropped"] == 1 and comb["rows_out"] == 8
    assert disagree not in {r["premise"] for r in read_table(tmp_path / "train.jsonl")}


def test_faults_are_retried_then_recorded(server, tmp_path):
    data = rows(8)
    p = [r["premise"] for r in data]
    server.faults = {
        p[0]: [{"status": 429, "headers": {"Retry-After": "1"}}],
        p[1]: [{"status": 500}, {"status": 503}, {"status": 502}],
        p[2]: [{"sleep": 1.5}],  # longer than request_timeout
        p[3]: [{"malformed": True}, {"drop": True}],
        p[4]: [{"content": '{"thought_process": "Step 1: the premise'}],  # truncated JSON: one repair prompt
        p[5]: [{"content": '{"thought_process": "Step 1', "finish_reason": "length"},
               {"content": '{"thought_process": "Step 1: again', "finish_reason": "length"}],
        p[6]: [{"status": 500}] * 4,  # every attempt fails
        p[7]: [{"status": 408}, {"status": 409}],
    }
    cfg = config(server, "--request_timeout=0.5", "--max_retries=3")
    src = write_csv(tmp_path / "in.csv", data)
    summary = pipeline.generate(src, tmp_path / "gen.csv", cfg)
    out = read_table(tmp_path / "gen.csv")
    assert [r["premise"] for r in out] == p
    status = [r["status"] for r in out]
    assert status == ["ok", "ok", "ok", "ok", "ok", "failed", "failed", "ok"]
    assert "finish_reason=length" in out[5]["error"] and "repair" in out[5]["error"]
    assert "HTTP 500" in out[6]["error"] and "gave up after 4 attempts" in out[6]["error"]
    assert server.count(premise=p[6]) == 4  # max_retries=3: four attempts
    assert server.count(premise=p[4], kind="generate-repair") == 1 and server.count(premise=p[5]) == 2
    assert server.count(premise=p[1]) == 4 and server.count(premise=p[3]) == 3 and server.count(premise=p[7]) == 3
    first, second = [r["t"] for r in server.requests if r["premise"] == p[0]]
    assert second - first >= 0.95  # Retry-After honoured
    assert summary["retries"] >= 12
    # the failed rows are asked again on a re-run (their faults are spent now); the answered ones are not
    before = {q: server.count(premise=q) for q in p}
    again = pipeline.generate(src, tmp_path / "gen.csv", cfg)
    asked = {q for q in p if server.count(premise=q) > before[q]}
    assert asked == {p[6]} and again["requests"] == 1  # p[5]'s cut-off replies are cached answers: not re-asked
    assert read_table(tmp_path / "gen.csv")[6]["status"] == "ok"


def test_a_changed_parser_rereads_the_cached_answers(server, tmp_path, monkeypatch):
    data = rows(3)
    server.faults = {data[1]["premise"]: [{"content": "The label is 1."}, {"content": "Label: 1, as said."}]}
    src = write_csv(tmp_path / "in.csv", data)
    cfg = config(server)
    pipeline.generate(src, tmp_path / "gen.csv", cfg)
    assert [r["status"] for r in read_table(tmp_path / "gen.csv")] == ["ok", "failed", "ok"]
    from app.tasks.nli_cot.datagen import prompts as P

    strict = P.parse_thought

    def lenient(text):
        try:
            return strict(text)
        except P.ParseError:
            return {"thought_process": text, "predicted_label": int("1" in text)}

    monkeypatch.setattr(P, "parse_thought", lenient)
    n = len(server.requests)
    assert pipeline.generate(src, tmp_path / "gen.csv", cfg)["requests"] == 0 and len(server.requests) == n
    again = read_table(tmp_path / "gen.csv")
    assert [r["status"] for r in again] == ["ok", "ok", "ok"] and again[1]["thought_process"] == "The label is 1."


def test_a_prompt_version_from_the_config_asks_anew(server, tmp_path):
    src = write_csv(tmp_path / "in.csv", rows(3))
    pipeline.generate(src, tmp_path / "gen.csv", config(server))
    cfg_file = tmp_path / "cot.py"
    cfg_file.write_text('prompt_version = "v2"\n'
                        'prompts = {"v2": {"generate_system": "# Task\\nEntailment? Three steps. JSON only."}}\n',
                        encoding="utf-8")
    cfg = load_datagen_config(cfg_file, [f"--base_url={server.base_url}", "--api_key_env=COT_TEST_KEY",
                                         "--progress=False"])
    n = len(server.requests)
    summary = pipeline.generate(src, tmp_path / "gen.csv", cfg)
    assert summary["requests"] == 3 and len(server.requests) == n + 3
    assert {r["prompt_version"] for r in read_table(tmp_path / "gen.csv")} == {"v2"}
    with pytest.raises(UserError, match="prompt_version='v9': unknown"):
        load_datagen_config(None, ["--prompt_version=v9"])


def test_backoff_retry_after_and_token_limit():
    import asyncio
    import email.utils

    from app.tasks.nli_cot.datagen.client import Limiter, retry_after

    assert retry_after({"retry-after": "3"}) == 3.0 and retry_after({"retry-after-ms": "250"}) == 0.25
    date = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 < retry_after({"retry-after": date}) <= 30 and retry_after({}) is None
    cfg = load_datagen_config(None, ["--backoff_base=1", "--backoff_max=8"])
    from app.tasks.nli_cot.datagen.client import ChatClient

    client = ChatClient(cfg, ResponseCache(Path("/nonexistent/never-written.jsonl")), "k")
    delays = [[client.backoff(a) for _ in range(200)] for a in range(6)]
    for a, ds in enumerate(delays):  # capped exponential with jitter: in [cap/2, cap]
        cap = min(8, 2 ** a)
        assert all(cap / 2 <= d <= cap for d in ds) and len(set(ds)) > 100

    async def tokens():
        limiter = Limiter(rpm=None, tpm=1000)
        await asyncio.wait_for(limiter.acquire(600), 0.5)
        with pytest.raises(asyncio.TimeoutError):  # 600 + 600 > 1000 within the minute: it waits
            await asyncio.wait_for(limiter.acquire(600), 0.3)
        await asyncio.wait_for(limiter.acquire(400), 0.5)  # what still fits goes at once

    asyncio.run(tokens())


def test_token_limit_reserves_the_estimate_then_counts_reported_usage(server, tmp_path):
    import asyncio

    from app.tasks.nli_cot.datagen import prompts as P
    from app.tasks.nli_cot.datagen.client import ChatClient, Limiter, estimate_tokens

    async def settle():
        limiter = Limiter(rpm=None, tpm=1000)
        first = await limiter.acquire(600)
        waiting = asyncio.ensure_future(limiter.acquire(600))  # 600 + 600 > 1000: waits for the first's reply
        await asyncio.sleep(0.05)
        assert not waiting.done() and limiter.window_tokens == 600
        limiter.settle(first, 300)  # the reply reports 300 used: 300 + 600 fits, the waiting start goes at once
        await asyncio.wait_for(waiting, 0.5)
        assert limiter.window_tokens == 900
        limiter.settle(waiting.result(), 0)  # an error status: nothing used, the reservation is freed
        assert limiter.window_tokens == 300

    asyncio.run(settle())

    # through the client: the window holds what the server reported, not the estimates (which would have made
    # the third request wait a minute: 3 x 659 > 1800)
    cfg = config(server, "--tpm=1800", "--concurrency=1")
    client = ChatClient(cfg, ResponseCache(tmp_path / "cache.jsonl"), KEY)
    prompts = P.prompt_set(cfg)
    messages = [P.generate_messages(prompts, r["premise"], r["hypothesis"]) for r in rows(4)]
    estimates = [estimate_tokens(m, cfg.max_tokens) for m in messages]

    async def ask():
        try:
            return [await client.complete(cfg.model, m, P.THOUGHT_SCHEMA) for m in messages]
        finally:
            await client.close()

    waits = []  # what the limiter asked to sleep: counting the estimates would have asked for most of a minute
    limiter_sleep = client.limiter._sleep

    async def recorded_sleep(seconds):
        waits.append(seconds)
        await limiter_sleep(seconds)

    client.limiter._sleep = recorded_sleep
    replies = asyncio.run(ask())
    used = [r.total_tokens for r in replies]
    assert all(w < 1 for w in waits), waits
    assert server.count(kind="generate") == 4
    assert sum(estimates[:3]) > 1800 and all(0 < u < e for u, e in zip(used, estimates))
    assert client.limiter.window_tokens == sum(used)


def test_identical_rows_in_flight_are_requested_once(server, tmp_path):
    server.latency = 0.2  # each row's twin starts while the first is still waiting for its answer
    data = rows(5)
    failing = data[4]["premise"]
    server.faults = {failing: [{"status": 418}]}  # refused: the twin gets the same failure, not a request of its own
    twins = [r for d in data for r in (d, dict(d))] + [dict(data[0])]
    src = write_csv(tmp_path / "in.csv", twins)
    summary = pipeline.generate(src, tmp_path / "gen.csv", config(server, "--concurrency=8"))
    assert [server.count(premise=d["premise"]) for d in data] == [1] * 5  # one request per distinct row
    assert summary["requests"] == 5 and summary["shared"] == 6 and summary["failed"] == 2
    assert summary["cache_hits"] == 5  # the twins answered; the failing one's twin failed with it
    out = read_table(tmp_path / "gen.csv")
    assert [r["premise"] for r in out] == [r["premise"] for r in twins]
    by_premise = {}
    for r in out:
        by_premise.setdefault(r["premise"], set()).add((r["status"], r["thought_process"], r["predicted_label"]))
    assert all(len(v) == 1 for v in by_premise.values())  # every twin has its first's answer
    assert {r["status"] for r in out if r["premise"] == failing} == {"failed"}
    assert all("HTTP 418" in r["error"] for r in out if r["premise"] == failing)


def test_structured_output_auto_falls_back_to_prompt_only(server, tmp_path, capsys):
    server.refuse_response_format = True
    src = write_csv(tmp_path / "in.csv", rows(6))
    cfg = config(server, "--concurrency=1")
    summary = pipeline.generate(src, tmp_path / "gen.csv", cfg)
    assert summary["structured_output"] is False and summary["failed"] == 0
    assert server.count(status=400) == 1 and server.count(status=200) == 6
    assert "refused response_format" in capsys.readouterr().err
    assert pipeline.generate(src, tmp_path / "gen.csv", cfg)["requests"] == 0  # cached under the prompt-only key
    off = config(server, "--structured_output=off")
    n = len(server.requests)
    pipeline.generate(src, tmp_path / "gen2.csv", off)
    assert not any(r["response_format"] for r in server.requests[n:])


def test_rpm_limit_spaces_requests(server, tmp_path):
    src = write_csv(tmp_path / "in.csv", rows(6))
    pipeline.generate(src, tmp_path / "gen.csv", config(server, "--rpm=600", "--concurrency=6"))
    times = sorted(r["t"] for r in server.requests)
    assert times[-1] - times[0] >= 0.45  # 6 starts 0.1 s apart


def test_killed_run_resumes_without_asking_answered_rows_again(tmp_path):
    data = rows(40)
    src = write_csv(tmp_path / "in.csv", data)
    out = tmp_path / "gen.csv"
    with ScriptedServer(latency=0.1, api_key=KEY) as server:
        env = {**os.environ, "COT_TEST_KEY": KEY, "PYTHONPATH": str(ROOT)}
        cmd = [sys.executable, "-m", "app", "cot", "generate", str(src), "--output", str(out),
               f"--base_url={server.base_url}", "--api_key_env=COT_TEST_KEY", "--concurrency=2", "--progress=False"]
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        cache_file = tmp_path / "gen.csv.cache.jsonl"

        def answers_cached() -> int:  # header line excluded
            return max(cache_file.read_bytes().count(b"\n") - 1, 0) if cache_file.is_file() else 0

        while answers_cached() < 10 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not out.exists()  # nothing half-written
        cfg = config(server, "--concurrency=2")
        from app.tasks.nli_cot.datagen import prompts as P
        from app.tasks.nli_cot.datagen.client import ChatClient

        cache = ResponseCache(tmp_path / "gen.csv.cache.jsonl")
        client = ChatClient(cfg, cache, KEY)
        cached = {r["premise"] for r in data if cache.get(client.key(cfg.model, P.generate_messages(
            P.PROMPTS["v1"], r["premise"], r["hypothesis"]), P.THOUGHT_SCHEMA))}
        assert 10 <= len(cached) < 40
        n = len(server.requests)
        summary = pipeline.generate(src, out, cfg)
        again = {r["premise"] for r in server.requests[n:]}
        assert not again & cached and again | cached == {r["premise"] for r in data}
        assert summary["requests"] == 40 - len(cached) and summary["cache_hits"] == len(cached)
    result = read_table(out)
    assert [r["premise"] for r in result] == [r["premise"] for r in data] and all(r["status"] == "ok" for r in result)


# --- bad input: one line, exit 2, nothing written -------------------------------------------------------------------

def _run(argv, capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = main(argv)
    return code, capsys.readouterr().err


MISSING = object()  # the input file's text: no file at all
GOOD = None  # the input file's text: 4 good rows
BAD_CONFIG = 'model = "open-mistral-7b"\nmodle = "open-mistral-nemo"\n'


def cot_case(id_, expected, text=GOOD, args=(), name="in.csv", key=KEY, base_url="{server}", unknown_model=False):
    """A row of the bad-input table: the input file `name` holding `text`, the arguments after INPUT (default
    --output out/gen.csv; placeholders {src} the input, {tmp} the case's folder, {cfg} a config file holding
    BAD_CONFIG, {closed} a 127.0.0.1 port nothing listens on, {server} the scripted server's URL), the API key in the
    environment (None: unset), a server answering HTTP 404 for the model, and what the one error line says."""
    return pytest.param(text, tuple(args), name, key, base_url, unknown_model, expected, id=id_)


COT_BAD_INPUTS = [
    cot_case("missing-file", "in.csv: file not found", text=MISSING),
    cot_case("missing-column", "in.csv:1: missing column(s) hypothesis", text="premise,label\na,1\n"),
    cot_case("empty", "in.csv: file is empty", text=""),
    cot_case("bad-label", "in.csv:3: label must be 0 or 1", text="premise,hypothesis,label\na,b,1\nc,d,yes\n"),
    cot_case("unknown-override", "did you mean 'concurrency'", args=["--concurrence=3", "--max_retries=-1"]),
    cot_case("bad-config-key", "cot.py:2: unknown config key 'modle' (did you mean 'model'?)",
             args=["--config", "{cfg}"]),
    cot_case("closed-port", "http://127.0.0.1:{closed}/v1: cannot connect", base_url="http://127.0.0.1:{closed}/v1"),
    cot_case("unauthorized", "COT_TEST_KEY was refused", key="sk-wrong-key"),
    cot_case("no-key", "environment variable COT_TEST_KEY is not set", key=None),
    cot_case("unknown-model", "HTTP 404 for model 'open-mistral-7b'", unknown_model=True),
    cot_case("output-is-input", "is the input file; choose another path", args=["--output", "{src}"]),
    cot_case("cache-is-input", "is the input file; choose another path", args=["--cache_file={src}"]),
    cot_case("failure-report-is-input", "gen.failed.csv is the input file", name="gen.failed.csv",
             args=["--output", "{tmp}/gen.csv"]),
]


@pytest.mark.parametrize("text,args,name,key,base_url,unknown_model,expected", COT_BAD_INPUTS)
def test_bad_input_is_one_line_and_writes_nothing(text, args, name, key, base_url, unknown_model, expected, server,
                                                  tmp_path, capsys, monkeypatch):
    src = tmp_path / name
    if text is GOOD:
        write_csv(src, rows(4))
    elif text is not MISSING:
        src.write_text(text, encoding="utf-8")
    (tmp_path / "cot.py").write_text(BAD_CONFIG, encoding="utf-8")
    if key is None:
        monkeypatch.delenv("COT_TEST_KEY")
    else:
        monkeypatch.setenv("COT_TEST_KEY", key)
    if unknown_model:
        server.faults = {r["premise"]: [{"status": 404}] for r in rows(4)}
    places = {"{src}": str(src), "{tmp}": str(tmp_path), "{cfg}": str(tmp_path / "cot.py"),
              "{closed}": str(free_port()), "{server}": server.base_url}

    def fill(text: str) -> str:
        for k, v in places.items():
            text = text.replace(k, v)
        return text

    args = [fill(a) for a in args]
    output = [] if "--output" in args else ["--output", str(tmp_path / "out" / "gen.csv")]
    before = {p: p.read_bytes() for p in tmp_path.iterdir()}
    code, err = _run(["cot", "generate", str(src), *output, *args, f"--base_url={fill(base_url)}",
                      "--api_key_env=COT_TEST_KEY", "--progress=False"], capsys)
    assert code == 2, err
    assert fill(expected) in err, err
    if "did you mean 'concurrency'" in expected:
        assert "max_retries=-1" in err  # every problem at once, one per line
    else:
        assert err.count("\n") == 1 and err.startswith("error: "), err
    assert KEY not in err and "sk-wrong-key" not in err
    assert {p: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing left behind, nothing overwritten


# a server answering every request with one of these: what each row's error (and the run's one line) says
WRONG_ANSWERS = {
    "html": ({"body": "<!doctype html><html><body><h1>Sign in</h1></body></html>", "content_type": "text/html"},
             "malformed reply body (an HTML page, not JSON)"),
    "not-json": ({"body": "OK", "content_type": "text/plain"}, "malformed reply body (not JSON)"),
    "no-choices": ({"body": '{"object": "list", "data": []}'}, "malformed reply body (no choices in the reply body)"),
}


@pytest.mark.parametrize("answer", list(WRONG_ANSWERS))
def test_a_server_answering_every_row_wrongly_fails_the_run(answer, server, tmp_path, capsys):
    """Every row failed: one error line naming the endpoint and the first error, exit 2, no output, each row's error
    in the failure report. One row answered: today's run, exit 0 with the failed rows recorded, the report gone."""
    action, reason = WRONG_ANSWERS[answer]
    data = rows(4)
    src = write_csv(tmp_path / "in.csv", data)
    out, report = tmp_path / "gen.csv", tmp_path / "gen.failed.csv"
    argv = ["cot", "generate", str(src), "--output", str(out), f"--base_url={server.base_url}",
            "--api_key_env=COT_TEST_KEY", "--progress=False", "--backoff_base=0.01", "--backoff_max=0.05",
            "--max_retries=2"]
    server.always = action
    code, err = _run(argv, capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: {server.base_url}/chat/completions: every row failed (4 asked), the first: "
                          f"{reason}; gave up after 3 attempts; {out} not written, each row's error in {report}"), err
    assert not out.exists() and server.count(kind="generate") == 4 * 3  # three attempts a row
    failed = read_table(report)
    assert [r["premise"] for r in failed] == [r["premise"] for r in data]
    assert all(r["status"] == "failed" and reason in r["error"] for r in failed)

    server.always = None  # now one row is answered
    server.faults = {r["premise"]: [action] * 3 for r in data[1:]}
    code, err = _run(argv, capsys)
    assert code == 0, err
    assert [r["status"] for r in read_table(out)] == ["ok", "failed", "failed", "failed"]
    assert not report.exists()  # the earlier run's report: this output supersedes it


def test_every_judge_request_failing_fails_the_run_with_its_counters(server, tmp_path):
    src = write_csv(tmp_path / "in.csv", [{**r, "thought_process": "Step 1: read."} for r in rows(3)])
    server.always = WRONG_ANSWERS["no-choices"][0]
    with pytest.raises(pipeline.EveryRowFailed, match="every row failed \\(3 asked\\)") as err:
        pipeline.judge(src, tmp_path / "judged.jsonl", config(server, "--max_retries=1"))
    assert err.value.summary["failed"] == 3 and err.value.summary["requests"] == 6
    assert err.value.report == tmp_path / "judged.failed.jsonl" and not (tmp_path / "judged.jsonl").exists()
    assert [r["judge_status"] for r in read_table(err.value.report)] == ["failed"] * 3


def hide_openai(tmp_path: Path) -> dict:
    """The environment of a Python in which `import openai` fails as in an environment without it (a sitecustomize
    on PYTHONPATH puts a finder first that refuses the package)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import sys\n"
        "class HideOpenai:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'openai' or name.startswith('openai.'):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, HideOpenai())\n", encoding="utf-8")
    return {**os.environ, "COT_TEST_KEY": KEY, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}


@pytest.mark.parametrize("command", ["cot generate", "bench"])
def test_without_openai_it_is_one_line_naming_the_install(command, tmp_path):
    env = hide_openai(tmp_path)
    probe = subprocess.run([sys.executable, "-c", "import openai"], env=env, capture_output=True, text=True)
    assert "No module named 'openai'" in probe.stderr  # the environment does hide it
    src = write_csv(tmp_path / "in.csv", rows(2))
    if command == "bench":
        argv = [str(ROOT / "tests" / "bench" / "datagen_throughput.py")]
    else:
        argv = ["-m", "app", "cot", "generate", str(src), "--output", str(tmp_path / "out" / "gen.csv"),
                "--base_url=http://127.0.0.1:9/v1", "--api_key_env=COT_TEST_KEY"]
    r = subprocess.run([sys.executable, *argv], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("error: cot (data generation through an OpenAI-compatible API) needs openai, which is "
                               "not installed: pip install "), r.stderr
    assert "openai" in r.stderr.split("pip install ", 1)[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.csv", "site"]  # nothing written


def test_help_imports_nothing_heavy():
    code = ("import sys; from app.cli import main; main(['cot', 'generate', '-h']); "
            "print([m for m in ('openai', 'torch', 'transformers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert "--output" in out.stdout and out.stdout.strip().endswith("[]"), out.stdout + out.stderr


def test_stats_of_a_generate_output(server, tmp_path, shared_fixtures, capsys):
    src = write_csv(tmp_path / "in.csv", rows(6))
    pipeline.generate(src, tmp_path / "gen.csv", config(server))
    tok = shared_fixtures / "tokenizer" / "mistral-7b-instruct-v0.2"
    code, err = _run(["cot", "stats", str(tmp_path / "gen.csv"), "--output", str(tmp_path / "s.json"),
                      "--plot", str(tmp_path / "h.png"), f"--tokenizer={tok}"], capsys)
    assert code == 0, err
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["first_pass"]["accuracy"] == 0.6667 and s["reflection"]["rows_reflected"] == 0
    assert s["cost_usd"]["total"] > 0 and (tmp_path / "h.png").is_file()


def test_cli_refused_key_is_exactly_one_line(server, tmp_path):
    src = write_csv(tmp_path / "in.csv", rows(10))
    env = {**os.environ, "COT_TEST_KEY": "sk-wrong", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "app", "cot", "generate", str(src), "--output", str(tmp_path / "o" / "g.csv"),
                        f"--base_url={server.base_url}", "--api_key_env=COT_TEST_KEY", "--concurrency=8"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("error: ") and "COT_TEST_KEY was refused" in r.stderr and "sk-wrong" not in r.stderr
    assert not (tmp_path / "o").exists()


def test_recipe_config_loads():
    cfg = load_datagen_config(ROOT / "configs" / "cot_mistral.py", ["--concurrency=3"])
    assert (cfg.model, cfg.reflect_model, cfg.api_key_env) == ("open-mistral-7b", "open-mistral-nemo",
                                                                "MISTRAL_API_KEY")
    assert cfg.base_url == "https://api.mistral.ai/v1" and cfg.concurrency == 3
    with pytest.raises(UserError, match="unknown config key 'modle'.*did you mean 'model'"):
        load_datagen_config(None, ["--modle=x"])


# --- stats ---------------------------------------------------------------------------------------------------------
def test_stats_on_known_rows(tmp_path, shared_fixtures, capsys):
    tok = shared_fixtures / "tokenizer" / "mistral-7b-instruct-v0.2"
    table = [
        {"premise": "A cat sleeps.", "hypothesis": "An animal sleeps.", "label": 1, "thought_process": "one two",
         "predicted_label": 1, "status": "ok", "cost_usd": 0.5, "reflected": False, "reflection": "",
         "reflection_status": "", "reflect_cost_usd": 0.0, "model": "m"},
        {"premise": "A dog runs.", "hypothesis": "A dog sleeps.", "label": 0, "thought_process": "three four five",
         "predicted_label": 1, "status": "ok", "cost_usd": 0.25, "reflected": True, "reflection": "fixed it",
         "reflection_status": "ok", "reflect_cost_usd": 0.125, "model": "m"},
        {"premise": "It rains.", "hypothesis": "It is wet.", "label": 1, "thought_process": "", "predicted_label": None,
         "status": "failed", "cost_usd": 0.0, "reflected": True, "reflection": "", "reflection_status": "failed",
         "reflect_cost_usd": 0.125, "model": "m"},
    ]
    src = tmp_path / "ref.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in table), encoding="utf-8")
    code, err = _run(["cot", "stats", str(src), "--output", str(tmp_path / "stats.json"), f"--tokenizer={tok}",
                      "--length_bands=[60, 1000]"], capsys)
    assert code == 0, err
    s = json.loads((tmp_path / "stats.json").read_text())
    assert s["first_pass"] == {"model": "m", "ok": 2, "failed": 1, "correct": 1, "accuracy": 0.3333}
    assert s["reflection"] == {"rows_reflected": 2, "ok": 1, "success": 0.5, "inconsistent": 0}
    assert s["training_rows"] == 2 and s["cost_usd"] == {"first_pass": 0.75, "reflection": 0.25, "total": 1.0}
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(str(tok))
    n = [len(t(x, add_special_tokens=False)["input_ids"]) for x in ("one two", "three four five")]
    assert s["thought_tokens"]["first_pass"]["min"] == min(n) and s["thought_tokens"]["first_pass"]["max"] == max(n)
    assert [b["rows"] for b in s["accuracy_by_total_tokens"]] == [0, 2, 0]
    assert s["accuracy_by_total_tokens"][1]["accuracy"] == 0.5
    png = tmp_path / "stats.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- a real OpenAI-compatible server: `transformers serve` on the tiny model -----------------------------------------
def test_transformers_serve_prompt_only_json(tiny_model_dir, tmp_path):
    """The prompt-only JSON path against a real server. The tiny model's random weights never write the JSON object,
    so every row must come back as failed with its reason (cut off, then the repair prompt cut off too), in order,
    through real HTTP, in the failure report of a failed run, and a re-run must send nothing."""
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"transformers serve needs {', '.join(missing)} (pip install 'transformers[serving]')")
    exe = Path(sys.executable).with_name("transformers")
    if not exe.is_file():
        pytest.skip(f"no transformers console script beside {sys.executable}")
    model = tiny_model_dir  # served with its own chat template
    with transformers_serve(model, tmp_path / "serve.log") as base_url:
        src = write_csv(tmp_path / "in.csv", rows(3))
        cfg = load_datagen_config(None, [f"--base_url={base_url}", "--api_key_env=COT_TEST_KEY",
                                         f"--model={model}", "--structured_output=off", "--max_tokens=12",
                                         "--concurrency=2", "--progress=False", "--request_timeout=60"])
        with pytest.raises(pipeline.EveryRowFailed, match="every row failed .*finish_reason=length") as failed:
            pipeline.generate(src, tmp_path / "gen.jsonl", cfg)
        summary = failed.value.summary
        out = read_table(failed.value.report)  # no gen.jsonl: a run without one usable row is a failed run
        assert not (tmp_path / "gen.jsonl").exists()
        assert [r["premise"] for r in out] == [r["premise"] for r in rows(3)]
        assert summary["requests"] == 6 and summary["answered"] == 6 and summary["retries"] == 0
        assert all(r["status"] == "failed" and "finish_reason=length" in r["error"] for r in out)
        assert all(r["prompt_tokens"] > 0 and r["completion_tokens"] > 0 for r in out)  # usage from the server
        with pytest.raises(pipeline.EveryRowFailed) as again:  # the answers are cached: a re-run asks nothing
            pipeline.generate(src, tmp_path / "gen.jsonl", cfg)
        assert again.value.summary["requests"] == 0 and again.value.summary["cache_hits"] == 6


def test_stats_bad_tokenizer_and_combine_of_a_first_pass(server, tmp_path, capsys):
    src = write_csv(tmp_path / "in.csv", rows(6))
    pipeline.generate(src, tmp_path / "gen.csv", config(server))
    code, err = _run(["cot", "stats", str(tmp_path / "gen.csv"), "--output", str(tmp_path / "s" / "s.json"),
                      f"--tokenizer={tmp_path / 'no-such-tokenizer'}"], capsys)
    assert code == 2 and err.count("\n") == 1 and "tokenizer=" in err and not (tmp_path / "s").exists()
    code, err = _run(["cot", "combine", str(tmp_path / "gen.csv"), "--output", str(tmp_path / "train.csv")], capsys)
    assert code == 0, err
    train = read_table(tmp_path / "train.csv")
    assert [int(r["row"]) for r in train] == [1, 2, 4, 5] and {r["source"] for r in train} == {"direct"}


def test_request_keys_are_the_hash_of_the_sorted_compact_request_json():
    """The on-disk cache format: a key is sha256 of the key-sorted, compact JSON of the request; the
    one-serialization path for several parameter sets gives exactly those bytes."""
    import hashlib

    from app.tasks.nli_cot.datagen.cache import request_key, request_keys

    messages = [{"role": "system", "content": "Réponds en JSON"}, {"role": "user", "content": "<premise>a\nb</premise>"}]
    variants = [{"temperature": 0.0, "max_tokens": 256}, {"temperature": 0.0, "max_tokens": 256,
                                                            "response_format": {"name": "nli", "schema": {"z": 1}}}]
    want = [hashlib.sha256(json.dumps({"model": "m", "messages": messages, "params": p, "prompt_version": "v1"},
                                      sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()).hexdigest()
            for p in variants]
    assert request_keys("m", messages, variants, "v1") == want
    assert [request_key("m", messages, p, "v1") for p in variants] == want
