"""The steps: generate, reflect, combine, judge. Each reads one table and writes one, atomically, one row per input
row in input order (combine: each original row at most once), as CSV or JSONL by the output's extension.

Every check (the openai package, input columns and labels, output paths, config, API key) comes before the first
request, so bad input is one line with nothing written; the raw-response cache is the only thing written while
requests run, so a killed run re-run sends no request that was already answered and writes the same output.

A run in which some rows failed writes its output with each row's status and error. A run in which every row of a
pass failed (a server answering HTML, non-JSON or JSON without `choices`, a model that never writes the object) made
no data: it writes no output, leaves each row's error in the failure report beside it (OUTPUT.failed.csv for
OUTPUT.csv) and is one error line naming the endpoint and the first row's error.
"""

from __future__ import annotations

import asyncio
import gc
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from app.atomic import write_atomic
from app.data import csv_text, parse_binary_label, read_rows
from app.errors import UserError
from app.tasks.nli_cot.datagen import prompts as P
from app.tasks.nli_cot.datagen.client import ChatClient, RequestFailed, api_key, endpoint, import_openai
from app.tasks.nli_cot.datagen.cache import ResponseCache

JSON_SUFFIXES = (".jsonl", ".ndjson", ".json")


# --- tables --------------------------------------------------------------------------------------------------------
def write_table(path: Path, records: list[dict]) -> None:
    columns: list[str] = []
    for r in records:
        for k in r:
            if k not in columns:
                columns.append(k)
    if path.suffix.lower() in JSON_SUFFIXES:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    else:
        text = csv_text(columns, ([_csv_value(r.get(k)) for k in columns] for r in records))
    write_atomic(path, text)


def _csv_value(v):
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (dict, list)):
        return json.dumps(v, ensure_ascii=False)
    return v


def as_int(v) -> int | None:
    if v is None or v == "" or isinstance(v, bool):
        return None if not isinstance(v, bool) else int(v)
    try:
        return int(float(v))
    except (TypeError, ValueError):
        return None


def as_float(v) -> float:
    try:
        return float(v) if v not in (None, "") else 0.0
    except (TypeError, ValueError):
        return 0.0


def as_bool(v) -> bool:
    return v is True or (isinstance(v, str) and v.strip().lower() in ("true", "1", "yes"))


@dataclass
class Item:
    line: int
    values: dict
    premise: str
    hypothesis: str
    label: int | None


def read_items(path, cfg, need_label: bool, extra: tuple[str, ...] = ()) -> list[Item]:
    path = Path(path)
    required = (cfg.premise_column, cfg.hypothesis_column) + ((cfg.label_column,) if need_label else ()) + extra
    rows = read_rows(path, required)
    has_label = cfg.label_column in rows[0].values
    items = []
    for row in rows:
        v = row.values
        texts = []
        for col in (cfg.premise_column, cfg.hypothesis_column):
            t = v.get(col)
            if not isinstance(t, str) or not t.strip():
                raise UserError(f"{path}:{row.line}: {col} must be non-empty text, found {t!r}")
            texts.append(t)
        label = parse_binary_label(v.get(cfg.label_column), path, row.line, cfg.label_column) if has_label else None
        items.append(Item(row.line, v, texts[0], texts[1], label))
    return items


def check_output(output, input_path) -> Path:
    from app.runs import check_output as check

    out = Path(output)
    check(out, Path(input_path))
    return out


def cache_path(cfg, output: Path) -> Path:
    return Path(cfg.cache_file) if cfg.cache_file else output.with_name(output.name + ".cache.jsonl")


def failure_report_path(output: Path) -> Path:
    """Where a run in which every row failed leaves its rows and their errors: OUTPUT.failed.csv beside OUTPUT.csv."""
    return output.with_name(f"{output.stem}.failed{output.suffix}")


class EveryRowFailed(UserError):
    """A pass in which no row got a usable answer: no output; `summary` holds the run's counters, `report` the file
    with each row's error."""

    def __init__(self, message: str, summary: dict, report: Path):
        super().__init__(message)
        self.summary, self.report = summary, report


