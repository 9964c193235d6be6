"""The study report: ``report.md`` and a self-contained ``report.html`` (figures embedded as base64).

Built from ``RUN_DIR/results.json`` (schema of ``synthlearn study run``) and the PNG figures found in the
run folder. Nothing here computes a metric: the report shows what the run measured.

Sections: comparison on the combined test sites (ACC, SEN, SPE, AUC with 95 % CI, McNemar p vs
centralized, bytes from sites, rounds, wall time), AUC per test site, figures (ROC curves, confusion
matrices, synthetic vs real grids, ...), fidelity (per-sequence Frechet distances, cross-site matrix,
BRISQUE/PIQE) and privacy (membership inference with its negative and positive controls, copy rate) when
an arm carries those blocks.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: order in which arms appear (others follow alphabetically)
ARM_ORDER = ("centralized", "fedavg", "catphishing", "fedkd", "fedgan", "asyndgan", "local")
METRICS = ("acc", "sen", "spe")


def _arm_sort_key(name: str) -> tuple[int, str]:
    base = name.split(":")[0].split("/")[0]
    if base.startswith("local"):
        base = "local"
    return (ARM_ORDER.index(base) if base in ARM_ORDER else len(ARM_ORDER), name)


def _num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        if isinstance(value, float) and math.isnan(value):
            return "n/a"
        if isinstance(value, int):
            return f"{value:,}"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if value != 0 and abs(value) < 10 ** (-digits):
            return f"{value:.1e}"
        return f"{value:.{digits}f}"
    return str(value)


def _bytes(n: Any) -> str:
    if not isinstance(n, (int, float)):
        return "–"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _auc_cell(block: dict) -> str:
    auc = block.get("auc")
    ci = block.get("auc_ci") or [None, None]
    if auc is None:
        return "–"
    if ci[0] is None:
        return _num(auc)
    return f"{_num(auc)} [{_num(ci[0])}, {_num(ci[1])}]"


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)):
        return "–"
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min"


class _Doc:
    """Collects the report once and renders it to Markdown and HTML."""

    def __init__(self) -> None:
        self.blocks: list[tuple[str, Any]] = []

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", (level, text)))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, header: list[str], rows: list[list[str]]) -> None:
        self.blocks.append(("table", (header, rows)))

    def figure(self, path: Path, caption: str) -> None:
        self.blocks.append(("figure", (path, caption)))

    def markdown(self, run_dir: Path) -> str:
        out = []
        for kind, data in self.blocks:
            if kind == "h":
                out.append("#" * data[0] + " " + data[1] + "\n")
            elif kind == "p":
                out.append(data + "\n")
            elif kind == "table":
                header, rows = data
                out.append("| " + " | ".join(header) + " |")
                out.append("|" + "|".join("---" for _ in header) + "|")
                out.extend("| " + " | ".join(r) + " |" for r in rows)
                out.append("")
            elif kind == "figure":
                path, caption = data
                out.append(f"![{caption}]({path.relative_to(run_dir).as_posix()})\n\n*{caption}*\n")
        return "\n".join(out)

    def html(self, title: str) -> str:
        body = []
        for kind, data in self.blocks:
            if kind == "h":
                body.append(f"<h{data[0]}>{html.escape(data[1])}</h{data[0]}>")
            elif kind == "p":
                body.append(f"<p>{html.escape(data)}</p>")
            elif kind == "table":
                header, rows = data
                head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
                trs = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{trs}</tbody></table>")
            elif kind == "figure":
                path, caption = data
                b64 = base64.b64encode(path.read_bytes()).decode()
                body.append(f'<figure><img src="data:image/png;base64,{b64}" alt="{html.escape(caption)}">'
                            f"<figcaption>{html.escape(caption)}</figcaption></figure>")
        style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
                 "table{border-collapse:collapse;margin:1em 0;font-size:.9em}"
                 "th,td{border:1px solid #ccc;padding:.3em .6em;text-align:right}"
                 "th:first-child,td:first-child{text-align:left}th{background:#f3f3f3}"
                 "figure{margin:1.5em 0}img{max-width:100%;border:1px solid #ddd}"
                 "figcaption{font-size:.85em;color:#555}h1{font-size:1.6em}h2{margin-top:2em}")
        return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")


def _test_sites(arms: dict) -> list[str]:
    sites: list[str] = []
    for arm in arms.values():
        for site in (arm.get("test") or {}):
            if site != "combined" and site not in sites:
                sites.append(site)
    return sites


SEG_REGIONS = ("wt", "tc", "et")


def _vs_cell(vs: dict | None, metric: str) -> str:
    """An arm's ``metric`` minus the reference arm's over the seeds both ran (mean ± SD, paired t-test)."""
    if not vs:
        return "-"
    text = f"{vs[f'{metric}_difference_mean']:+.3f} ± {_num(vs[f'{metric}_difference_sd'])}"
    return text + (f" (paired t p = {_num(vs['paired_t_p'])})" if vs.get("paired_t_p") is not None else "")


def _seg_comparison(doc: _Doc, results: dict) -> None:
    """A segmentation run: Dice and HD95 per region (combined test sites), per test site, and over seeds."""
    arms = results.get("arms", {})
    names = sorted(arms, key=_arm_sort_key)
    doc.h(2, "Comparison on the held-out test sites (combined)")
    header = ["arm", "Dice WT", "Dice TC", "Dice ET", "Dice mean", "HD95 WT (mm)", "HD95 TC (mm)", "HD95 ET (mm)",
              "Wilcoxon p vs centralized", "bytes from sites", "rounds", "wall time"]
    rows = []
    for name in names:
        arm = arms[name]
        comb = (arm.get("test") or {}).get("combined", {})
        rows.append([name, *(_num(comb.get(f"dice_{r}")) for r in SEG_REGIONS), _num(comb.get("dice_mean")),
                     *(_num(comb.get(f"hd95_{r}"), 1) for r in SEG_REGIONS), _num(arm.get("wilcoxon_p_vs_centralized")),
                     _bytes(arm.get("bytes_from_sites")), _num(arm.get("rounds")), _duration(arm.get("wall_s"))])
    doc.table(header, rows)
    seeds = results.get("seeds") or []
    doc.p("Regions: WT whole tumour (labels 1, 2, 3), TC tumour core (1, 3), ET enhancing tumour (3); means over the "
          "test cases, on " + str(results.get("metrics_grid", "the task model's grid")) + ". A region absent from "
          "both truth and prediction scores Dice 1 and HD95 0, absent from one of them Dice 0 and HD95 the grid's "
          "diagonal. Wilcoxon: signed-rank test of the per-case mean Dice against centralized training on the same "
          "cases." + (f" These figures are the primary seed's ({seeds[0]})." if len(seeds) > 1 else ""))
    if any(arms[n].get("over_seeds") for n in names):
        doc.h(2, "Over task-model seeds (mean ± SD)")
        rows = []
        for name in names:
            arm = arms[name]
            over = arm.get("over_seeds") or {}
            vs_text = _vs_cell(arm.get("vs_reference_over_seeds"), "dice_mean")
            rows.append([name, ", ".join(str(k) for k in arm.get("seeds", [])),
                         *(_mean_sd(over.get(f"dice_{r}")) for r in SEG_REGIONS), _mean_sd(over.get("dice_mean")),
                         f"{len(over.get('seeds_with_collapse') or [])} of {over.get('n_seeds', 0)}", vs_text])
        doc.table(["arm", "seeds", "Dice WT", "Dice TC", "Dice ET", "Dice mean",
                   "seeds with a network that did not learn", "Dice mean - centralized (same seeds)"], rows)
    sites = _test_sites(arms)
    if sites:
        doc.h(2, "Dice (mean over regions) and HD95 WT per test site")
        def cell(name: str, site: str) -> str:
            entry = (arms[name].get("test") or {}).get(site) or {}
            return f"{_num(entry.get('dice_mean'))} / {_num(entry.get('hd95_wt'), 1)}"

        rows = [[name, *(cell(name, s) for s in sites)] for name in names]
        doc.table(["arm", *sites], rows)


def _heads_comparison(doc: _Doc, results: dict) -> None:
    """A multi-task run's classification heads: per head and arm the combined metrics, AUC per test site and the AUC
    over seeds."""
    arms = results.get("arms", {})
    names = sorted(arms, key=_arm_sort_key)
    heads = list(results.get("heads") or {})
    if not heads:
        return
    doc.h(2, "Classification heads (combined test sites)")
    rows = []
    for head in heads:
        for name in names:
            hb = (arms[name].get("heads") or {}).get(head) or {}
            comb = (hb.get("test") or {}).get("combined", {})
            over = hb.get("over_seeds") or {}
            rows.append([head, name, *(_num(comb.get(m)) for m in METRICS), _num(comb.get("f1")), _auc_cell(comb),
                         _mean_sd(over.get("auc")), _num(hb.get("mcnemar_p_vs_centralized"))])
    doc.table(["head", "arm", "ACC", "SEN", "SPE", "F1", "AUC [95% CI]", "AUC over seeds", "McNemar p vs centralized"],
              rows)
    doc.p("One network segments and classifies (Ren et al.); each head is scored on the test cases whose label is "
          "known. A binary head's SEN/SPE are those of its second class (mutant, codeleted, methylated); grade's are "
          "macro averages over its classes.")
    sites = _test_sites(arms)
    if sites:
        doc.h(3, "AUC per head and test site")
        rows = [[head, name, *(_num(((((arms[name].get("heads") or {}).get(head) or {}).get("test") or {}).get(s) or {})
                                    .get("auc")) for s in sites)] for head in heads for name in names]
        doc.table(["head", "arm", *sites], rows)


def _comparison(doc: _Doc, results: dict) -> None:
    if results.get("task_kind") in ("segmentation", "multitask"):
        _seg_comparison(doc, results)
        _heads_comparison(doc, results)
        return
    arms = results.get("arms", {})
    names = sorted(arms, key=_arm_sort_key)
    doc.h(2, "Comparison on the held-out test sites (combined)")
    header = ["arm", "ACC", "SEN", "SPE", "AUC [95% CI]", "McNemar p vs centralized", "bytes from sites",
              "rounds", "wall time"]
    rows = []
    for name in names:
        arm = arms[name]
        comb = (arm.get("test") or {}).get("combined", {})
        rows.append([name, *(_num(comb.get(m)) for m in METRICS), _auc_cell(comb),
                     _num(arm.get("mcnemar_p_vs_centralized")), _bytes(arm.get("bytes_from_sites")),
                     _num(arm.get("rounds")), _duration(arm.get("wall_s"))])
    doc.table(header, rows)
    seeds = results.get("seeds") or []
    doc.p("ACC, SEN, SPE at the 0.5 threshold; AUC with a bootstrap 95 % confidence interval. McNemar's test "
          "compares each arm's correct/incorrect calls with centralized training on the same cases. "
          "Bytes from sites: what crossed the site boundary, measured on the messages or files."
          + (f" These figures are the primary seed's ({seeds[0]})." if len(seeds) > 1 else ""))
    _over_seeds_table(doc, arms, names)
    sites = _test_sites(arms)
    if sites:
        doc.h(2, "AUC per test site")
        rows = [[name, *(_auc_cell((arms[name].get("test") or {}).get(s, {})) for s in sites)] for name in names]
        doc.table(["arm", *sites], rows)
        doc.h(3, "ACC / SEN / SPE per test site")
        rows = []
        for name in names:
            test = arms[name].get("test") or {}
            rows.append([name, *("/".join(_num(test.get(s, {}).get(m), 2) for m in METRICS) for s in sites)])
        doc.table(["arm", *sites], rows)


def _mean_sd(stat: dict | None) -> str:
    if not stat:
        return "-"
    return f"{_num(stat.get('mean'))} ± {_num(stat.get('sd'))}"


def _over_seeds_table(doc: _Doc, arms: dict, names: list[str]) -> None:
    """Each arm's combined metrics as mean ± SD over its seeds, the seeds it ran, how many had a network that did not
    learn, and its AUC against centralized on the seeds both ran (paired t-test over seeds)."""
    if not any(arms[n].get("over_seeds") for n in names):
        return
    doc.h(2, "Over task-model seeds (mean ± SD)")
    rows = []
    for name in names:
        arm = arms[name]
        over = arm.get("over_seeds") or {}
        learning = [((arm.get("per_seed") or {}).get(str(k)) or {}).get("learning") or {} for k in arm.get("seeds", [])]
        not_learned = sum(x.get("n_collapsed", 0) for x in learning)
        networks = sum(x.get("n_networks", 0) for x in learning)
        vs_text = _vs_cell(arm.get("vs_reference_over_seeds"), "auc")
        rows.append([name, ", ".join(str(k) for k in arm.get("seeds", [])), *(_mean_sd(over.get(m)) for m in METRICS),
                     _mean_sd(over.get("auc")), f"{len(over.get('seeds_with_collapse') or [])} of {over.get('n_seeds', 0)}"
                     + (f" ({not_learned} of {networks} networks)" if networks else ""), vs_text])
    doc.table(["arm", "seeds", *(f"{m.upper()}" for m in METRICS), "AUC", "seeds with a network that did not learn",
               "AUC - centralized (same seeds)"], rows)
    doc.p("A network did not learn when its final training loss stayed within the configured margin of the loss's "
          "chance level or it called every training case the same class (model.json, learning_check); such a "
          "model is counted here, never dropped. The local arm's value per seed is the mean over its site models.")


def _flat_table(doc: _Doc, title: str, block: Any) -> None:
    """Render a dict of dicts of scalars as a table (rows = outer keys); anything else as JSON text."""
    if not isinstance(block, dict) or not block:
        return
    inner = [v for v in block.values() if isinstance(v, dict)]
    if inner and len(inner) == len(block) and all(
            all(not isinstance(x, (dict, list)) for x in v.values()) for v in inner):
        cols: list[str] = []
        for v in inner:
            cols.extend(k for k in v if k not in cols)
        doc.h(3, title)
        doc.table(["", *cols], [[str(k), *(_num(v.get(c)) for c in cols)] for k, v in block.items()])
        return
    scalars = {k: v for k, v in block.items() if not isinstance(v, (dict, list))}
    if scalars:
        doc.h(3, title)
        doc.table(["", "value"], [[k, _num(v)] for k, v in scalars.items()])
    for k, v in block.items():
        if isinstance(v, dict):
            _flat_table(doc, f"{title}: {k}", v)


def _ci(block: dict, key: str = "auc") -> str:
    if not isinstance(block, dict) or block.get(key) is None:
        return "–"
    lo, hi = block.get("ci_low"), block.get("ci_high")
    return f"{_num(block[key])} [{_num(lo)}, {_num(hi)}]" if lo is not None else _num(block[key])


def _reference_cell(ref: dict | None) -> str:
    """The privacy table's reference-control cell: mean AUC (per generator); excess [CI]."""
    if not ref:
        return "not run"
    per_generator = ", ".join(f"{g} {_num(r.get('auc'))}" for g, r in (ref.get("by_generator") or {}).items())
    above = " (above the reference)" if ref.get("excess_above_zero") else ""
    return (f"{_num(ref.get('auc_mean'))} ({per_generator}); excess {_num(ref.get('excess_auc'))} "
            f"[{_num(ref.get('excess_ci_low'))}, {_num(ref.get('excess_ci_high'))}]{above}")


