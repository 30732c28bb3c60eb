"""Render the harness' results as the markdown report of ``bench/RESULTS.md``.

Pure formatting: takes the JSON results of ``compare.py``'s runs and returns text.
"""

from __future__ import annotations

from typing import Any

from common import (
    SIZES,
    best_embed_s,
    embed_passes,
    fastest_epoch,
    mapping_seconds,
    steady_epoch,
)

# Issue 8's targets.
MAPPING_SPEEDUP = 10.0  # surgery + query training + embedding, against scvi-tools
REFERENCE_EPOCH_SPEEDUP = 3.0
FLOOR_MULTIPLE = 2.0  # a query epoch within this multiple of its arithmetic floor
EMBED_CELLS_PER_S = 100_000.0
LOAD_SECONDS = 1.0
QUALITY_TOLERANCE = 0.01  # below the peer by at most this is reported as "within", not "met"
BUSY_CORES = 0.2  # mean cores used by other processes above which timings are unreliable

NOT_RUN = "not run"


def _s(x: float | None) -> str:
    if x is None:
        return "—"
    return f"{x:.3g} s" if x < 10 else f"{x:.1f} s"


def _rate(n: float, s: float | None) -> str:
    return "" if not s else f" ({n / s:,.0f} cells/s)"


def _ratio(peer: float | None, hub: float | None) -> str:
    if peer is None or not hub:
        return "—"
    return f"{peer / hub:.1f}×"


def _phase(r: dict[str, Any] | None, name: str) -> float | None:
    return None if r is None else r["phases"][name]["s"]


def _mapping(r: dict[str, Any] | None) -> float | None:
    return None if r is None else mapping_seconds(r)


def _load(r: dict[str, Any] | None) -> float | None:
    """Mean cores other processes used during the tool's training epochs."""
    if r is None:
        return None
    loads = r["ref_epochs"]["others_cores"] + r["query_epochs"]["others_cores"]
    return sum(loads) / len(loads) if loads else None


def _others(r: dict[str, Any] | None) -> str:
    load = _load(r)
    return "—" if load is None else f"{load:.2f} cores"


def _row(label: str, hub: float | None, peer: float | None, n: float | None = None) -> str:
    h = _s(hub) + (_rate(n, hub) if n else "")
    p = (_s(peer) + (_rate(n, peer) if n else "")) if peer is not None else NOT_RUN
    return f"| {label} | {h} | {p} | {_ratio(peer, hub)} |"


def timing_table(hub: dict[str, Any], peer: dict[str, Any] | None) -> list[str]:
    """Per-phase seconds of both tools and the speed-up."""
    d = hub["data"]
    n_ref_train = hub["ref_epochs"]["n_train_cells"]
    n_q_train = hub["query_epochs"]["n_train_cells"]
    e_ref, e_q = len(hub["ref_epochs"]["s"]), len(hub["query_epochs"]["s"])
    he, pe = steady_epoch(hub["ref_epochs"]), peer and steady_epoch(peer["ref_epochs"])
    hq, pq = steady_epoch(hub["query_epochs"]), peer and steady_epoch(peer["query_epochs"])
    rows = [
        "| phase | hubarches | scvi-tools | scvi-tools ÷ hubarches |",
        "|---|---|---|---|",
        _row("reference setup", _phase(hub, "ref_setup"), _phase(peer, "ref_setup")),
        _row("reference training, per epoch", he, pe, n_ref_train),
        _row(
            f"reference training, total ({e_ref} epochs)",
            _phase(hub, "ref_train"),
            _phase(peer, "ref_train"),
        ),
        _row(
            f"reference embedding ({d['n_ref']:,} cells)",
            _phase(hub, "ref_embed"),
            _phase(peer, "ref_embed"),
            d["n_ref"],
        ),
    ]
    if len(embed_passes(hub)) > 1:  # runs from before the repeated passes have one
        rows.append(
            _row(
                f"reference embedding, best of {len(embed_passes(hub))} passes",
                best_embed_s(hub),
                peer and best_embed_s(peer),
                d["n_ref"],
            )
        )
    rows += [
        _row("gene alignment", _phase(hub, "align"), _phase(peer, "align")),
        _row("surgery", _phase(hub, "surgery"), _phase(peer, "surgery")),
        _row("query training, per epoch", hq, pq, n_q_train),
        _row(
            f"query training, total ({e_q} epochs)",
            _phase(hub, "query_train"),
            _phase(peer, "query_train"),
        ),
        _row(
            f"query embedding ({d['n_query']:,} cells)",
            _phase(hub, "query_embed"),
            _phase(peer, "query_embed"),
            d["n_query"],
        ),
        _row(
            "**query mapping** (surgery + query training + embedding)",
            _mapping(hub),
            _mapping(peer),
        ),
    ]
    hr, pr = hub["peak_rss_mb"] / 1024, peer and peer["peak_rss_mb"] / 1024
    rows.append(
        f"| peak RSS (whole run, data included) | {hr:.2f} GB | "
        f"{f'{pr:.2f} GB' if peer else NOT_RUN} | {_ratio(pr or None, hr)} |"
    )
    rows.append(
        f"| load of other processes during training (mean) | {_others(hub)} | {_others(peer)} | |"
    )
    return rows