def publish(out: Path, records: list[dict], summary: dict, cfg, *passes: list) -> None:
    """The step's table at `out`, unless a pass (a list of outcomes) had rows and not one usable answer: then the
    rows with their errors go to the failure report and the run is an EveryRowFailed, so that no output looks like
    success (the cache keeps every reply that came, for a re-run)."""
    report = failure_report_path(out)
    failed = next((p for p in passes if p and not any(oc.ok for oc in p)), None)
    if failed is None:
        write_table(out, records)
        report.unlink(missing_ok=True)  # an earlier run's report: this output supersedes it
        return
    write_table(report, records)
    raise EveryRowFailed(f"{endpoint(cfg)}: every row failed ({len(failed)} asked), the first: {failed[0].error}; "
                         f"{out} not written, each row's error in {report}", summary, report)


# --- running requests ----------------------------------------------------------------------------------------------
@dataclass
class Job:
    model: str
    messages: list[dict]
    schema: dict | None
    parse: Callable[[str], dict]
    shape: str


@dataclass
class Outcome:
    value: dict | None
    error: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0

    @property
    def ok(self) -> bool:
        return self.value is not None


async def _ask(client: ChatClient, job: Job, prompts: dict) -> Outcome:
    """One row: the request, then once a parse-repair request if the reply was cut off or is not the object."""
    out = Outcome(None, "")
    messages = job.messages
    problems = []
    for attempt in range(2):
        try:
            reply = await client.complete(job.model, messages, job.schema)
        except RequestFailed as err:
            out.error = "; ".join([*problems, str(err)])
            return out
        out.prompt_tokens += reply.prompt_tokens
        out.completion_tokens += reply.completion_tokens
        pin, pout = client.cfg.price(job.model)
        out.cost += (reply.prompt_tokens * pin + reply.completion_tokens * pout) / 1e6
        if reply.finish_reason == "length":
            problem = f"cut off at max_tokens={client.cfg.max_tokens} (finish_reason=length)"
        else:
            try:
                out.value = job.parse(reply.text)
                out.error = ""
                return out
            except P.ParseError as err:
                problem = str(err)
        problems.append(("repair: " if attempt else "") + problem)
        messages = P.repair_messages(prompts, job.messages, reply.text, problem, job.shape)
    out.error = "; ".join(problems)
    return out


def run_jobs(cfg, cache: ResponseCache, jobs: list[Job], desc: str) -> tuple[list[Outcome], dict]:
    """Every job's outcome, in order, and the request counters. Fatal errors (a refused key, no server) stop the
    run as one UserError."""
    key = api_key(cfg)
    # what is alive now (the openai package's modules and models, the input, the cache) lives for the whole run:
    # frozen out of the collector, a full collection does not walk it again, a pause of ~50 ms with every request
    # in flight waiting behind it
    gc.freeze()
    try:
        return asyncio.run(_run_all(cfg, cache, jobs, key, desc))
    finally:
        gc.unfreeze()