#: what the privacy table of a generator arm (CATphishing) measures
GENERATOR_PRIVACY_NOTE = (
    "SSIM distance-based membership inference (paper 000, Supplementary Note 4: AUC 0.493): a case's "
    "score is its best SSIM to any synthetic case; members are the cases the site's generator trained "
    "on, non-members the site's held-out cases. The attack only counts if the negative control sits at "
    "chance and the positive controls are caught: noisy copies of a few training cases (what a perfectly "
    "memorising generator would emit) and the samples of the site's own generator with its decoder and "
    "diffusion model fine-tuned on a few members only (a generator deliberately over-fitted to them; its "
    "memorised cases against the held-out ones). The reference control attacks the same members and "
    "non-members with the other sites' synthetic cases, from generators that never saw them: its AUC is "
    "what the split alone gives (a few held-out cases can be less typical brains than the members), so "
    "a membership AUC above chance points at the site's generator only by its excess over the "
    "reference (95 % CI from a paired bootstrap). Fewer than 250 members or non-members cannot certify an "
    "AUC bound of 0.55 (PRIVACY.md P1). Copy rate: share of synthetic cases closer to a training case "
    "than 95 % of held-out cases are; the closest pairs are in the privacy closest figures.")

#: what the privacy table of FedKD's compressed samples measures
COMPRESSED_PRIVACY_NOTE = (
    "The same SSIM membership inference on what each site sent (synthetic column: its compressed samples, every "
    "round kept by the server), each volume windowed over its whole grid (compressed samples have no zero "
    "background): members are the site's cases it compressed, non-members its held-out cases (audit_holdout), "
    "which it never compressed. Controls: members vs members (must sit at chance), noisy copies of a few members "
    "(must be caught), the site's compression started from a few real members instead of noise (a compression "
    "that leaks: must be caught) and the other sites' compressed samples, which never saw these cases (the "
    "reference control). Fewer than 250 members or non-members cannot certify an AUC bound of 0.55 (PRIVACY.md "
    "P1). Copy rate: share of compressed samples closer to a member than 95 % of held-out cases are.")


