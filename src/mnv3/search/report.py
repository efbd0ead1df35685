"""The end of a search: the best networks and the reference networks measured end to end in one
interleaved run, and the run folder's files: best.json, trials.csv, pareto.png, progress.png,
summary.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from mnv3.arch import ArchSpec
from mnv3.complexity import count
from mnv3.files import atomic_write, atomic_write_text


def reference_results(search, references: list[tuple[str, ArchSpec]]) -> list[dict[str, Any]]:
    """Each reference network's proxy accuracy (trained like a candidate, once: kept in the study)
    and latency from the same source."""
    out = []
    search.latency.prefetch([spec for _, spec in references
                             if f"reference:{search.genomes.spec_key(spec)}" not in search.study.user_attrs])
    for label, spec in references:
        key = f"reference:{search.genomes.spec_key(spec)}"
        known = search.study.user_attrs.get(key)
        if known is None:
            print(f"reference {label}: proxy training", file=sys.stderr, flush=True)
            known = {"accuracy": float(search.oracle.accuracy(spec, search.out / "references" / label)),
                     "predicted_ms": float(search.latency.ms(spec))}
            search.study.set_user_attr(key, known)
        out.append({"label": label, "spec": spec, **known,
                    "reward": search.reward(known["accuracy"], known["predicted_ms"])})
    return out


def seed_accuracies(search, entry: dict[str, Any], seeds: int) -> list[float]:
    """`entry`'s proxy accuracy with each of `seeds` training seeds: seed 0's is the one the search
    (or the reference's training) measured, the others are trained now. Each result is kept in the
    study as it comes (`rerank:SPEC_KEY`), so an interrupted run trains only what it lacks."""
    key = f"rerank:{search.genomes.spec_key(entry['spec'])}"
    known = {int(k): v for k, v in (search.study.user_attrs.get(key) or {}).items()}
    known.setdefault(0, entry["accuracy"])
    for seed in range(1, seeds):
        if seed not in known:
            print(f"rerank {entry['label']}: proxy training, seed {seed}", file=sys.stderr, flush=True)
            where = search.out / "rerank" / f"{entry['label'].replace(' ', '-')}-seed{seed}"
            base = getattr(getattr(search.oracle, "recipe", None), "seed", 0) or 0     # the recipe's own is seed 0's
            known[seed] = float(search.oracle.accuracy(entry["spec"], where, seed=base + seed))
            search.study.set_user_attr(key, {str(k): v for k, v in sorted(known.items())})
    return [known[s] for s in range(seeds)]


def rerank_entries(search, entries: list[dict[str, Any]], seeds: int) -> None:
    """Replace each entry's one-seed proxy accuracy by the mean over `seeds` seeds, in place (the
    one-seed figure kept as `search_accuracy`, each seed's in `accuracy_seeds`), and its reward with it.
    The best of many one-seed trials is mostly the luckiest: a 3-epoch proxy on 5,000 CIFAR-10
    images ranked 20 networks with a Kendall tau of 0.33 from one seed to the next
    (bench/supernet_rank.py), so the winner's figure is biased high and the choice noisy."""
    for e in entries:
        accs = seed_accuracies(search, e, seeds)
        e.update(search_accuracy=e["accuracy"], accuracy_seeds=accs, accuracy=sum(accs) / len(accs))
        e["reward"] = search.reward(e["accuracy"], e["predicted_ms"])


def finish(search, *, final_k: int = 5, references: list[tuple[str, ArchSpec]] = (),
           measure: bool = True, progress: bool = True, rerank: int = 0, rerank_seeds: int = 3) -> dict[str, Any]:
    """The run folder's files and summary. With `rerank` > 0, the `rerank` best networks by their
    one-seed reward (and the references) are trained again with `rerank_seeds` - 1 more seeds and
    ordered by the reward of their mean accuracy before the best is chosen."""
    tops = search.top(max(final_k, rerank))
    if not tops:
        from mnv3.search.run import SearchError

        raise SearchError("the study holds no finished trial; run more --trials")
    refs = reference_results(search, list(references))
    finals = [{"label": f"trial {t.number}", "trial": t.number, "spec": ArchSpec.from_dict(t.user_attrs["spec"]),
               "accuracy": t.user_attrs["accuracy"], "predicted_ms": t.user_attrs["predicted_ms"],
               "reward": t.user_attrs["reward"]} for t in tops]
    if rerank:
        head = finals[:rerank]
        rerank_entries(search, refs + head, rerank_seeds)
        finals = sorted(head, key=lambda e: -e["reward"]) + finals[rerank:]
    finals = finals[:final_k]
    everyone = refs + finals
    if measure:
        print(f"measuring {len(everyone)} networks end to end, round-robin ({search.latency.describe()['runtime']})",
              file=sys.stderr, flush=True)
        measured = search.latency.measure([e["spec"] for e in everyone], progress=progress)
        for e, m in zip(everyone, measured):
            e["measured_ms"] = float(m)
        for f in finals:        # a finished trial cannot take attributes any more: the study keeps them
            search.study.set_user_attr(f"measured:{f['trial']}", f["measured_ms"])
    best = finals[0]
    best_path = best["spec"].replace(name=f"{search.space.seed.name}_search_t{best['trial']}").save(
        search.out / "best.json")
    search.write_trials()
    pareto_plot(search, refs, finals, search.out / "pareto.png")
    progress_plot(search, search.out / "progress.png")
    summary = {"best": str(best_path), "accuracy": best["accuracy"], "predicted_ms": best["predicted_ms"],
               "measured_ms": best.get("measured_ms"), "reward": best["reward"],
               "trials": len(search.finished()), "study": search.study_name, "storage": search.storage_url,
               "out": str(search.out), "target_ms": search.reward.target_ms, "reward_mode": search.reward.mode,
               "params": count(best["spec"], search.oracle_classes()).params,
               "finals": [_row(e) for e in finals], "references": [_row(e) for e in refs],
               "rerank": {"networks": rerank, "seeds": rerank_seeds} if rerank else None}
    atomic_write_text(search.out / "summary.json", json.dumps(summary, indent=1) + "\n")
    return summary


def _row(e: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in e.items() if k != "spec"}


def pareto_plot(search, refs, finals, path: Path) -> None:
    """Accuracy against latency of every trial, the Pareto front, and the reference networks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [t for t in search.finished() if "accuracy" in t.user_attrs]
    pts = sorted((t.user_attrs["predicted_ms"], t.user_attrs["accuracy"]) for t in done)
    front, best_acc = [], -1.0
    for ms, acc in pts:
        if acc > best_acc:
            front.append((ms, acc))
            best_acc = acc
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=12, alpha=0.5, label=f"trials ({len(pts)})")
    if front:
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="tab:red", label="Pareto front")
    if refs:
        ax.plot([r["predicted_ms"] for r in refs], [r["accuracy"] for r in refs], "s--", color="black",
                label="seed family (width-scaled)")
        for r in refs:
            ax.annotate(r["label"].rsplit(" ", 1)[-1], (r["predicted_ms"], r["accuracy"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    ax.axvline(search.reward.target_ms, color="gray", lw=1, ls=":", label=f"target {search.reward.target_ms:.3g} ms")
    best = finals[0]
    seeds = len(best.get("accuracy_seeds", [])) or 1
    ax.scatter([best["predicted_ms"]], [best["accuracy"]], marker="*", s=150, color="tab:orange",
               label="best (reward" + (f", mean of {seeds} seeds" if seeds > 1 else "") + ")", zorder=5)
    ax.set_xlabel(f"latency, {search.latency.name} (ms, {search.latency.describe().get('runtime')})")
    ax.set_ylabel("proxy accuracy (held-out training split)")
    ax.set_title(f"{search.space.seed.name}: {search.strategy}, {search.reward.describe()}", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def progress_plot(search, path: Path) -> None:
    """The reward of each trial and the best so far, against the trial number."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [t for t in search.finished() if "reward" in t.user_attrs]
    xs = [t.number for t in done]
    ys = [t.user_attrs["reward"] for t in done]
    best, running = [], -float("inf")
    for y in ys:
        running = max(running, y)
        best.append(running)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.scatter(xs, ys, s=10, alpha=0.6, label="reward per trial")
    ax.plot(xs, best, color="tab:red", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("reward")
    ax.set_title(f"{search.strategy}: {len(done)} trials", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