async def _run_all(cfg, cache, jobs, key, desc):
    from tqdm import tqdm

    client = ChatClient(cfg, cache, key)
    results: list[Outcome | None] = [None] * len(jobs)
    queue: asyncio.Queue = asyncio.Queue()
    for i in range(len(jobs)):
        queue.put_nowait(i)
    prompts = P.prompt_set(cfg)
    bar = None  # made when the first row is done: a run stopped by its first request (a refused key, no server)
    t0 = time.perf_counter()  # prints its one error line and nothing else

    async def worker():
        while True:
            try:
                i = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            results[i] = await _ask(client, jobs[i], prompts)
            nonlocal bar
            if bar is None:
                bar = tqdm(total=len(jobs), unit="row", desc=desc, dynamic_ncols=True, file=sys.stderr,
                           disable=not cfg.progress, smoothing=0.1)
            bar.update(1)
            c = client.counters
            if c.requests:
                bar.set_postfix_str(f"req={c.requests} tok={c.prompt_tokens + c.completion_tokens} ${c.cost:.4f}",
                                    refresh=False)

    workers = [asyncio.create_task(worker()) for _ in range(min(2 * cfg.concurrency, max(len(jobs), 1)))]
    try:
        done, pending = await asyncio.wait(workers, return_when=asyncio.FIRST_EXCEPTION)
        errors = [t.exception() for t in done if t.exception() is not None]  # every one retrieved
        if errors:
            for p in pending:
                p.cancel()
            late = await asyncio.gather(*pending, return_exceptions=True)
            errors += [e for e in late if isinstance(e, BaseException) and not isinstance(e, asyncio.CancelledError)]
            raise next((e for e in errors if isinstance(e, UserError)), errors[0])
    finally:
        if bar is not None:
            bar.close()
        cache.close()
        try:
            await client.close()
        except Exception:  # noqa: BLE001 - closing must not hide the run's own error
            pass
    c = client.counters
    counters = {"requests": c.requests, "answered": c.answered, "cache_hits": c.cache_hits, "shared": c.shared,
                "retries": c.retries,
                "errors": c.errors, "new_prompt_tokens": c.prompt_tokens, "new_completion_tokens": c.completion_tokens,
                "new_cost_usd": round(c.cost, 6), "seconds": round(time.perf_counter() - t0, 3),
                "requests_per_s": round(c.answered / (c.last_reply - c.first_sent), 2)
                if c.answered > 1 and c.last_reply > c.first_sent else None,
                "structured_output": client.structured}
    return results, counters


def _prepare(input_path, output, cfg, need_label, extra=()):
    import_openai()
    items = read_items(input_path, cfg, need_label, extra)
    out = check_output(output, input_path)
    cached = cache_path(cfg, out)
    report = failure_report_path(out)
    for name, other in (("output", out), ("failure report", report)):
        if cached.resolve() == other.resolve():
            raise UserError(f"cache_file={str(cached)!r} is the {name} file; choose another path")
    check_output(cached, input_path)
    check_output(report, input_path)
    api_key(cfg)  # before any file is touched
    cache = ResponseCache(cached)
    return items, out, cache


def _report(summary: dict) -> dict:
    print(json.dumps(summary, sort_keys=False), file=sys.stderr)
    return summary


# --- generate ------------------------------------------------------------------------------------------------------
GENERATED = ("thought_process", "predicted_label", "correct", "status", "error", "source", "model", "prompt_version",
             "prompt_tokens", "completion_tokens", "cost_usd")


def generate(input_path, output, cfg) -> dict:
    items, out, cache = _prepare(input_path, output, cfg, need_label=False)
    prompts = P.prompt_set(cfg)
    prefix = P.generate_prefix(prompts)
    jobs = [Job(cfg.model, P.generate_messages(prompts, it.premise, it.hypothesis, prefix), P.THOUGHT_SCHEMA,
                P.parse_thought, P.THOUGHT_SHAPE) for it in items]
    outcomes, counters = run_jobs(cfg, cache, jobs, "generate")
    records = []
    for it, oc in zip(items, outcomes):
        rec = {k: v for k, v in it.values.items() if k not in GENERATED}
        if it.label is not None:
            rec[cfg.label_column] = it.label
        pred = oc.value["predicted_label"] if oc.ok else None
        rec.update(thought_process=oc.value["thought_process"] if oc.ok else "", predicted_label=pred,
                   correct=None if it.label is None else (oc.ok and pred == it.label),
                   status="ok" if oc.ok else "failed", error=oc.error, source="direct", model=cfg.model,
                   prompt_version=cfg.prompt_version, prompt_tokens=oc.prompt_tokens,
                   completion_tokens=oc.completion_tokens, cost_usd=round(oc.cost, 8))
        records.append(rec)
    labelled = [r for r in records if r["correct"] is not None]
    summary = {"step": "generate", "output": str(out), "rows": len(records),
               "failed": sum(r["status"] != "ok" for r in records),
               "accuracy": round(sum(r["correct"] for r in labelled) / len(labelled), 4) if labelled else None,
               "cost_usd": round(sum(r["cost_usd"] for r in records), 6), **counters}
    publish(out, records, summary, cfg, outcomes)
    return _report(summary)


