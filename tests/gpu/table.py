"""The short table of a kit run: one line per measured setup or check, from results.json alone."""

from __future__ import annotations


def _gib(x) -> str:
    return "-" if x is None else f"{x:.1f} GiB"


def sanity_rows(f: dict) -> list[tuple[str, str]]:
    rows = []
    if "device" in f:
        rows.append(("CUDA", f"{f['device']}, {f['memory_gib']} GiB, sm {f['capability']}, CUDA {f['cuda_version']}"))
    elif "cuda_visible" in f:
        rows.append(("CUDA", "visible" if f["cuda_visible"] else "not visible"))
    if "bf16_matmul" in f:
        m = f["bf16_matmul"]
        rows.append((f"bf16 matmul n={m['n']}", f"{m['tflops']:,.1f} TFLOP/s, relative error {m['rel_error']:.1e}"))
    if f.get("cuda_tests", {}).get("summary"):
        rows.append(("CUDA-marked tests", f["cuda_tests"]["summary"]))
    return rows


def train_rows(f: dict) -> list[tuple[str, str]]:
    rows = []
    for name, r in f.items():
        if name == "ratios" or not isinstance(r, dict):
            continue
        rows.append((name, f"{r['tokens_per_s']:>10,.0f} tok/s  {r['step_s']:.3f} s/step  peak {_gib(r.get('peak_steps_gib'))}"
                           f" (load+warm-up {_gib(r.get('peak_load_warmup_gib'))})  {r['attention']}"))
    if f.get("ratios"):
        rows.append(("ratios", "  ".join(f"{k} {v}x" for k, v in f["ratios"].items())))
    return rows


def infer_rows(f: dict) -> list[tuple[str, str]]:
    if not f:
        return []
    r, x = f["rows_per_s"], f["ratios"]
    fp, run = f["fp32"], f["run_dtype"]
    return [
        (f"rows/s ({f['rows']} rows, batch {f['batch']})",
         f"path {r['path']:,.1f}  generation {r['gen']:,.1f}  transformers input-order {r['hf']:,.1f}  ->  "
         f"{x['path_vs_hf']}x / {x['gen_vs_hf']}x  peak {_gib(f.get('peak_gib'))}  {f['attention']}"),
        ("equal to transformers", f"fp32 {fp['equal_rows']}/{fp['rows']} rows, prefill logits rel {fp['logits_rel_error']:.1e};"
                                  f" {run['dtype']} {run['equal_fraction']:.1%} of rows, logits rel "
                                  f"{run['logits_rel_error']:.1e}"),
    ]


def confidence_rows(f: dict) -> list[tuple[str, str]]:
    rows = []
    for key, r in f.items():
        t, p, full = r["tokens"], r["tokens_pair"], r["full"]
        rows.append((key, f"tokens {t['step_ms']:.1f} ms +{t['peak_delta_mib']:,.0f} MiB  pair {p['step_ms']:.1f} ms "
                          f"+{p['peak_delta_mib']:,.0f} MiB  full {full['step_ms']:.1f} ms +{full['peak_delta_mib']:,.0f} MiB"
                          f"  ->  time x{t['time_vs_full']}, memory x{t.get('memory_vs_full', '-')}"))
    return rows


def resume_rows(f: dict) -> list[tuple[str, str]]:
    if not f:
        return []
    text = f"killed at {f['killed_at_checkpoint']}, resumed from step {f['resumed_from_step']}"
    rows = [("kill + re-run", text)]
    for key, label in (("resumed_vs_reference", "resumed vs uninterrupted"),
                       ("repeat_vs_reference", "two uninterrupted runs")):
        if key in f:
            d = f[key]
            rows.append((label, f"weights rel L2 {d['weights_rel_l2']:.1e} (max abs {d['weights_max_abs']:.1e}), "
                                f"losses rel {d['loss_rel_max']:.1e}"))
    if "limits" in f:
        rows.append(("limits", f"weights {f['limits']['weights_rel_l2']:.1e}, losses {f['limits']['loss_rel_max']:.1e}"))
    return rows


FORMATS = {"sanity": sanity_rows, "train": train_rows, "infer": infer_rows, "confidence": confidence_rows,
           "resume": resume_rows}


def render(results: dict) -> str:
    env = results["environment"]
    sanity = results["parts"].get("sanity", {}).get("figures", {})
    device = sanity.get("device", "CPU" if results["mode"] == "cpu-smoke" else "no GPU")
    head = (f"GPU kit ({results['mode']}): {device}, torch {env['torch']}, transformers {env['transformers']}, "
            f"commit {env.get('commit')}; {results['seconds']:.0f} s; {'PASS' if results['ok'] else 'FAIL'}")
    lines = [head, f"fixtures: {results['fixtures']['where']}"]
    width = 34
    for part, res in results["parts"].items():
        status = res["status"] + (f" ({res['why']})" if res.get("why") else "")
        lines.append(f"{part:<11} {'':<{width}} {status}, {res['seconds']:.0f} s")
        try:
            rows = FORMATS[part](res["figures"])
        except (KeyError, TypeError) as err:  # a half-filled part still gets its checks listed below
            rows = [("figures", f"not tabulated ({type(err).__name__}: {err}); see results.json")]
        lines += [f"{'':<11} {k:<{width}} {v}" for k, v in rows]
        lines += [f"{'':<11} {'':<{width}} note: {n}" for n in res.get("notes", [])]
    failed = [c for c in results.get("checks", []) if not c["ok"]]
    lines.append(f"checks: {len(results.get('checks', [])) - len(failed)} passed, {len(failed)} failed")
    lines += [f"  FAILED {c['part']}: {c['name']}: {c['detail']}" for c in failed]
    return "\n".join(lines)
