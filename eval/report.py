"""The evaluation report: Markdown tables, PNG plots and the compact table printed to stdout.

Everything here reads the metrics dict that `eval.run` builds (the content of metrics.json), so a report can be
re-rendered from a saved metrics.json alone. Plots use matplotlib's Agg backend (no display); without
matplotlib the report is written without them and says so.
"""
from __future__ import annotations

import math
import pathlib

LABELS = {"model": "model (exact)", "model_ann": "model (ANN)", "most_popular": "most popular", "ease": "EASE"}
COLORS = {"model": "tab:blue", "model_ann": "tab:cyan", "most_popular": "tab:orange", "ease": "tab:green"}


def _fmt(x, spec: str = ".4f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _table(header: list[str], rows: list[list], spec: str = ".4f") -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r if isinstance(r, str) else _fmt(r, spec) for r in row) + " |" for row in rows]
    return lines + [""]


def primary_k(ks: list[int]) -> int:
    """The cut-off used where one k must be picked (segment bars, popularity histogram): 20 if present."""
    return 20 if 20 in ks else ks[min(1, len(ks) - 1)]


def protocol_text(m: dict) -> str:
    """'training items excluded', naming validation items too when they were, and the dropped repeats."""
    p = m.get("protocol", {})
    text = " and ".join({"train": "training", "valid": "validation"}[s] for s in p.get("excluded_splits",
                                                                                        ["train"]))
    text += " items excluded"
    if p.get("repeat_rows_dropped"):
        text += (f"; {p['repeat_rows_dropped']} of {p['heldout_rows']} held-out rows repeat an excluded item and "
                 f"are not counted ({p['users_dropped']} users left without held-out items)")
    return text


def _method_table(m: dict) -> list[str]:
    ks = m["ks"]
    names = [f"{metric}@{k}" for metric in ("recall", "ndcg") for k in ks] + [f"hitrate@{ks[0]}",
                                                                              f"mrr@{ks[-1]}"]
    rows = [[LABELS.get(name, name)] + [v[n] for n in names] for name, v in m["methods"].items()]
    return _table(["method"] + names, rows)


def _segment_lines(m: dict, k: int) -> list[str]:
    seg = m["segments"]
    methods = [n for n in m["methods"] if n != "model_ann"]
    lines = [f"### Users by training interactions (edges {seg['user_activity_edges']}), recall@{k}", ""]
    rows = [[b["name"], str(b["num_users"])] + [b["metrics"][n][f"recall@{k}"] for n in methods]
            for b in seg["user_activity"]]
    lines += _table(["bucket", "users"] + [LABELS.get(n, n) for n in methods], rows)
    lines += [f"### Items by popularity, recall@{k} on the held-out items of each segment", "",
              f"head / torso / tail: the most popular items holding the first {seg['item_share_edges'][0]:.0%} / "
              f"up to {seg['item_share_edges'][1]:.0%} / the rest of the training interactions; cold: items "
              "with no training interaction.", ""]
    rows = [[s["name"], str(s["num_items"]), f"{s['train_share']:.1%}", str(s["num_heldout"])]
            + [s["metrics"][n][f"recall@{k}"] for n in methods] for s in seg["item_popularity"]]
    return lines + _table(["segment", "items", "train share", "held-out"] + [LABELS.get(n, n) for n in methods],
                          rows)


def _conditional_lines(m: dict, k: int) -> list[str]:
    """A conditional model's recall@k within each condition value's items (`eval.conditional`)."""
    cm = m.get("conditional")
    if not cm:
        return []
    lines = ["## Conditional retrieval", "",
             f"{cm['num_queries']} (user, value) queries; each ranks only the items with the value. Conditioned: "
             "the tower fed the value; post-filter: the tower fed no condition, its full ranking filtered. Tail: "
             "values with fewer training interactions than the median value.", ""]
    rows = [["all", str(cm["num_queries"]), cm["conditional"][f"recall@{k}"], cm["post_filter"][f"recall@{k}"]]]
    rows += [["tail", "", cm["tail"]["conditional"][f"recall@{k}"], cm["tail"]["post_filter"][f"recall@{k}"]]]
    rows += [[str(v["value"]), str(v["queries"]), v["conditional"][f"recall@{k}"], v["post_filter"][f"recall@{k}"]]
             for v in cm["per_value"]]
    return lines + _table(["value", "queries", f"conditioned recall@{k}", f"post-filter recall@{k}"], rows)


def markdown(m: dict) -> str:
    """The full report.md text."""
    ks, k = m["ks"], primary_k(m["ks"])
    lines = [f"# Offline evaluation: {m.get('model_version', '')}", "",
             f"Run `{m.get('run_dir', '')}`, checkpoint step {m.get('step')}, split `{m.get('split', 'test')}`, "
             f"{m['num_users']} held-out users, all {m.get('dataset', {}).get('num_items', '?')} items ranked, "
             f"{protocol_text(m)}.", "", "## Model vs baselines", ""]
    lines += _method_table(m)
    for name, why in m.get("skipped", {}).items():
        lines += [f"{LABELS.get(name, name)} skipped: {why}.", ""]
    if "ann" in m:
        a = m["ann"]
        lines += ["## ANN vs exact", "", f"Index: {a['params']}; build {a.get('build_seconds')} s, search "
                  f"{a.get('search_seconds')} s. Overlap@k = share of the exact top-k the ANN top-k returns.", ""]
        lines += _table(["k", "overlap", "recall exact", "recall ANN", "recall loss"],
                        [[str(x), a[f"overlap@{x}"], m["methods"]["model"][f"recall@{x}"],
                          m["methods"]["model_ann"][f"recall@{x}"], a[f"recall_loss@{x}"]] for x in ks])
    lines += ["## Catalog coverage", "", "Share of the catalogue in at least one user's top-k.", ""]
    lines += _table(["method"] + [f"coverage@{x}" for x in ks],
                    [[LABELS.get(n, n)] + [c[f"coverage@{x}"] for x in ks] for n, c in m["coverage"].items()])
    pb = m["popularity_bias"]
    lines += ["## Popularity bias", "", "Mean popularity percentile (by training count; 100 = most popular) of "
              f"recommended items; held-out items: {_fmt(pb['heldout']['mean_percentile'], '.1f')}.", ""]
    lines += _table(["method"] + [f"@{x}" for x in ks],
                    [[LABELS.get(n, n)] + [v[f"mean_percentile@{x}"] for x in ks] for n, v in pb["methods"].items()],
                    spec=".1f")
    lines += ["## Segments", ""] + _segment_lines(m, k)
    lines += _conditional_lines(m, k)
    if m.get("timing"):
        lines += ["## Timing (seconds)", ""] + _table(["phase", "s"], [[p, f"{s:.2f}"] for p, s in m["timing"].items()])
    return "\n".join(lines)


def _plot_recall(plt, m: dict, path: pathlib.Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, v in m["methods"].items():
        ax.plot(m["ks"], [v[f"recall@{k}"] for k in m["ks"]], marker="o", label=LABELS.get(name, name),
                color=COLORS.get(name), linestyle="--" if name == "model_ann" else "-")
    ax.set(xlabel="K", ylabel="recall@K", title="Recall@K: model vs baselines", xscale="log")
    ax.set_xticks(m["ks"], [str(k) for k in m["ks"]])
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _bars(ax, groups: list[str], values: dict[str, list[float]], title: str) -> None:
    width = 0.8 / max(len(values), 1)
    for i, (name, vals) in enumerate(values.items()):
        ax.bar([g + i * width for g in range(len(groups))], vals, width, label=LABELS.get(name, name),
               color=COLORS.get(name))
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], groups)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)


