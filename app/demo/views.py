"""What the demo page shows for each task it supports: the form's fields, the one input row they make, the result.

A view never predicts: the form's row goes through the checkpoint task's own predictor (`read_input`, `predict`),
as a one-row file of the input format `python -m app infer` reads, so the page shows what `infer` writes.

    task               form                                        result
    nli_cot            premise, hypothesis                         label (0/1), reasoning
    confidence_tokens  passage (optional), question, options       answer (yes/no, a letter), confidence, response
                       (optional, one per line: multiple choice)
    confidence_head    problem, steps (one per line)               each step's confidence
"""

from __future__ import annotations

import html
from dataclasses import dataclass

from app.errors import UserError

esc = html.escape


@dataclass(frozen=True)
class Field:
    name: str
    label: str
    required: bool = True
    placeholder: str = ""


def confidence_html(p: float | None, ident: str) -> str:
    """A probability as a number, a percentage and a bar; `data-value` holds it as the predictor wrote it. The bar
    is an SVG rect sized by its attribute: the page's Content-Security-Policy allows no inline style attribute."""
    if p is None:
        return f'<span id="{ident}" class="conf" data-value="">none (cut by max_seq_length)</span>'
    pct = max(0.0, min(1.0, float(p))) * 100
    return (f'<span class="conf"><strong id="{ident}" data-value="{p!r}">{p:.3f}</strong> '
            f'(<span id="{ident}-percent">{pct:.1f}%</span>)'
            f'<svg class="bar" viewBox="0 0 100 1" preserveAspectRatio="none" aria-hidden="true">'
            f'<rect width="{pct:.1f}" height="1"/></svg></span>')


def lines(text: str) -> list[str]:
    return [s.strip() for s in text.splitlines() if s.strip()]


class View:
    task = ""
    title = ""
    about = ""  # HTML: what the page predicts
    fields: tuple[Field, ...] = ()
    upload_label = ""  # HTML: what the batch file holds
    upload_note = ""  # HTML: what comes back
    upload_suffix = ".csv"  # the uploaded file's format when its name does not say
    media_type = "text/csv"

    def row(self, values: dict[str, str]) -> dict:
        """The input record of the checked form values (a JSON object of the task's input format)."""
        return {k: v for k, v in values.items() if v}

    def render(self, record: dict, values: dict[str, str]) -> str:
        raise NotImplementedError


class NliView(View):
    task = "nli_cot"
    title = "Natural language inference"
    about = "Label 1: the premise entails the hypothesis; 0: it does not."
    fields = (Field("premise", "Premise"), Field("hypothesis", "Hypothesis"))
    upload_label = ("CSV with <code>premise</code> and <code>hypothesis</code> columns (optional <code>id</code>, "
                    "<code>label</code>)")
    upload_note = "Returns predictions.csv: index, id, predicted_label, thought_process, parse_ok."

    def render(self, record, values):
        label = int(record["label"])
        name = "entailment" if label == 1 else "no entailment"
        note = "" if record["parse_ok"] else '<p class="note">(the label came from the fallback: no JSON object)</p>'
        return (f'<p>Label: <strong id="label">{label}</strong> (<span id="label-name">{name}</span>)</p>'
                f'<p>Reasoning:</p><pre id="reasoning">{esc(record["thought"] or "(none)")}</pre>{note}')


class ConfidenceTokensView(View):
    task = "confidence_tokens"
    title = "Answer with confidence"
    about = ("The model answers, then its confidence token gives the probability that the answer is right: "
             "p(C) / (p(C) + p(U)).")
    fields = (Field("passage", "Passage (premise)", required=False),
              Field("question", "Question (e.g. the hypothesis as a yes/no question)"),
              Field("options", "Options, one per line (multiple choice; leave empty for yes/no)", required=False))
    upload_label = ("CSV or JSONL with a <code>question</code> column, optional <code>passage</code> or "
                    "<code>options</code>, <code>dataset</code>, <code>id</code>, <code>answer</code>")
    upload_note = ("Returns predictions.csv: index, id, dataset, answer, response, token, confidence "
                   "(gold, correct with answers).")

    def row(self, values):
        row = {"question": values["question"]}
        if values.get("passage"):
            row["passage"] = values["passage"]
        options = lines(values.get("options", ""))
        if len(options) == 1:
            raise UserError("options: give at least two (one per line), or none for a yes/no question")
        if options:
            row["options"] = options
        return row

    def render(self, record, values):
        answer = record["answer"]
        shown = esc(answer) if answer is not None else "(no answer parsed)"
        token = record["predicted"] or "(none generated)"
        return (f'<p>Answer: <strong id="label">{shown}</strong></p>'
                f'<p>Confidence: {confidence_html(record["p_confident"], "confidence")}</p>'
                f'<p class="small">Confidence token: <code id="token">{esc(token)}</code> (dataset '
                f'{esc(record["dataset"])})</p>'
                f'<p>Response:</p><pre id="reasoning">{esc(record["text"] or "(empty)")}</pre>')


class ConfidenceHeadView(View):
    task = "confidence_head"
    title = "Per-step confidence"
    about = "The score head gives each reasoning step a confidence in [0, 1] that the step is correct."
    fields = (Field("problem", "Problem"), Field("steps", "Reasoning steps, one per line"))
    upload_label = ('JSONL of <code>{"problem": ..., "steps": [...]}</code> per line (optional '
                    "<code>labels</code>, <code>id</code>)")
    upload_note = "Returns step_scores.jsonl: index, line, id, scores (one confidence per step)."
    upload_suffix = ".jsonl"
    media_type = "application/x-ndjson"

    def row(self, values):
        return {"problem": values["problem"], "steps": lines(values["steps"])}

    def render(self, record, values):
        steps = lines(values["steps"])
        rows = "".join(f'<tr><td>{k}</td><td>{esc(s)}</td><td>{confidence_html(p, f"confidence-{k}")}</td></tr>'
                       for k, (s, p) in enumerate(zip(steps, record["scores"]), start=1))
        return (f'<table id="steps"><tr><th>#</th><th>Step</th><th>Confidence</th></tr>{rows}</table>')


VIEWS = {v.task: v for v in (NliView(), ConfidenceTokensView(), ConfidenceHeadView())}


def view_for(task: str, where: str) -> View:
    if task not in VIEWS:
        raise UserError(f"{where}: trained for task={task!r}; the demo page supports {', '.join(VIEWS)} checkpoints")
    return VIEWS[task]