#: what the privacy table of AsynDGAN's generated images measures
ASYNDGAN_PRIVACY_NOTE = (
    "The same SSIM membership inference on the images the server's generator drew for each site's disclosed masks: "
    "members are the site's cases whose masks it disclosed and its discriminator saw, non-members its held-out "
    "cases (audit_holdout), neither disclosed nor seen. Each generated image is drawn for one member's own mask and "
    "shares its tumour and brain outline exactly (background 0 outside it), so membership AUC and copy rate here "
    "first measure the mask disclosure itself (the server holds every member's mask), then the generated "
    "intensities; own-mask SSIM in results.json (own_mask) is each image's SSIM to the member it was drawn for. "
    "Controls: members vs members (must sit at chance), noisy copies of a few members (must be caught) and the "
    "images drawn for the other sites' masks (reference control; not run for the pooled baseline, whose one "
    "generator saw every member). 2D studies use the 2D SSIM (11x11 window). Fewer than 250 members or non-members "
    "cannot certify an AUC bound of 0.55 (PRIVACY.md P1). Copy rate: share of generated images closer to a member "
    "than 95 % of held-out cases are.")

#: the privacy table's labels for an arm without generator artifacts whose data went through the shared audit:
#: arm -> (its own positive control, what its reference control attacks with, note); others get FedKD's
AUDITED_ARMS: dict[str, tuple[str, str, str]] = {
    "asyndgan": ("over-fitted generator", "images drawn for other sites' masks", ASYNDGAN_PRIVACY_NOTE),
    "asyndgan_pooled": ("over-fitted generator", "(none: one generator saw every member)", ASYNDGAN_PRIVACY_NOTE),
}