def quality_table(hub: dict[str, Any], peer: dict[str, Any] | None) -> list[str]:
    """kNN accuracy and mixing of both tools."""
    hq, pq = hub["quality"], peer and peer["quality"]
    rows = [
        "| quality (k = 15) | hubarches | scvi-tools | hubarches − scvi-tools |",
        "|---|---|---|---|",
    ]
    for key, label in (
        ("knn_accuracy", "kNN accuracy, reference → query"),
        ("knn_balanced_accuracy", "kNN balanced accuracy"),
        ("mixing_observed", "mixing: share of reference neighbours"),
    ):
        p = f"{pq[key]:.3f}" if pq else NOT_RUN
        diff = f"{hq[key] - pq[key]:+.3f}" if pq else "—"
        rows.append(f"| {label} | {hq[key]:.3f} | {p} | {diff} |")
    exp = hq["mixing_expected"]
    p = f"{pq['mixing_ratio']:.2f}" if pq else NOT_RUN
    rows.append(
        f"| mixing ÷ expected ({exp:.3f}, by cell type) | {hq['mixing_ratio']:.2f} | {p} | |"
    )
    return rows


QUALITY_KEYS = (
    ("knn_accuracy", "kNN accuracy, reference → query"),
    ("knn_balanced_accuracy", "kNN balanced accuracy"),
    ("mixing_observed", "mixing: share of reference neighbours"),
)


def _spread(values: list[float]) -> str:
    """Mean and range of replicate values."""
    return f"{sum(values) / len(values):.3f} ({min(values):.3f}–{max(values):.3f})"


def quality_means(replicates: dict[str, Any] | None, tool: str) -> dict[str, float] | None:
    """Mean of each quality measure over a tool's training seeds (None if not run)."""
    runs = replicates.get(tool) if replicates else None
    if not runs:
        return None
    return {key: sum(q[key] for q in runs) / len(runs) for key, _ in QUALITY_KEYS}


def replicate_table(replicates: dict[str, Any]) -> list[str]:
    """Quality over several training seeds: mean (range) of each tool, difference of means."""
    seeds = replicates["seeds"]
    hub, peer = replicates["hubarches"], replicates["peer"]
    rows = [
        f"Over {len(seeds)} training seeds ({', '.join(map(str, seeds))}; the same data; the "
        "quality and mapping targets below are judged on these means):",
        "",
        "| quality (k = 15), mean (min–max) | hubarches | scvi-tools | difference of means |",
        "|---|---|---|---|",
    ]
    hm, pm = quality_means(replicates, "hubarches"), quality_means(replicates, "peer")
    assert hm is not None
    for key, label in QUALITY_KEYS:
        h = _spread([q[key] for q in hub])
        p = _spread([q[key] for q in peer]) if peer else NOT_RUN
        diff = f"{hm[key] - pm[key]:+.3f}" if pm else "—"
        rows.append(f"| {label} | {h} | {p} | {diff} |")
    timing = replicates.get("timing") or {}
    hub_t, peer_t = timing.get("hubarches"), timing.get("peer")
    if hub_t:
        rows += [
            "",
            "| timing over the same seeds, mean (min–max) | hubarches | scvi-tools | "
            "scvi-tools ÷ hubarches, of the means |",
            "|---|---|---|---|",
        ]
        for key, label in (
            ("ref_epoch_s", "reference training, per epoch (s)"),
            ("query_epoch_s", "query training, per epoch (s)"),
            ("mapping_s", "query mapping (s)"),
        ):
            if any(t.get(key) is None for t in hub_t):
                continue  # results written before 2026-12-03 lack the reference epochs
            h = [t[key] for t in hub_t]
            p = [t[key] for t in peer_t] if peer_t else None
            ratio = f"{_mean(p) / _mean(h):.1f}×" if p else "—"
            rows.append(f"| {label} | {_spread(h)} | {_spread(p) if p else NOT_RUN} | {ratio} |")
    return rows


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def seed_means(
    replicates: dict[str, Any] | None, key: str = "mapping_s"
) -> tuple[float, float] | None:
    """Mean seconds of ``key`` (default: query mapping) of each tool over the training seeds.

    None where either tool's seeds were not run or lack that timing.
    """
    timing = (replicates or {}).get("timing") or {}
    hub, peer = timing.get("hubarches"), timing.get("peer")
    if not hub or not peer or any(t.get(key) is None for t in (*hub, *peer)):
        return None
    return _mean([t[key] for t in hub]), _mean([t[key] for t in peer])


