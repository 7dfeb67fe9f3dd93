"""Causal MiTA against full attention, causal MoBA and a local window: MQAR recall and shakespeare-char.

Regenerates ``results/causal.md`` and ``results/causal.json`` (the tables of ``docs/causal.md``). The
script holds the experiments (which runs: attention kinds, routers, seeds, MQAR sizes and curriculum,
shakespeare-char) and the report; each run is one ``mita train`` (a GPT from the ``gpt-mqar`` /
``gpt-shakespeare`` preset) in its own directory ``--runs/NAME``. From the run's ``summary.json``,
``metrics.jsonl`` and ``model.safetensors`` (reloaded with :func:`mita.train.checkpoint.load_model`)
the script writes the run's record ``--runs/NAME.json``: its settings, the evaluations, MQAR's routing
recall (the trainer's :func:`mita.analysis.recall.mqar_routing_summary`), the MiTA sweep over k and b
at inference (MQAR) and a sample (shakespeare-char). A run with a record is not trained again; an
interrupted one resumes from its last checkpoint; ``--jobs`` trains several at once.

    python results/causal.py mqar --jobs 2                 # the MQAR table (accuracy, routing recall)
    python results/causal.py shakespeare --jobs 2          # the shakespeare-char table and a sample
    python results/causal.py report                        # rewrite the tables from the records

MQAR at N >= 512 learns on a CPU budget only with a curriculum (``--curriculum``: short stages with few
pairs first, one learning-rate schedule over all stages, ``mita train --curriculum``), and
``--full-first S`` adds MiTA runs that are the full-attention run for their first S steps and MiTA after
(``mita train --full-first``; docs/causal.md has the commands).

The recipe is ``mita train``'s: AdamW, no weight decay on 1-d parameters (what ``GPT.no_weight_decay()``
names), 5 % linear warm-up then cosine, gradient clip 1, cross-entropy on the target positions only.
Records in ``results/causal.json`` from before these runs went through ``mita train`` (those without a
``recipe`` key) were trained by an own loop of this script, which differed in: AdamW betas (0.9, 0.95)
where ``mita train`` uses (0.9, 0.999); a cosine down to 10 % of the peak where ``mita train`` goes to 0;
warm-up factor ``(s + 1) / w`` over ``w = max(1, int(0.05 T))`` steps where ``mita train`` uses
``(s + 1) / (w + 1)`` with ``w = round(0.05 T)``; its own batch order (``mita train`` draws the task's
batches from its resumable sampler and a curriculum stage's from a permutation seeded by (seed, stage));
and evaluations only at ``eval_at`` and the end (``mita train`` also evaluates at each epoch's end).
The report renders both kinds of record, and it keeps the records and the ``speed`` rows of the
last ``--out``.json (those of ``--runs`` replace them by name); the speed rows of ``results/causal.json``
were read back once from the table of ``results/causal.md`` (as printed there) when the JSON began to
hold them. The training throughput (``train_tokens_per_s``) is the run's
tokens over ``mita train``'s training time (evaluation excluded); ``speed`` times the training step
(forward, loss on all logits as ``mita train`` computes it, backward, AdamW) of every kind interleaved
in one process, a benchmark rather than training.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from mita.data import build_dataset
from mita.io import write_json, write_text
from mita.models import build_model
from mita.nn.causal import MiTACausal
from mita.nn.causal_router import objective_rows
from mita.system import hardware
from mita.train.checkpoint import load_model
from mita.train.curriculum import check_stages, parse_curriculum
from mita.train.evaluate import evaluate
from mita.train.objective import IGNORE_INDEX, loss_fn, sparse_targets
from mita.train.presets import get_preset
from mita.train.recall import mqar_routing_summary
from mita.train.report import run_all as train_all
from mita.train.report import train_args

HERE = Path(__file__).resolve().parent


# ---- the experiments ----------------------------------------------------------------------------------


def _curriculum(a: argparse.Namespace) -> list[dict[str, Any]]:
    """The stages of ``--curriculum LEN:PAIRS:STEPS[:BATCH],...``, trained before the task itself, checked
    by ``mita train``'s own parser and stage checks; a stage without BATCH has ``--batch-size x --seq-len``
    tokens per step (``mita train``'s default would be ``--batch-size`` sequences). Empty without the flag.
    Zoology trains MQAR on a mixture of lengths, most of it short; stages do the same in order, with one
    learning-rate schedule over all of them and the task."""

    stages = parse_curriculum(a.curriculum)
    check_stages(stages, "mqar", {"seq_len": a.seq_len, "vocab_size": a.vocab})
    return [
        {
            "data": {"seq_len": st.seq_len, "num_pairs": st.num_pairs, "vocab_size": a.vocab},
            "steps": st.steps,
            "batch_size": st.batch_size or max(1, a.batch_size * a.seq_len // st.seq_len),
        }
        for st in stages
    ]


# 2 layers, width 64, 2 heads of 32 (Zoology's small MQAR models are 2 layers at width 64-128)
MQAR_MODEL = {"dim": 64, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0, "token_shift": True}


def mqar_specs(a: argparse.Namespace) -> list[dict[str, Any]]:
    """Per pair count: full, window, MoBA and MiTA (both horizons) at matched budget (b = k, MoBA
    ``k / b`` blocks); the MiTA and full models are then re-evaluated over a k x b grid (inference only)."""
    b, k = a.block_size, a.topk
    grid = [(kk, bb) for kk, bb in ((k // 2, b), (k, b), (2 * k, b), (k, b // 2), (k, 2 * b)) if kk and bb]
    specs = []
    pre = _curriculum(a)
    stage_tags = (
        f"{c['data']['seq_len']}x{c['data']['num_pairs']}x{c['steps']}x{c['batch_size']}" for c in pre
    )
    ctag = "-c" + ".".join(stage_tags) if pre else ""
    total = sum(c["steps"] for c in pre) + a.steps
    if a.full_first and not 0 < a.full_first < total:
        raise ValueError(f"--full-first {a.full_first} must be between 1 and the run's {total} steps - 1")

    def add(
        pairs: int, kind: str, horizon: str = "prefix", shared: bool = True, full_first: int = 0,
        router: str = "argmax",
    ) -> None:  # fmt: skip
        opts: dict[str, Any] = {"block_size": b}
        tag = f"{kind}-b{b}"
        if kind == "mita":
            opts |= {"topk": k, "landmark_horizon": horizon, "router": router}
            opts |= {} if shared else {"shared": False}
            tag = f"mita-{horizon}-k{k}-b{b}" + ("" if shared else "-routed")
            tag += "" if router == "argmax" else f"-{router}"
        elif kind == "moba":
            opts |= {"top_blocks": max(1, k // b), "router": "argmax"}  # MoBA as published
            tag = f"moba-s{max(1, k // b)}-b{b}"
        elif kind == "full":
            opts, tag = {}, "full"
        data = {"seq_len": a.seq_len, "num_pairs": pairs, "vocab_size": a.vocab}
        cur = pre + [{"data": data, "steps": a.steps, "batch_size": a.batch_size}] if pre else []
        name = f"mqar-n{a.seq_len}-p{pairs}-v{a.vocab}-{tag}-s{a.steps}{ctag}"
        name += (f"-seed{a.seed}" if a.seed else "") + (f"-full{full_first}" if full_first else "")
        specs.append({
            "name": name, "task": "mqar", "curriculum": cur, "attention": kind, "data": data,
            "model": {**MQAR_MODEL, **opts}, "steps": a.steps, "batch_size": a.batch_size, "lr": a.lr,
            "weight_decay": 0.1, "seed": a.seed, "test_size": a.test_size, "eval_batch_size": 64,
            "eval_at": [total - a.steps + a.steps // 2], "pairs": pairs, "sweep_grid": grid,
        } | ({"full_first": full_first} if full_first else {}))  # fmt: skip

    for pairs in a.pairs:  # the slow MiTA runs first, so that --jobs 2 overlaps them with the rest
        for shared in (True, False) if a.routed_only else (True,):
            for full_first in (0, a.full_first) if a.full_first else (0,):
                for horizon in ("prefix", "frozen"):
                    for router in getattr(a, "routers", None) or ["argmax"]:
                        add(pairs, "mita", horizon, shared, full_first, router)
        for kind in ("full", "moba", "window"):
            add(pairs, kind)
    return specs


# 2 layers, width 64 (heads of 32): what the shared 2-core CPU trains at context 1024 in minutes
SHAKESPEARE_MODEL = {"dim": 64, "depth": 2, "num_heads": 2, "mlp_ratio": 4.0}


def shakespeare_specs(a: argparse.Namespace) -> list[dict[str, Any]]:
    """One run per attention kind at context ``--seq-len``, b = k = 64, equal steps."""
    specs = []
    for kind, opts in (  # mita prefix first: the longest run starts first when --jobs > 1
        ("mita", {"block_size": 64, "topk": 64, "landmark_horizon": "prefix", "router": "argmax"}),
        ("mita", {"block_size": 64, "topk": 64, "landmark_horizon": "frozen", "router": "argmax"}),
        ("full", {}),
        ("moba", {"block_size": 64, "top_blocks": 1, "router": "argmax"}),
        ("window", {"block_size": 64}),
    ):
        tag = f"{kind}-{opts['landmark_horizon']}" if kind == "mita" else kind
        name = f"shakespeare-n{a.seq_len}-{tag}-s{a.steps}x{a.batch_size}-seed{a.seed}"
        specs.append({
            "name": name, "task": "shakespeare-char", "attention": kind,
            "data": {"seq_len": a.seq_len}, "model": {**SHAKESPEARE_MODEL, **opts}, "steps": a.steps,
            "batch_size": a.batch_size, "lr": a.lr, "weight_decay": 0.1, "seed": a.seed,
            "test_size": a.test_size, "eval_batch_size": 8, "eval_at": [a.steps // 2],
        })  # fmt: skip
    return specs


# ---- runs: one mita train each -------------------------------------------------------------------------


FLAGS = {"block_size": "--block-size", "topk": "--topk", "landmark_horizon": "--landmark-horizon"}


def train_argv(spec: dict[str, Any], out: Path, device: str = "auto", progress: bool = True) -> list[str]:
    """The ``mita train`` arguments of ``spec``, writing to the run directory ``out``.

    The model is the task's preset with what ``spec["model"]`` sets differently (b, k and the horizon
    as flags, the rest as ``--model-arg``); ``--epochs`` equal to the steps lifts the preset's own step
    count, so that ``--max-steps`` alone sets the run's length (with a curriculum: the task's steps after
    the stages)."""

    preset = get_preset(spec["task"])
    base = {**preset.model_kwargs, **preset.attention_kwargs.get(spec["attention"], {})}
    stages = (spec.get("curriculum") or [])[:-1]  # the last stage is the task itself
    curriculum = ",".join(
        f"{st['data']['seq_len']}:{st['data']['num_pairs']}:{st['steps']}:{st['batch_size']}" for st in stages
    )
    model = spec["model"]
    options = {
        "--task": spec["task"], "--attention": spec["attention"], "--seed": spec["seed"],
        "--max-steps": spec["steps"], "--epochs": spec["steps"], "--batch-size": spec["batch_size"],
        "--lr": spec["lr"], "--weight-decay": spec["weight_decay"], "--test-size": spec["test_size"],
        "--eval-batch-size": spec["eval_batch_size"], "--eval-every": min(spec.get("eval_at") or [None]),
        "--curriculum": curriculum or None, "--full-first": spec.get("full_first") or None,
        "--device": device, "--out": out, **{flag: model.get(key) for key, flag in FLAGS.items()},
    }  # fmt: skip
    args = train_args(options, {"--resume": True, "--no-progress": not progress})
    for key, value in spec["data"].items():
        args += ["--data-arg", f"{key}={value}"]
    for key, value in model.items():
        if key not in FLAGS and (key not in base or base[key] != value):
            args += ["--model-arg", f"{key}={json.dumps(value)}"]
    return args


def _test_set(spec: dict[str, Any]) -> Any:
    """The run's test set, as ``mita train`` builds it (the task's data at the spec's size)."""

    return build_dataset(spec["task"], "test", size=spec["test_size"], **spec["data"])