def _own_mask_table(doc: _Doc, name: str, priv: dict) -> None:
    """AsynDGAN's own-mask similarity (``own_mask`` of each audited site), when the audit has it."""
    rows = []
    for s, v in priv.items():
        own = v.get("own_mask")
        if isinstance(own, dict) and "ssim_median" in own:
            spread = f"{_num(own['ssim_median'])} [{_num(own.get('ssim_min'))}, {_num(own.get('ssim_max'))}]"
            rows.append([s, _num(own.get("n")), spread, _num(own.get("below_copy_threshold"))])
    if rows:
        doc.h(3, f"Generated images vs the member each was drawn for ({name})")
        doc.table(["site", "images", "SSIM to own mask's case, median [min, max]", "below copy threshold"], rows)


def _is_audit_block(priv: Any) -> bool:
    """Whether an arm's ``privacy`` block is per site :func:`synthlearn.audits.privacy.audit_site`'s dict (or
    ``{"skipped": why}``)."""
    return isinstance(priv, dict) and bool(priv) and all(
        isinstance(v, dict) and ("membership" in v or "skipped" in v) for v in priv.values())


def _privacy_table(doc: _Doc, name: str, priv: Any, *, control: str, reference: str, note: str) -> None:
    """The privacy audit of an arm's synthetic data, one row per site: membership inference with its controls and
    the copy rate; ``control`` names the arm's own positive control (audit_site's ``positive_control_generator``),
    ``reference`` what its reference control attacks with."""
    if not isinstance(priv, dict) or not priv:
        return
    doc.h(2, f"Privacy audit ({name})")
    rows = []
    for s, v in priv.items():
        if "skipped" in v:
            rows.append([s, "skipped: " + str(v["skipped"])] + ["–"] * 8)
            continue
        mem, neg, pos, cr = v.get("membership", {}), v.get("negative_control", {}), v.get("positive_control", {}), \
            v.get("copy_rate", {})
        gen = v.get("positive_control_generator") or {}
        flag = " (ABOVE chance: members closer to the synthetic cases)" if mem.get("above_chance") else ""
        ref_cell = _reference_cell(v.get("reference_control"))
        rows.append([s, f"{v.get('n_train')} / {v.get('n_holdout')} / {v.get('n_synthetic')}", _ci(mem) + flag,
                     ref_cell,
                     _num(mem.get("tpr_at_1pct_fpr", mem.get("tpr_at_fpr"))),
                     f"{_ci(neg)} ({'at chance' if v.get('negative_control_ok') else 'NOT at chance'})",
                     f"{_ci(pos)} ({'caught' if v.get('positive_control_caught') else 'NOT caught'})",
                     ("skipped: " + str(gen["skipped"]) if "skipped" in gen else
                      f"{_ci(gen)} ({'caught' if v.get('positive_control_generator_caught') else 'NOT caught'}; "
                      f"{len(gen.get('memorised_case_ids', []))} cases)" if gen else "not run"),
                     _num(cr.get("rate")), "underpowered" if mem.get("underpowered") else "–"])
    doc.table(["site", "members / non-members / synthetic", "membership AUC [95% CI]",
               f"reference control: AUC against {reference}", "TPR at 1% FPR",
               "negative control (members vs members)", "positive control (memorised copies)",
               f"positive control ({control})", "copy rate", "power"], rows)
    doc.p(note)