def floor_lines(
    micro: dict[str, Any], hub: dict[str, Any], peer: dict[str, Any] | None
) -> list[str]:
    """GEMM rates and the arithmetic floors of an epoch, with both tools' measured epochs."""
    d = micro["dims"]
    measured = micro.get("gflops_measured", {})
    rows = [
        f"GEMM throughput at the step's shapes (B={d['batch']}, H={d['hidden']}, "
        f"G={d['genes']}, L={d['latent']}; best of 3 rounds)"
        + (
            f". The floor uses the better of the {micro['threads']}-thread and 1-thread rates "
            "(see `bench/README.md`):"
            if micro["threads"] != 1
            else ":"
        ),
        "",
        "| GEMM | " + " | ".join(k.replace("_", " ") for k in measured) + " | used |",
        "|---|" + "---|" * (len(measured) + 1),
    ]
    for name, rate in micro["gflops"].items():
        each = "".join(f" {r[name]:.3g} |" for r in measured.values())
        rows.append(f"| {name} |{each} {rate:.3g} |")
    rows.append("")
    for key, epochs in (("query_epoch", "query_epochs"), ("reference_epoch", "ref_epochs")):
        f = micro.get(key)
        if not f:
            continue
        h = steady_epoch(hub[epochs])
        p = peer and steady_epoch(peer[epochs])
        what = key.replace("_", " ")
        line = (
            f"- {what.capitalize()} ({f['n_cells']:,} cells): {f['macs_per_cell'] / 1e6:.3f} M "
            f"multiply-adds per cell, {f['gflop_per_epoch']:.2f} GFLOP → floor "
            f"**{f['floor_s']:.4f} s** at the measured rates ({f['floor_s_at_square_rate']:.4f} s "
            f"at the 2048³ rate). hubarches {_s(h)} = **{h / f['floor_s']:.1f}× the floor**"
        )
        if p:
            line += f"; scvi-tools {_s(p)} = {p / f['floor_s']:.1f}×"
        hf, pf = fastest_epoch(hub[epochs]), peer and fastest_epoch(peer[epochs])
        if hf:
            line += (
                f". Fastest epoch (the least disturbed by other load): hubarches {_s(hf)} = "
                f"{hf / f['floor_s']:.1f}×"
            )
            if pf:
                line += f", scvi-tools {_s(pf)} = {pf / f['floor_s']:.1f}×"
        rows.append(line + ".")
    rows.append(
        "  Terms (per cell): "
        + "; ".join(f"{t['term']} = {t['macs_per_cell']:,}" for t in micro["query_epoch"]["terms"])
        + "."
    )
    return rows


def _verdict(ok: bool | None) -> str:
    return "—" if ok is None else ("met" if ok else "**not met**")


def _quality_verdict(h: float, p: float | None) -> str:
    if p is None:
        return "—"
    if h >= p:
        return "met"
    return f"within {QUALITY_TOLERANCE}" if h >= p - QUALITY_TOLERANCE else "**not met**"