def _tokens(spec: dict[str, Any]) -> int:
    """Tokens the run trained on: every stage's ``steps x batch x length`` (no curriculum: the task's)."""
    stages = spec.get("curriculum") or [
        {"data": spec["data"], "steps": spec["steps"], "batch_size": spec["batch_size"]}
    ]
    return sum(st["steps"] * st["batch_size"] * st["data"]["seq_len"] for st in stages)


@torch.no_grad()
def mqar_sweep(model: torch.nn.Module, test: Any, spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Accuracy and routing recall of the trained model at other MiTA settings, at inference only.

    A MiTA model is re-run with each ``(topk, block_size)`` of ``spec["sweep_grid"]``; a model trained with
    another kind has its mixers swapped for MiTA's (both horizons), keeping every weight (mixers hold none).
    """

    rows = []
    attns = [blk.attn for blk in model.blocks]
    trained = [a.mixer for a in attns]
    horizons = [trained[0].landmark_horizon] if spec["attention"] == "mita" else ["prefix", "frozen"]
    for horizon in horizons:
        for k, b in spec["sweep_grid"]:
            for a in attns:
                a.mixer = MiTACausal(block_size=b, topk=k, landmark_horizon=horizon)
            ev = evaluate(model, test, batch_size=spec["eval_batch_size"])
            recall = mqar_routing_summary(model, test)
            scores = {"loss": ev["test_loss"], "accuracy": ev["test_accuracy"], "targets": ev["targets"]}
            rows.append({"horizon": horizon, "topk": k, "block_size": b, **scores, "recall": recall})
    for a, m in zip(attns, trained):
        a.mixer = m
    return rows


def run_record(spec: dict[str, Any], out: Path) -> dict[str, Any]:
    """The record of the finished run of ``spec`` in ``out``: the spec, the evaluations of its
    ``metrics.jsonl`` (``curve``, ``final``), time and throughput from its ``summary.json``, and what the
    saved weights give: MQAR's sweep over k and b, shakespeare-char's sample."""

    summary = json.loads((out / "summary.json").read_text())
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    test = _test_set(spec)
    targets = sum(int((test[i][1] != IGNORE_INDEX).sum()) for i in range(len(test)))
    curve, seen = [], set()
    for e in events:
        if e["event"] == "eval" and e["step"] not in seen:
            seen.add(e["step"])
            logged = [t["loss"] for t in events if t["event"] == "train" and t["step"] <= e["step"]]
            scores = {"loss": e["test_loss"], "accuracy": e["test_accuracy"], "targets": targets}
            curve.append({"step": e["step"], "train_loss": logged[-1] if logged else None, **scores})
    rec = {
        **spec, "out": str(out), "final": dict(curve[-1]), "curve": curve, "recipe": summary["recipe"],
        "train_seconds": summary["train_time_s"], "params": summary["num_params"],
        "train_tokens_per_s": _tokens(spec) / summary["train_time_s"],
    }  # fmt: skip
    if spec["task"] == "mqar" and summary.get("routing_recall"):
        rec["recall"] = summary["routing_recall"]
    want_sweep = spec["task"] == "mqar" and spec.get("sweep_grid") and spec["attention"] in ("mita", "full")
    if want_sweep or spec["task"] == "shakespeare-char":
        model, _ = load_model(out)
        if want_sweep:
            rec["sweep"] = mqar_sweep(model, test, spec)
        else:
            rec["final"]["bits_per_byte"] = summary["test_bits_per_byte"]
            prompt = torch.tensor([list(b"ROMEO:\n")])
            g = torch.Generator().manual_seed(0)
            sample = model.eval().generate(prompt, 300, temperature=0.8, top_k=40, generator=g)
            rec["sample"] = bytes(sample[0].tolist()).decode("utf-8", errors="replace")
    return rec


def run_all(
    specs: list[dict[str, Any]], runs: str, jobs: int, device: str = "auto", progress: bool = True
) -> None:
    """Train every spec without a record in ``runs`` (``jobs`` at a time), then write the records."""

    todo = [s for s in specs if not (Path(runs) / f"{s['name']}.json").is_file()]
    cmds = {
        s["name"]: train_argv(s, Path(runs) / s["name"], device, progress)
        for s in todo
        if not (Path(runs) / s["name"] / "summary.json").is_file()  # trained, record not yet written
    }
    train_all(cmds, jobs)
    for s in todo:
        write_json(Path(runs) / f"{s['name']}.json", run_record(s, Path(runs) / s["name"]))


def speed_run(
    task: str,
    data: dict[str, Any],
    models: dict[str, dict[str, Any]],
    kinds: dict[str, str],
    batch_size: int,
    rounds: int,
) -> dict[str, Any]:
    """Training-step throughput of each kind, interleaved round by round in one process on one batch
    (median of ``rounds``), so that every kind sees the same machine load; ratios are against ``full`` (when
    timed)."""

    torch.set_num_threads(1)
    ds = build_dataset(task, "train", seed=0, **data)
    xs, ys = zip(*(ds[i] for i in range(batch_size)))
    x, y = torch.stack(xs), torch.stack(ys)
    read = y != IGNORE_INDEX if sparse_targets(y) else None
    built = {}
    for label, kw in models.items():
        torch.manual_seed(0)
        v, n = ds.info.vocab_size, ds.info.seq_len
        m = build_model("gpt", vocab_size=v, max_len=n, attention=kinds[label], **kw)
        built[label] = (m, torch.optim.AdamW(m.parameters(), 1e-3))
    times: dict[str, list[float]] = {k: [] for k in built}
    for r in range(rounds + 1):  # round 0 warms up
        for kind, (m, opt) in built.items():
            t0 = time.perf_counter()
            with objective_rows(m, read):  # as mita train: a learned router distils the answers' rows
                loss = loss_fn(m(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if r:
                times[kind].append(time.perf_counter() - t0)
    tok = {k: x.numel() / statistics.median(v) for k, v in times.items()}
    vs_full = {"vs_full": {k: v / tok["full"] for k, v in tok.items()}} if "full" in tok else {}
    return {
        "task": task, "data": data, "batch_size": batch_size, "rounds": rounds, "models": models,
        "tokens_per_s": tok, **vs_full,
    }  # fmt: skip


# ---- tables -------------------------------------------------------------------------------------------


KIND_ORDER = {"full": 0, "mita": 1, "moba": 2, "window": 3}  # row order of the tables


def _fmt(v: Any, digits: int = 3) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _row(*cells: Any) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _label(r: dict[str, Any]) -> str:
    m = r["model"]
    if r["attention"] == "full":
        return "full"
    if r["attention"] == "mita":
        first = f", full for steps 1-{r['full_first']}" if r.get("full_first") else ""
        routed = " routed-only" if m.get("shared") is False else ""
        routed += f" router={m['router']}" if m.get("router", "argmax") != "argmax" else ""
        return f"mita {m['landmark_horizon']}{routed} (k={m['topk']}, b={m['block_size']}{first})"
    if r["attention"] == "moba":
        return f"moba (s={m['top_blocks']}, b={m['block_size']})"
    return f"window (b={m['block_size']})"


def _schedule(r: dict[str, Any]) -> str:
    """``steps x batch`` of a run, after its curriculum stages (``N/pairs: steps x batch``) if it had one."""
    last = f"{r['steps']} x {r['batch_size']}"
    stages = r.get("curriculum") or []
    pre = [
        f"{st['data']['seq_len']}/{st['data']['num_pairs']}: {st['steps']} x {st['batch_size']}"
        for st in stages[:-1]
    ]
    return ", ".join(pre + [f"then {last}" if pre else last])


def _seed_means(sh: list[dict[str, Any]]) -> list[str]:
    """Mean validation loss over seeds per (steps, batch, kind), and its difference from full attention's
    with the seeds paired (same seed, same data order); only settings with at least two seeds."""
    groups: dict[tuple, dict[str, dict[int, float]]] = {}
    for r in sh:
        groups.setdefault((r["data"]["seq_len"], r["steps"], r["batch_size"]), {}).setdefault(_label(r), {})[
            r["seed"]
        ] = r["final"]["loss"]
    out = []
    for (n, steps, batch), kinds in groups.items():
        full = kinds.get("full", {})
        if len(full) < 2:
            continue
        out += [
            "",
            f"Mean over seeds, context {n}, {steps} x {batch} (difference to full: same seed, paired):",
            "",
        ]
        out += [_row("attention", "seeds", "mean val loss", "minus full (mean)", "minus full (per seed)")]
        out.append("|---|---|---|---|---|")
        for label, by_seed in kinds.items():
            seeds = sorted(set(by_seed) & set(full))
            mean = sum(by_seed.values()) / len(by_seed)
            diffs = [by_seed[s_] - full[s_] for s_ in seeds]
            per = ", ".join(f"{d:+.4f}" for d in diffs)
            out.append(_row(label, len(by_seed), _fmt(mean, 4), f"{sum(diffs) / len(diffs):+.4f}", per))
    return out


def records(runs: str, out: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(run records, speed rows)``: those of ``out``.json (the last report), with the records in ``runs``
    added or replacing them by name and ``runs``/speed.json replacing the speed rows. A report from a fresh
    ``runs`` keeps the table's earlier rows. Records are in the order of their files' names."""
    path = Path(out).with_suffix(".json")
    last = json.loads(path.read_text()) if path.is_file() else {}
    recs = {r["name"]: r for r in last.get("runs", [])}
    for p in sorted(Path(runs).glob("*.json")):
        r = json.loads(p.read_text())
        if "task" in r and "final" in r:  # run records only (not speed.json)
            recs[r["name"]] = r
    speed = Path(runs) / "speed.json"
    rows = json.loads(speed.read_text())["speed"] if speed.is_file() else last.get("speed", [])
    return [recs[name] for name in sorted(recs, key=lambda n: f"{n}.json")], rows


def report(runs: str, out: str) -> None:
    """Write ``out``.md and ``out``.json from the run records and speed rows of :func:`records`."""

    recs, speed_rows = records(runs, out)
    lines = ["# Causal attention kinds: MQAR and shakespeare-char (CPU)", ""]
    hw = hardware(torch.device("cpu"))
    lines.append(
        f"Hardware: {hw.get('cpu', '?')}, torch {torch.__version__}; one thread per run, the machine "
        "shared with other jobs. Regenerate: `python results/causal.py report`. Runs whose record has a "
        "`recipe` were trained by `mita train` (AdamW betas (0.9, 0.999), cosine to 0); the others by the "
        "script's earlier loop (betas (0.9, 0.95), cosine to 10 % of the peak)."
    )
    mq = [r for r in recs if r["task"] == "mqar"]
    if mq:
        lines += ["", "## MQAR: recall accuracy (answer positions) and routing recall", ""]
        lines.append(
            "Accuracy: argmax = value at every query. Routing recall, per layer: among the queries whose "
            "needed key (the context position holding their value) lies before their own block, the "
            "fraction for which some head's routed expert holds it. Matched budget: MiTA k = b, MoBA "
            "s = k / b blocks, window b; all also see their own block."
        )
        lines.append("")
        head = ("N", "pairs", "vocab", "attention", "seed", "accuracy", "routing recall (layer 1 / 2)")
        lines.append(_row(*head, "curriculum, then steps x batch", "lr", "train s"))
        lines.append("|---|---|---|---|---|---|---|---|---|---|")

        def key(r: dict[str, Any]) -> tuple:
            m = r["model"]
            return (r["data"]["seq_len"], r["pairs"], r["data"]["vocab_size"], bool(r.get("curriculum")),
                    r["steps"], KIND_ORDER[r["attention"]], m.get("landmark_horizon", ""), m.get("topk", 0),
                    m.get("block_size", 0), r.get("seed", 0))  # fmt: skip

        mq = sorted(mq, key=key)
        for r in mq:
            rc = " / ".join(_fmt(x["recall_any_head"]) for x in r.get("recall", [])) or "—"
            d = r["data"]
            acc = _fmt(r["final"]["accuracy"])
            cells = (d["seq_len"], r["pairs"], d["vocab_size"], _label(r), r.get("seed", 0), acc, rc)
            run = (_schedule(r), f"{r['lr']:g}", f"{r['train_seconds']:.0f}")
            lines.append(_row(*cells, *run))
    swept = [r for r in mq if r.get("sweep")]
    if swept:
        lines += ["", "## MQAR: MiTA at other k and b, at inference (weights of the trained model)", ""]
        head = ("N", "pairs", "steps", "trained as", "evaluated as", "k", "b", "accuracy")
        lines.append(_row(*head, "routing recall (layer 1 / 2)"))
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for r in swept:
            for row in r["sweep"]:
                rc = " / ".join(_fmt(x["recall_any_head"]) for x in row["recall"])
                steps = f"{r['steps']}" + (" (curriculum)" if r.get("curriculum") else "")
                steps += f", seed {r['seed']}" if r.get("seed") else ""
                cells = (r["data"]["seq_len"], r["pairs"], steps, _label(r), f"mita {row['horizon']}")
                lines.append(_row(*cells, row["topk"], row["block_size"], _fmt(row["accuracy"]), rc))
    sh = [r for r in recs if r["task"] == "shakespeare-char"]
    if sh:
        lines += ["", "## shakespeare-char: held-out plays", ""]
        lines.append(
            "Train tokens/s is each run's own, measured while other jobs shared the machine differently; "
            "the interleaved table at the end compares speeds fairly."
        )
        head = (
            "context",
            "attention",
            "steps x batch",
            "seed",
            "val loss (nats)",
            "bits/byte",
            "train tok/s",
        )
        lines += ["", _row(*head), "|---|---|---|---|---|---|---|"]
        sh = sorted(
            sh, key=lambda r: (r["steps"], r["batch_size"], KIND_ORDER[r["attention"]], _label(r), r["seed"])
        )
        for r in sh:
            f, run = r["final"], f"{r['steps']} x {r['batch_size']}"
            cells = (
                r["data"]["seq_len"],
                _label(r),
                run,
                r["seed"],
                _fmt(f["loss"], 4),
                _fmt(f["bits_per_byte"], 4),
            )
            lines.append(_row(*cells, f"{r['train_tokens_per_s']:.0f}"))
        lines += _seed_means(sh)
        for r in sh:
            if r.get("sample") and r["seed"] == 0 and r["steps"] == max(x["steps"] for x in sh):
                lines += ["", f"Sample ({_label(r)}, temperature 0.8, top-k 40, prompt `ROMEO:`):", "", "```"]
                lines += [r["sample"], "```"]
    if speed_rows:
        lines += ["", "## Training-step throughput, interleaved in one process (median of the rounds)", ""]
        lines.append(_row("task", "N", "batch", "attention", "tokens/s", "vs full (SDPA causal)"))
        lines.append("|---|---|---|---|---|---|")
        for row in speed_rows:
            for label, tok in row["tokens_per_s"].items():
                cells = (row["task"], row["data"]["seq_len"], row["batch_size"], label, f"{tok:.0f}")
                lines.append(_row(*cells, f"{row['vs_full'][label]:.2f}x"))
    write_text(Path(out).with_suffix(".md"), "\n".join(lines) + "\n")
    write_json(
        Path(out).with_suffix(".json"),
        {"hardware": hw, "torch": torch.__version__, "runs": recs, "speed": speed_rows},
    )
    print("\n".join(lines))


DEFAULTS = {
    "mqar": {"steps": 500, "batch_size": 64, "lr": 3e-3, "seq_len": 128, "test_size": 256},
    "shakespeare": {"steps": 250, "batch_size": 4, "lr": 2e-3, "seq_len": 1024, "test_size": 32},
}


def _filled(a: argparse.Namespace, experiment: str) -> argparse.Namespace:
    """``a`` with the experiment's defaults where a flag was not given."""
    out = argparse.Namespace(**vars(a))
    for k, v in DEFAULTS[experiment].items():
        if getattr(out, k) is None:
            setattr(out, k, v)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("experiment", choices=("mqar", "shakespeare", "speed", "report"))
    p.add_argument("--rounds", type=int, default=5, help="speed: interleaved timing rounds")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--pairs", type=int, nargs="*", default=[16], help="MQAR pair counts")
    p.add_argument("--vocab", type=int, default=128, help="MQAR vocabulary")
    p.add_argument("--block-size", type=int, default=16, help="b of mita, moba and window (MQAR)")
    p.add_argument("--topk", type=int, default=16, help="MiTA's k (MQAR); MoBA gets k / b blocks")
    p.add_argument("--test-size", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--curriculum",
        help="MQAR: stages before the task, LEN:PAIRS:STEPS[:BATCH],... (e.g. 64:4:600:32,128:8:400:32)",
    )
    p.add_argument(
        "--full-first",
        type=int,
        default=0,
        help="MQAR: also train MiTA runs that use full attention for their first STEPS (of the same total)",
    )
    p.add_argument(
        "--routed-only",
        action="store_true",
        help="MQAR: also train MiTA without its shared expert (shared=False; with --full-first too)",
    )
    p.add_argument(
        "--routers", nargs="+", default=["argmax"], help="MQAR: MiTA routers to train (MiTACausal(router=))"
    )
    p.add_argument("--only", help="comma-separated substrings: run only the specs whose name has one")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at once, CPU threads split between them")
    p.add_argument("--device", default="auto", help="mita train --device (the tables' runs: cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--runs", default="runs/results-causal", help="run directories and their records")
    p.add_argument("--out", default=str(HERE / "causal"))
    a = p.parse_args(argv)
    Path(a.runs).mkdir(parents=True, exist_ok=True)
    if a.experiment == "speed":
        rows = []
        for exp, make in (("shakespeare", shakespeare_specs), ("mqar", mqar_specs)):
            # shakespeare at its defaults (the MQAR flags do not apply); MQAR: the first pair count
            given = a if exp == "mqar" else argparse.Namespace(**{**vars(a), **dict.fromkeys(DEFAULTS[exp])})
            specs = make(_filled(given, exp))[: None if exp == "shakespeare" else 5]
            models = {_label(s_): s_["model"] for s_ in specs}
            kinds = {_label(s_): s_["attention"] for s_ in specs}
            s0 = specs[0]
            rows.append(speed_run(s0["task"], s0["data"], models, kinds, s0["batch_size"], a.rounds))
        write_json(Path(a.runs) / "speed.json", {"speed": rows})
    elif a.experiment != "report":
        a = _filled(a, a.experiment)
        specs = mqar_specs(a) if a.experiment == "mqar" else shakespeare_specs(a)
        if a.only:
            specs = [s for s in specs if any(t in s["name"] for t in a.only.split(","))]
        run_all(specs, a.runs, a.jobs, a.device, not a.no_progress)
    report(a.runs, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