def _fidelity_section(doc: _Doc, name: str, fid: Any) -> None:
    """An arm's fidelity audit (:func:`synthlearn.audits.fidelity.fidelity`): Frechet distances of the same site per
    sequence, then the cross-site matrix per sequence."""
    if not isinstance(fid, dict) or not fid.get("same_site"):
        return
    seqs = fid.get("sequences", [])
    doc.h(2, f"Fidelity ({name})")
    doc.p(f"Frechet distance between real and synthetic cases of the same site, per sequence; features: "
          f"{(fid.get('extractor') or {}).get('name', fid.get('extractor'))}. Cases per site: real "
          f"{fid.get('n_real')}, synthetic {fid.get('n_synthetic')}. The cross-site matrix (synthetic site A vs "
          f"real site B) is in the figure fid matrix below; lower is closer.")
    doc.table(["site", *seqs], [[s, *(_num(v.get(q), 1) for q in seqs)] for s, v in fid["same_site"].items()])
    real_sites = fid.get("real_sites", [])
    for q in seqs:
        m = (fid.get("matrix") or {}).get(q)
        if m:
            doc.h(3, f"Cross-site Frechet distance, {q} (rows: synthetic, columns: real)")
            doc.table(["synthetic \\ real", *real_sites],
                      [[a, *(_num(x, 1) for x in row)] for a, row in zip(fid.get("synthetic_sites", []), m)])


