"""report.md and report.png from the results dict (nothing here computes a metric)."""

from __future__ import annotations

import io
from pathlib import Path

from embedforge.evaluate.leaks import contamination_line
from embedforge.evaluate.metrics import METRICS
from embedforge.files import atomic_write

TABLE = ("ndcg@10", "recall@10", "recall@100", "mrr@10")
CHART_TITLE = "NDCG@10 per model and eval set\nwhiskers: 95% bootstrap CI of the model's mean over queries"


def _cell(text: str, limit: int = 120) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _ci(ci: list[float]) -> str:
    return f"[{ci[0]:+.4f}, {ci[1]:+.4f}]"


def verdict_line(label: str, reference: str, model: dict) -> str:
    versus = model["versus_reference"]["ndcg@10"]
    advice = f" — keep {reference}" if versus["verdict"] == "worse" and model["model"] != "bm25" else ""
    return f"{label} vs {reference}: {versus['verdict']} (NDCG@10 Δ {versus['delta']:+.4f} {_ci(versus['ci95'])}, p={versus['p_value']:.4f}){advice}"


def _ranked(ids: list[str], relevant: set[str]) -> str:
    return ", ".join(f"**{_cell(doc, 40)}**" if doc in relevant else _cell(doc, 40) for doc in ids) or "—"


def _changes(label: str, reference: str, changes: dict) -> list[str]:
    lines = []
    for kind, title in (("gained", "gained most"), ("lost", "lost most")):
        lines += [f"### {label} vs {reference}: queries that {title} (NDCG@10; relevant passages in bold)", ""]
        if not changes[kind]:
            lines += ["none", ""]
            continue
        lines += [f"| Δ | {reference} → {label} | query | {reference} top-3 | {label} top-3 |", "|---|---|---|---|---|"]
        for row in changes[kind]:
            relevant = set(row["relevant_shown"])
            lines.append(f"| {row['delta']:+.3f} | {row['reference_ndcg@10']:.3f} → {row['model_ndcg@10']:.3f} | {_cell(row['query'])} | "
                         f"{_ranked(row['reference_top3'], relevant)} | {_ranked(row['model_top3'], relevant)} |")
        lines.append("")
    return lines


def render_report(results: dict, notes: list[str] | None = None) -> str:
    reference = results["reference"]
    lines = [
        "# embedforge evaluation", "",
        f"Reference model: **{reference}**. Δ is the mean per-query difference against it, with a paired bootstrap 95% CI "
        "and a two-sided paired randomization p-value; a verdict is \"better\" or \"worse\" only when the CI excludes 0 and p < 0.05. "
        "`bm25` is the lexical reference (bm25s, Lucene English stopwords, no stemmer). Every metric is in results.json.", "",
        "![NDCG@10 per model with 95% CIs](report.png)", "",
    ]
    for name, entry in results["eval_sets"].items():
        qrels = "graded qrels" if entry["graded_qrels"] else "binary qrels"
        lines += [f"## {name}", "", f"Source: {entry['source']} · {entry['queries']} queries · {entry['passages']} passages · {qrels}", ""]
        if entry.get("role") == "regression":
            lines += ["Out-of-domain check: a set of another domain, where the fine-tuned model should not lose what the base model had.", ""]
            lines += [f"- **{label} on {name.removeprefix('regression:')}: {model['regression']}**" for label, model in entry["models"].items() if "regression" in model] + [""]
        lines += [contamination_line(entry.get("contamination")), ""]
        others = [(label, model) for label, model in entry["models"].items() if "versus_reference" in model]
        lines += [f"- {verdict_line(label, reference, model)}" for label, model in others] + [""]
        lines.append("| model | NDCG@10 [95% CI] | " + " | ".join(TABLE[1:]) + " | Δ NDCG@10 [95% CI] | p | verdict |")
        lines.append("|---" * (len(TABLE) + 4) + "|")
        for label, model in entry["models"].items():
            versus = model.get("versus_reference", {}).get("ndcg@10")
            delta = f"{versus['delta']:+.4f} {_ci(versus['ci95'])}" if versus else "reference"
            own = model["ci95"]["ndcg@10"]
            p_value, verdict = (f"{versus['p_value']:.4f}", versus["verdict"]) if versus else ("", "")
            lines.append(f"| {label} | {model['scores']['ndcg@10']:.4f} [{own[0]:.4f}, {own[1]:.4f}] | "
                         + " | ".join(f"{model['scores'][m]:.4f}" for m in TABLE[1:]) + f" | {delta} | {p_value} | {verdict} |")
        columns = [*METRICS, "graded_ndcg@10"]
        lines += ["", "All metrics:", "", "| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
        lines += [f"| {label} | " + " | ".join(f"{model['scores'][m]:.4f}" for m in columns) + " |" for label, model in entry["models"].items()]
        lines.append("")
        for label, model in others:
            if "changes" in model:
                lines += _changes(label, reference, model["changes"])
    if notes:
        lines += ["## Caveats", "", *(f"- {note}" for note in notes)]
    return "\n".join(lines).rstrip() + "\n"


def render_chart(results: dict, path: Path) -> None:
    """Bars of NDCG@10 per model, grouped by eval set, with each model's 95% CI as whiskers (PNG)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # the object API: no pyplot global state, no display needed

    sets = list(results["eval_sets"])
    labels = list(dict.fromkeys(label for entry in results["eval_sets"].values() for label in entry["models"]))
    figure = Figure(figsize=(max(6.0, 1.5 + 0.8 * len(sets) * len(labels)), 5.0), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    width = 0.8 / max(1, len(labels))
    top = 0.0
    for number, label in enumerate(labels):
        xs, heights, below, above = [], [], [], []
        for position, name in enumerate(sets):
            model = results["eval_sets"][name]["models"].get(label)
            if model is None:
                continue
            mean, (low, high) = model["scores"]["ndcg@10"], model["ci95"]["ndcg@10"]
            xs.append(position - 0.4 + width * (number + 0.5))
            heights.append(mean)
            below.append(max(0.0, mean - low))
            above.append(max(0.0, high - mean))
            top = max(top, high)
        axes.bar(xs, heights, width, yerr=[below, above], capsize=3, label=label)
        for x, height, up in zip(xs, heights, above):  # the value above its whisker, where nothing overlaps it
            axes.text(x, height + up + 0.01, f"{height:.3f}", ha="center", va="bottom", fontsize=7)
    axes.set_xticks(range(len(sets)), sets)
    axes.set_ylabel("NDCG@10")
    axes.set_ylim(0, min(1.12, top + 0.08))
    axes.set_title(CHART_TITLE, fontsize=10)
    axes.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=min(len(labels), 5), frameon=False)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    with atomic_write(Path(path), "wb") as handle:
        handle.write(buffer.getvalue())