def _plot_segments(plt, m: dict, path: pathlib.Path) -> None:
    k, seg = primary_k(m["ks"]), m["segments"]
    methods = [n for n in m["methods"] if n != "model_ann"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    users = seg["user_activity"]
    _bars(axes[0], [f"{b['name']}\n({b['num_users']})" for b in users],
          {n: [b["metrics"][n][f"recall@{k}"] for b in users] for n in methods},
          f"recall@{k} by user training interactions (users)")
    items = seg["item_popularity"]
    _bars(axes[1], [s["name"] for s in items], {n: [s["metrics"][n][f"recall@{k}"] for s in items] for n in methods},
          f"recall@{k} on held-out items by item popularity")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_popularity(plt, m: dict, path: pathlib.Path) -> None:
    k, pb = primary_k(m["ks"]), m["popularity_bias"]
    edges = pb["bin_edges"]
    centers = [(a + b) / 2 for a, b in zip(edges, edges[1:])]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(centers, pb["heldout"]["histogram"], color="black", linewidth=2.5,
            label=f"held-out items (mean {pb['heldout']['mean_percentile']:.0f})")
    for name, v in pb["methods"].items():
        if name == "model_ann":  # nearly identical to the exact model's curve
            continue
        ax.plot(centers, v[f"histogram@{k}"], marker="o", color=COLORS.get(name),
                label=f"{LABELS.get(name, name)} top-{k} (mean {v[f'mean_percentile@{k}']:.0f})")
    ax.set(xlabel="item popularity percentile (training count)", ylabel="share of items",
           title=f"Popularity of recommended (top-{k}) vs held-out items")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(m: dict, out_dir: pathlib.Path) -> list[str]:
    """recall_at_k.png, segments.png, popularity_bias.png in out_dir; [] (and a note) without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        m.setdefault("skipped", {})["plots"] = "matplotlib is not installed (pip install 'matplotlib>=3.8')"
        return []
    matplotlib.use("Agg")
    out_dir.mkdir(parents=True, exist_ok=True)
    import matplotlib.pyplot as plt
    files = {"recall_at_k.png": _plot_recall, "segments.png": _plot_segments,
             "popularity_bias.png": _plot_popularity}
    for name, fn in files.items():
        fn(plt, m, out_dir / name)
    return list(files)


def write_outputs(m: dict, out_dir: pathlib.Path) -> list[str]:
    """Writes report.md and metrics.json (the dict `m`) into out_dir, created if needed; returns the names."""
    import json
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.md").write_text(markdown(m))
    (out_dir / "metrics.json").write_text(json.dumps(m, indent=2, default=float))
    return ["metrics.json", "report.md"]


def summary(m: dict) -> str:
    """The compact stdout table: recall/ndcg at each k per method, then ANN overlap and coverage."""
    ks = m["ks"]
    names = [f"{metric}@{k}" for metric in ("recall", "ndcg") for k in ks]
    lines = [f"\noffline evaluation of {m.get('model_version', '?')} on {m['num_users']} held-out users "
             f"({m.get('split', 'test')}), all items ranked, {protocol_text(m)}:",
             f"{'':16s}" + "".join(f"{n:>11s}" for n in names)]
    for name, v in m["methods"].items():
        lines.append(f"{LABELS.get(name, name):16s}" + "".join(f"{v[n]:11.4f}" for n in names))
    if "ann" in m:
        lines.append("ANN overlap with exact: " + ", ".join(f"@{k} {m['ann'][f'overlap@{k}']:.4f}" for k in ks))
    cov = m["coverage"].get("model", {})
    lines.append("model coverage: " + ", ".join(f"@{k} {cov.get(f'coverage@{k}', float('nan')):.4f}" for k in ks))
    for name, why in m.get("skipped", {}).items():
        lines.append(f"{name} skipped: {why}")
    if m.get("out_dir"):
        lines.append(f"report: {m['out_dir']}/report.md")
    return "\n".join(lines)


def print_summary(m: dict) -> None:
    print(summary(m), flush=True)