# --- reflect -------------------------------------------------------------------------------------------------------
REFLECTED = ("reflected", "reflection", "reflection_label", "reflection_status", "reflection_error", "reflect_model",
             "reflect_prompt_version", "reflect_prompt_tokens", "reflect_completion_tokens", "reflect_cost_usd")


def is_correct(values: dict, label: int) -> bool:
    """A first-pass row is correct when it parsed and its predicted label is the gold label."""
    return values.get("status", "ok") == "ok" and as_int(values.get("predicted_label")) == label


def reflect(input_path, output, cfg) -> dict:
    items, out, cache = _prepare(input_path, output, cfg, need_label=True, extra=("predicted_label", "thought_process"))
    prompts = P.prompt_set(cfg)
    wrong = [i for i, it in enumerate(items) if not is_correct(it.values, it.label)]
    jobs = [Job(cfg.reflect_model, P.reflect_messages(prompts, items[i].premise, items[i].hypothesis,
                                                      str(items[i].values.get("thought_process") or ""),
                                                      items[i].label),
                P.THOUGHT_SCHEMA, P.parse_thought, P.THOUGHT_SHAPE) for i in wrong]
    outcomes, counters = run_jobs(cfg, cache, jobs, "reflect")
    results: dict[int, dict] = {}
    for i, oc in zip(wrong, outcomes):
        it = items[i]
        status, error = ("ok", "") if oc.ok else ("failed", oc.error)
        if oc.ok and oc.value["predicted_label"] != it.label:
            status, error = "failed", f"reached label {oc.value['predicted_label']}, not the gold label {it.label}"
        elif oc.ok and P.mentions_given_label(oc.value["thought_process"]):
            status, error = "failed", "the reasoning mentions that the label was given"
        results[i] = {"reflected": True, "reflection": oc.value["thought_process"] if oc.ok else "",
                      "reflection_label": oc.value["predicted_label"] if oc.ok else None,
                      "reflection_status": status, "reflection_error": error, "reflect_model": cfg.reflect_model,
                      "reflect_prompt_version": cfg.prompt_version, "reflect_prompt_tokens": oc.prompt_tokens,
                      "reflect_completion_tokens": oc.completion_tokens, "reflect_cost_usd": round(oc.cost, 8)}
    consistency, coutcomes = None, []
    if cfg.consistency_check:
        check = [i for i in wrong if results[i]["reflection_status"] == "ok"]
        cjobs = [Job(cfg.reflect_model, P.consistency_messages(prompts, items[i].premise, items[i].hypothesis,
                                                               results[i]["reflection"]),
                     P.LABEL_SCHEMA, P.parse_label, P.LABEL_SHAPE) for i in check]
        coutcomes, ccounters = run_jobs(cfg, ResponseCache(cache_path(cfg, out)), cjobs, "consistency")
        for i, oc in zip(check, coutcomes):
            r = results[i]
            r["reflect_prompt_tokens"] += oc.prompt_tokens
            r["reflect_completion_tokens"] += oc.completion_tokens
            r["reflect_cost_usd"] = round(r["reflect_cost_usd"] + oc.cost, 8)
            if not oc.ok:
                r["reflection_status"], r["reflection_error"] = "failed", f"consistency check: {oc.error}"
            elif oc.value["predicted_label"] != items[i].label:
                r["reflection_status"] = "inconsistent"
                r["reflection_error"] = (f"asked without the label, the reasoning reaches {oc.value['predicted_label']}"
                                         f", not {items[i].label}")
        consistency = {"checked": len(check), "requests": ccounters["requests"]}
        for k in ("requests", "answered", "cache_hits", "shared", "retries", "new_prompt_tokens",
                  "new_completion_tokens", "new_cost_usd", "seconds"):
            counters[k] = round(counters[k] + ccounters[k], 6)
        for reason, n in ccounters["errors"].items():
            counters["errors"][reason] = counters["errors"].get(reason, 0) + n
    records = []
    for i, it in enumerate(items):
        rec = {k: v for k, v in it.values.items() if k not in REFLECTED}
        rec[cfg.label_column] = it.label
        rec.update(results.get(i) or {"reflected": False, "reflection": "", "reflection_label": None,
                                      "reflection_status": "", "reflection_error": "", "reflect_model": "",
                                      "reflect_prompt_version": "", "reflect_prompt_tokens": 0,
                                      "reflect_completion_tokens": 0, "reflect_cost_usd": 0.0})
        records.append(rec)
    ok = sum(r["reflection_status"] == "ok" for r in results.values())
    summary = {"step": "reflect", "output": str(out), "rows": len(items), "reflected": len(wrong),
               "reflection_ok": ok, "reflection_success": round(ok / len(wrong), 4) if wrong else None,
               "consistency": consistency, "cost_usd": round(sum(r["reflect_cost_usd"] for r in results.values()), 6),
               **counters}
    publish(out, records, summary, cfg, outcomes, coutcomes)
    return _report(summary)