def targets(runs: dict[str, Any], load: dict[str, Any] | None, threads: int) -> list[str]:
    """Issue 8's targets, each with what was measured and whether it is met."""
    rows = ["| target | measured | status |", "|---|---|---|"]
    for size, run in runs.items():
        hub, peer, micro = run["hubarches"], run["peer"], run["micro"]
        hm, pm = _mapping(hub), _mapping(peer)
        speed = None if pm is None else pm / hm
        shown = "—" if speed is None else f"{speed:.1f}×"
        means = seed_means(run.get("replicates"))
        if means is not None and speed is not None:
            single = speed
            speed = means[1] / means[0]
            n_seeds = len(run["replicates"]["seeds"])
            shown = f"{speed:.1f}× (means of {n_seeds} seeds; the first seed alone {single:.1f}×)"
        pe_q = peer and steady_epoch(peer["query_epochs"])
        if pe_q:
            # No exact implementation runs a query epoch below the floor (bench/README.md).
            bound = pe_q / micro["query_epoch"]["floor_s"]
            shown += f"; at most {bound:.1f}× here (scvi-tools' query epoch ÷ the floor)"
        rows.append(
            f"| {size}: query mapping ≥ {MAPPING_SPEEDUP:g}× faster than scvi-tools | "
            f"{shown} | {_verdict(None if speed is None else speed >= MAPPING_SPEEDUP)} |"
        )
        reps = run.get("replicates")
        hub_q = quality_means(reps, "hubarches") or hub["quality"]
        peer_q = quality_means(reps, "peer") or (peer["quality"] if peer else None)
        over = f" (mean of {len(reps['seeds'])} seeds)" if reps else ""
        for key, label in (("knn_accuracy", "kNN accuracy"), ("mixing_observed", "mixing")):
            h = hub_q[key]
            p = peer_q[key] if peer_q else None
            shown = (f"{h:.3f} vs {p:.3f}" if p is not None else f"{h:.3f}") + over
            rows.append(
                f"| {size}: {label} no lower than scvi-tools | {shown} | {_quality_verdict(h, p)} |"
            )
        he, pe = steady_epoch(hub["ref_epochs"]), peer and steady_epoch(peer["ref_epochs"])
        speed = pe / he if pe and he else None
        shown = "—" if speed is None else f"{speed:.1f}×"
        ref_means = seed_means(reps, "ref_epoch_s")
        if ref_means is not None and speed is not None:
            single, speed = speed, ref_means[1] / ref_means[0]
            n_seeds = len(reps["seeds"])
            shown = f"{speed:.1f}× (means of {n_seeds} seeds; the first seed alone {single:.1f}×)"
        rows.append(
            f"| {size}: reference training ≥ {REFERENCE_EPOCH_SPEEDUP:g}× faster per epoch | "
            f"{shown} | "
            f"{_verdict(None if speed is None else speed >= REFERENCE_EPOCH_SPEEDUP)} |"
        )
        multiple = steady_epoch(hub["query_epochs"]) / micro["query_epoch"]["floor_s"]
        rows.append(
            f"| {size}: query epoch within {FLOOR_MULTIPLE:g}× of the arithmetic floor | "
            f"{multiple:.1f}× | {_verdict(multiple <= FLOOR_MULTIPLE)} |"
        )
        n = hub["data"]["n_ref"]
        rate = n / (best_embed_s(hub) or hub["phases"]["ref_embed"]["s"])
        note = "" if threads == 2 else f" (run with {threads} threads, target is for 2)"
        passes = len(embed_passes(hub))
        best = f", best of {passes} passes" if passes > 1 else ""
        rows.append(
            f"| {size}: embedding ≥ {EMBED_CELLS_PER_S:,.0f} cells/s, 2 threads, "
            f"{hub['data']['n_genes_ref']} genes | {rate:,.0f} cells/s ({n:,} reference "
            f"cells{best}){note} | {_verdict(rate >= EMBED_CELLS_PER_S)} |"
        )
    if load is not None:
        s = load["cached_load_median_s"]
        rows.append(
            f"| load_reference of a cached {load['weights_bytes'] / 1e6:.0f} MB bundle < "
            f"{LOAD_SECONDS:g} s | {s:.3f} s (median) | {_verdict(s < LOAD_SECONDS)} |"
        )
    return rows