def _synthetic_arm(doc: _Doc, name: str, arm: dict) -> None:
    """The generator arms' own sections: what each site shipped, the synthetic data, fidelity, privacy."""
    gens = arm.get("generators") or {}
    if gens:
        doc.h(2, f"What each site shipped ({name})")
        doc.table(["site", "training cases", "held out (audit)", "class counts", "artifact size", "training time"],
                  [[s, _num(g.get("training_cases")), _num(g.get("holdout_cases")),
                    ", ".join(f"{k} {v}" for k, v in (g.get("class_counts") or {}).items()), _bytes(g.get("bytes")),
                    _duration(g.get("wall_s"))] for s, g in gens.items()])
        gated = {s: g["release_gate"] for s, g in gens.items() if isinstance(g.get("release_gate"), dict)}
        if gated:
            doc.h(2, f"Release gate at each site ({name})")
            rows = []
            for s, gate in gated.items():
                fig = gate.get("figures") or {}
                verdict = "passed" if gate.get("passed") else (
                    f"refused ({', '.join(gate.get('failed', []))}); released with the reason: "
                    f"{gate.get('override_reason')}" if gate.get("overridden") else "refused")
                rows.append([s, verdict, _num(fig.get("copy_rate")), _num(fig.get("membership_ssim")),
                             _num(fig.get("membership_loss")), _num(fig.get("exposed_members"), 0)])
            doc.table(["site", "decision", "copy rate", "SSIM attack AUC", "loss attack AUC", "exposed members"], rows)
            doc.p("Before its generator left, each site attacked it with its own members and held-out cases "
                  "(synthlearn.generators.ldm.release_gate): black-box SSIM membership inference with its controls, "
                  "the copy rate, and a white-box attack on the diffusion model's loss. A refused generator leaves "
                  "only with a reason recorded in its manifest.")
        dp = {s: g["privacy"] for s, g in gens.items()
              if isinstance(g.get("privacy"), dict) and g["privacy"].get("dp_sgd")}
        if dp:
            doc.h(2, f"Differential privacy of the generators ({name})")
            doc.table(["site", "epsilon (autoencoder)", "epsilon (diffusion)", "epsilon per patient (sum)", "delta"],
                      [[s, _num((p.get("components") or {}).get("autoencoder", {}).get("epsilon")),
                        _num((p.get("components") or {}).get("diffusion", {}).get("epsilon")),
                        _num(p.get("epsilon_total")) if p.get("epsilon_total") is not None else "∞ (no noise)",
                        _num(p.get("delta"), 6)] for s, p in dp.items()])
            doc.p("DP-SGD (Opacus; per-case clipping, Gaussian noise, Poisson sampling; RDP accountant). Not covered "
                  "by the guarantee: " + "; ".join(next(iter(dp.values())).get("not_covered", [])) + ".")
    syn = arm.get("synthetic") or {}
    if syn:
        doc.h(2, f"Synthetic data and diversity filter ({name})")
        rows = []
        for s, e in syn.items():
            div = e.get("diversity") or {}
            per = ", ".join(f"{c} {v.get('after')}/{v.get('before')}" for c, v in (div.get("per_class") or {}).items())
            rows.append([s, _num(e.get("generated")), _num(e.get("kept")),
                         _num(e.get("kept") / e["generated"] if e.get("generated") else None),
                         per or "–", f"{div.get('threshold_from', '–')} p{_num(div.get('percentile'), 0)}"])
        doc.table(["site", "generated", "kept", "kept share", "kept per class", "filter"], rows)
        doc.p("Diversity filter (paper 000): whole-tumour radiomics features, pairwise distances within a site, one "
              "case of every pair closer than the percentile threshold dropped. The paper kept 4614 of 9600 (48 %).")
    _fidelity_section(doc, name, arm.get("fidelity"))
    iq = arm.get("image_quality")
    if isinstance(iq, dict) and iq.get("brisque"):
        seqs = iq.get("sequences", [])
        doc.h(2, f"No-reference image quality ({name})")
        doc.p(f"BRISQUE and PIQE (lower is better) of the {iq.get('slice', 'mid-tumour axial')} slice, mean over "
              f"cases, real / synthetic.")
        for metric in ("brisque", "piqe"):
            rows = []
            for s, v in iq[metric].items():
                rows.append([s, *(f"{_num((v.get(q, {}).get('real') or {}).get('mean'), 1)} / "
                                  f"{_num((v.get(q, {}).get('synthetic') or {}).get('mean'), 1)}" for q in seqs)])
            doc.h(3, metric.upper())
            doc.table(["site", *seqs], rows)
    rec = arm.get("recognition")
    if isinstance(rec, dict) and rec:
        doc.h(2, f"Class recognition of the synthetic cases ({name})")
        if "skipped" in rec:
            doc.p(f"Not measured: {rec['skipped']}.")
        else:
            classes = list(rec.get("per_class") or {})
            rows = [["all sites", _num(rec.get("n")), _num(rec.get("balanced")),
                     *(_num((rec.get("per_class") or {}).get(c)) for c in classes)]]
            rows += [[s, _num(v.get("n")), _num(v.get("balanced")),
                      *(_num((v.get("per_class") or {}).get(c)) for c in classes)]
                     for s, v in (rec.get("per_site") or {}).items()]
            doc.table(["synthetic cases of", "n", "recognised (balanced)", *(f"recognised as {c}" for c in classes)],
                      rows)
            lo_hi = rec.get("auc_ci") or [None, None]
            doc.p(f"The {rec.get('reference')} arm's model (trained on the real training cases) classifies the "
                  f"kept synthetic cases; recognised = predicted as the class the sample was conditioned on, "
                  f"balanced over classes (chance {_num(rec.get('chance'))}). AUC of the conditioned class "
                  f"{_num(rec.get('auc'))} [{_num(lo_hi[0])}, {_num(lo_hi[1])}]. Samples that a model of real "
                  f"scans does not recognise cannot teach a model that works on real scans.")
    _privacy_table(doc, name, arm.get("privacy"), control="over-fitted generator",
                   reference="generators that never saw these cases", note=GENERATOR_PRIVACY_NOTE)