# --- combine -------------------------------------------------------------------------------------------------------
def combine(input_path, output, cfg) -> dict:
    """The training file: correct first-pass rows and successfully reflected rows, each original row at most once,
    in input order, with its provenance; rows neither correct nor reflected are left out and counted."""
    items = read_items(input_path, cfg, need_label=True, extra=("predicted_label", "thought_process"))
    out = check_output(output, input_path)
    records, dropped = [], []
    for n, it in enumerate(items):
        v = it.values
        base = {"row": as_int(v.get("row")) if v.get("row") not in (None, "") else n}
        if "id" in v:
            base["id"] = v["id"]
        base.update({cfg.premise_column: it.premise, cfg.hypothesis_column: it.hypothesis, cfg.label_column: it.label})
        if is_correct(v, it.label):
            records.append({**base, "thought_process": v.get("thought_process") or "", "source": "direct",
                            "model": v.get("model") or "", "prompt_version": v.get("prompt_version") or ""})
        elif v.get("reflection_status") == "ok":
            records.append({**base, "thought_process": v.get("reflection") or "", "source": "reflected",
                            "model": v.get("reflect_model") or "",
                            "prompt_version": v.get("reflect_prompt_version") or ""})
        else:
            dropped.append(n)
    if not records:
        raise UserError(f"{input_path}: no row is correct or reflected: nothing to combine (run cot reflect first?)")
    write_table(out, records)
    summary = {"step": "combine", "output": str(out), "rows_in": len(items), "rows_out": len(records),
               "direct": sum(r["source"] == "direct" for r in records),
               "reflected": sum(r["source"] == "reflected" for r in records), "dropped": len(dropped),
               "first_dropped_rows": dropped[:10]}
    return _report(summary)


# --- judge ---------------------------------------------------------------------------------------------------------
def judge(input_path, output, cfg) -> dict:
    """LLM-as-a-judge scores (coherence, correctness, brevity, 1-5 each) of every row's thought_process."""
    items, out, cache = _prepare(input_path, output, cfg, need_label=True, extra=("thought_process",))
    prompts = P.prompt_set(cfg)
    model = cfg.judge_model or cfg.reflect_model
    jobs = [Job(model, P.judge_messages(prompts, it.premise, it.hypothesis, str(it.values.get("thought_process") or ""),
                                        it.label), P.JUDGE_SCHEMA, P.parse_judge, P.JUDGE_SHAPE) for it in items]
    outcomes, counters = run_jobs(cfg, cache, jobs, "judge")
    records = []
    for it, oc in zip(items, outcomes):
        rec = dict(it.values)
        rec.update({k: (oc.value[k] if oc.ok else None) for k in ("coherence", "correctness", "brevity")})
        rec.update(judge_status="ok" if oc.ok else "failed", judge_error=oc.error, judge_model=model,
                   judge_cost_usd=round(oc.cost, 8))
        records.append(rec)
    ok = [r for r in records if r["judge_status"] == "ok"]
    means = {k: round(sum(r[k] for r in ok) / len(ok), 3) if ok else None for k in ("coherence", "correctness",
                                                                                      "brevity")}
    summary = {"step": "judge", "output": str(out), "rows": len(records), "failed": len(records) - len(ok),
               "mean": means, "cost_usd": round(sum(r["judge_cost_usd"] for r in records), 6), **counters}
    publish(out, records, summary, cfg, outcomes)
    return _report(summary)