def _query_dropout(first: dict[str, Any] | None) -> str:
    """How each tool ran the encoder's dropout in query training."""
    hub = first["hubarches"].get("query_dropout") if first else None
    mode = {True: "on", False: "off", None: "—"}[hub]
    return (
        f"on in scvi-tools (load_query_data's freeze_dropout=False) and {mode} in hubarches "
        "(TrainOptions.dropout_in_query)"
    )


def render(info: dict[str, Any], runs: dict[str, Any], load: dict[str, Any] | None) -> str:
    """The whole report."""
    first = next(iter(runs.values()), None)
    peer_versions = "not run"
    if first and first["peer"]:
        v = first["peer"]["versions"]
        peer_versions = (
            f"scvi-tools {v['scvi-tools']} (torch {v['torch']}, lightning {v['lightning']})"
        )
    threads = first["hubarches"]["threads"] if first else 0
    lines = [
        "# hubarches vs scvi-tools: scArches query mapping",
        "",
        "Written by `bench/compare.py` (see `bench/README.md`). The machine may be shared: read "
        "the ratios, and check the load of other processes reported with each table.",
        "",
        f"- Command: `{info['command']}`",
        f"- Date: {info['date']}; hubarches {info['hubarches']} (commit {info['commit']}); "
        f"peer: {peer_versions}",
        f"- Machine: {info['cpu']}, {info['logical_cpus']} logical CPUs "
        f"({info['usable_cpus']} usable), {info['cpu_capability']}; torch {info['torch']}, "
        f"Python {info['python']}; {threads} threads per tool; load average at start "
        f"{info['loadavg_start'][0]:.2f}, at end {info['loadavg_end'][0]:.2f}",
        "- Settings, both tools: SCVI(n_latent=10, n_hidden=128, n_layers=1, zinb, gene "
        "dispersion), scArches variant (covariates encoded and injected into every layer, layer "
        "norm, no batch norm); Adam lr 1e-3, batch 128, KL warm-up 400 epochs, weight decay 1e-6 "
        "(reference) and 0 (query); dropout 0.1, during query training "
        f"{_query_dropout(first)}; 90 % of cells train (hubarches split: "
        f"{first['hubarches']['split'] if first else '—'}). Per epoch = median wall time from one "
        "epoch's end to the next, the first epoch left out.",
    ]
    busiest = max(
        (x for run in runs.values() for x in (_load(run["hubarches"]), _load(run["peer"])) if x),
        default=0.0,
    )
    if busiest > BUSY_CORES:
        lines += [
            "",
            f"> **Warning: the machine was busy** (other processes used up to {busiest:.2f} "
            "cores on average during training). These timings are not representative, and "
            'when the two tools ran under different loads (the row "load of other '
            'processes") their ratios are skewed too; run again on a quiet machine.',
        ]
    for size, run in runs.items():
        hub, peer = run["hubarches"], run["peer"]
        n_ref, n_query = SIZES[size]
        lines += [
            "",
            f"## {size}: {n_ref:,} reference / {n_query:,} query cells, "
            f"{hub['data']['n_genes_ref']:,} genes",
            "",
            *timing_table(hub, peer),
            "",
            *quality_table(hub, peer),
            "",
            *([*replicate_table(run["replicates"]), ""] if run.get("replicates") else []),
            *floor_lines(run["micro"], hub, peer),
        ]
    if load is not None:
        lines += [
            "",
            "## load_reference of a cached bundle",
            "",
            f"model.safetensors {load['weights_bytes'] / 1e6:.1f} MB ({load['n_genes']:,} genes × "
            f"{load['n_hidden']} hidden units; bundle {load['bundle_bytes'] / 1e6:.1f} MB). "
            f"`hubarches.load_reference` of the cached version (resolve, sha256 of every file, "
            f"read, build): median **{load['cached_load_median_s']:.3f} s**, min "
            f"{load['cached_load_min_s']:.3f} s over {len(load['cached_load_s'])} runs; first "
            f"pull {load['first_pull_s']:.3f} s. Parts, timed alone (median):",
            "",
            *[f"- {k}: {v:.3f} s" for k, v in load["parts_median_s"].items()],
        ]
    lines += ["", "## Targets (issue 8)", "", *targets(runs, load, threads), ""]
    lines += [
        "Mixing moves with the training seed of the reference more than between the tools; "
        "`bench/cross.py` compares the two query trainers on identical references "
        "(`bench/CROSS.md`).",
        "",
    ]
    return "\n".join(lines)