def _audits(doc: _Doc, results: dict) -> None:
    for name in sorted(results.get("arms", {}), key=_arm_sort_key):
        arm = results["arms"][name]
        if arm.get("generators") or arm.get("synthetic"):
            _synthetic_arm(doc, name, arm)
            continue
        _fidelity_section(doc, name, arm.get("fidelity"))
        if _is_audit_block(arm.get("privacy")):  # an arm without generators whose data went through the audit
            control, reference, note = AUDITED_ARMS.get(
                name.split(":")[0].split("/")[0],
                ("compression started from members", "other sites' compressed samples", COMPRESSED_PRIVACY_NOTE))
            _privacy_table(doc, name, arm["privacy"], control=control, reference=reference, note=note)
            _own_mask_table(doc, name, arm["privacy"])
        for key, title in (("diversity", "Diversity filter"), ("fidelity", "Fidelity"), ("privacy", "Privacy audit")):
            if arm.get(key) and not (key == "privacy" and _is_audit_block(arm[key])) and not (
                    key == "fidelity" and isinstance(arm[key], dict) and arm[key].get("same_site")):
                doc.h(2, f"{title} ({name})")
                _flat_table(doc, title, arm[key])


def _figure_caption(path: Path, run_dir: Path) -> str:
    rel = path.relative_to(run_dir).with_suffix("").as_posix()
    return rel.replace("/", " / ").replace("_", " ")


def _federation_events(doc: _Doc, results: dict) -> None:
    """The rounds a federated arm went on without some sites (``federation_events``), one row per round."""
    rows = [[name, str(e["round"]), ", ".join(e["missing_sites"])]
            for name, arm in sorted(results["arms"].items(), key=lambda kv: _arm_sort_key(kv[0]))
            for e in arm.get("federation_events") or []]
    if rows:
        doc.h(2, "Federation events")
        doc.p("Rounds that went on without some sites (a site failed or did not answer within the round timeout; "
              "the arm's `tolerate_missing` let the others' round stand). Every other round had every site.")
        doc.table(["arm", "round", "sites left out"], rows)


def write_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.html`` into ``run_dir`` from its ``results.json`` and PNGs.

    Raises:
        FileNotFoundError: no ``results.json`` in ``run_dir``.
        ValueError: ``results.json`` is not the study schema.
    """
    from synthlearn.data.io import atomic_write_text

    run_dir = Path(run_dir)
    path = run_dir / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no results; run `synthlearn study run --config FILE --out {run_dir}` first")
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(results, dict) or not isinstance(results.get("arms"), dict):
        raise ValueError(f"{path}: expected an object with 'task' and 'arms', found keys "
                         f"{list(results) if isinstance(results, dict) else type(results).__name__}")
    doc = _Doc()
    title = f"synthlearn study report: {results.get('task', '?')}"
    doc.h(1, title)
    meta = [f"run folder {run_dir.resolve()}", f"task {results.get('task', '?')}"]
    if results.get("study"):
        meta.append(f"study {results['study']}")
    meta.append(f"written {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')}")
    doc.p("; ".join(meta))
    _comparison(doc, results)
    _federation_events(doc, results)
    figures = sorted(p for p in run_dir.rglob("*.png") if not p.name.startswith("."))
    if figures:
        doc.h(2, "Figures")
        for fig in figures:
            doc.figure(fig, _figure_caption(fig, run_dir))
    _audits(doc, results)
    md_path, html_path = run_dir / "report.md", run_dir / "report.html"
    atomic_write_text(md_path, doc.markdown(run_dir))
    atomic_write_text(html_path, doc.html(title))
    return html_path, md_path


def write_document(folder: str | Path, title: str, blocks: Sequence[tuple[str, Any]]) -> tuple[Path, Path]:
    """A report of one's own (e.g. a paper check's over several studies) in the study report's style:
    ``folder/report.html`` (figures embedded) and ``folder/report.md``.

    Args:
        blocks: in order, ``("h", (level, text))``, ``("p", text)``, ``("table", (header, rows))`` or
            ``("figure", (path, caption))`` (paths inside ``folder``).

    Returns:
        ``(html_path, md_path)``.

    Raises:
        ValueError: an unknown block kind.
    """
    from synthlearn.data.io import atomic_write_text

    folder = Path(folder)
    doc = _Doc()
    for kind, data in blocks:
        if kind not in ("h", "p", "table", "figure"):
            raise ValueError(f"report block kind must be h, p, table or figure, found {kind!r}")
        doc.blocks.append((kind, data))
    md_path, html_path = folder / "report.md", folder / "report.html"
    atomic_write_text(md_path, doc.markdown(folder))
    atomic_write_text(html_path, doc.html(title))
    return html_path, md_path
