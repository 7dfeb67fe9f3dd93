"""Causal MiTA against full attention, causal MoBA and a local window: MQAR recall and shakespeare-char.

Regenerates ``results/causal.md`` and ``results/causal.json`` (the tables of ``docs/causal.md``). Each
run trains a small :class:`mita.models.GPT` with a short self-contained loop: AdamW, warm-up then
cosine decay, gradient clip 1, cross-entropy on the target positions only. The loop uses the library's
datasets and model, but it fixes the step count and batch size, which the small CPU budget needs, and
it applies the output head only where there is a loss (MQAR's answers). Runs are cached as JSON under
``--runs``, so an interrupted run resumes where it stopped; ``--jobs`` trains several at once, one
torch thread each.

    python results/causal.py mqar --jobs 2                 # the MQAR table (accuracy, routing recall)
    python results/causal.py shakespeare --jobs 2          # the shakespeare-char table and a sample
    python results/causal.py report                        # rewrite the tables from the cached runs

MQAR at N >= 512 learns on a CPU budget only with a curriculum (``--curriculum``: short stages with few
pairs first, one learning-rate schedule over all stages), and ``--full-first S`` adds MiTA runs that are
the full-attention run for their first S steps and MiTA after (docs/causal.md has the commands).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
IGNORE = -100


# ---- one run ------------------------------------------------------------------------------------------


def _batches(ds, batch_size: int, seed: int):
    """Endless shuffled batches of ``(x, y)`` from a map-style dataset (reshuffled every pass)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        for idx in torch.randperm(len(ds), generator=g).split(batch_size):
            if len(idx) < batch_size:
                break
            xs, ys = zip(*(ds[int(i)] for i in idx))
            yield torch.stack(xs), torch.stack(ys)


def _loss(model, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over the target positions, correct argmax count, target count."""
    h = model.features(x)
    sel = y != IGNORE
    logits = model.head(h[sel])  # [targets, V]: the head only where there is a loss
    tgt = y[sel]
    return F.cross_entropy(logits.float(), tgt), (logits.argmax(-1) == tgt).sum(), sel.sum()


@torch.no_grad()
def evaluate_lm(model, ds, batch_size: int) -> dict[str, float]:
    """Token-weighted loss and accuracy over the target positions of ``ds``."""
    model.eval()
    loss = correct = count = 0.0
    for start in range(0, len(ds), batch_size):
        xs, ys = zip(*(ds[i] for i in range(start, min(start + batch_size, len(ds)))))
        x, y = torch.stack(xs), torch.stack(ys)
        lo, c, n = _loss(model, x, y)
        loss += float(lo) * int(n)
        correct += int(c)
        count += int(n)
    model.train()
    return {"loss": loss / count, "accuracy": correct / count, "targets": int(count)}


@torch.no_grad()
def mqar_recall(model, ds, n_examples: int = 64) -> list[dict[str, Any]]:
    """Per-layer routing recall (:func:`mita.train.recall.routing_recall`) on ``n_examples`` examples."""
    from mita.train.recall import needed_positions, routing_recall

    xs, ys = zip(*(ds[i] for i in range(min(n_examples, len(ds)))))
    x, y = torch.stack(xs), torch.stack(ys)
    mixers = [blk.attn.mixer for blk in model.blocks]
    for m in mixers:
        m.record_routing = True
    model.eval()
    model(x)
    out = []
    bi, qi, need = needed_positions(x, y)
    for layer, m in enumerate(mixers):
        out.append({"layer": layer, **routing_recall(m.last_routing, bi, qi, need)})
        m.record_routing, m.last_routing = False, None
    return out


@torch.no_grad()
def mqar_sweep(model, ds, spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Accuracy and routing recall of the trained model at other MiTA settings, at inference only.

    A MiTA model is re-run with each ``(topk, block_size)`` of ``spec["sweep_grid"]``; a model trained with
    another kind has its mixers swapped for MiTA's (both horizons), keeping every weight.
    """
    from mita.nn.causal import MiTACausal

    rows = []
    blocks = [blk.attn for blk in model.blocks]
    trained = [a.mixer for a in blocks]
    horizons = [trained[0].landmark_horizon] if spec["attention"] == "mita" else ["prefix", "frozen"]
    for horizon in horizons:
        for k, b in spec["sweep_grid"]:
            for a in blocks:
                a.mixer = MiTACausal(block_size=b, topk=k, landmark_horizon=horizon)
            ev = evaluate_lm(model, ds, spec["eval_batch_size"])
            rows.append(
                {"horizon": horizon, "topk": k, "block_size": b, **ev, "recall": mqar_recall(model, ds)}
            )
    for a, m in zip(blocks, trained):
        a.mixer = m
    return rows


def train_run(spec: dict[str, Any]) -> dict[str, Any]:
    """Train one model described by ``spec`` and return its record (see :func:`main` for the keys)."""
    from mita.data import build_dataset
    from mita.models import build_model

    torch.set_num_threads(spec.get("threads", 1))
    torch.manual_seed(spec["seed"])
    data = spec["data"]
    test = build_dataset(spec["task"], "test", seed=0, size=spec["test_size"], **data)
    info = test.info
    model = build_model(
        "gpt", vocab_size=info.vocab_size, max_len=info.seq_len, attention=spec["attention"], **spec["model"]
    )
    decay = [p for n, p in model.named_parameters() if n not in model.no_weight_decay()]
    no_decay = [p for n, p in model.named_parameters() if n in model.no_weight_decay()]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": spec["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=spec["lr"], betas=(0.9, 0.95),
    )  # fmt: skip
    stages = _stages(spec)
    steps = sum(st["steps"] for st in stages)
    warm = max(1, int(0.05 * steps))

    def lr_at(s: int) -> float:
        if s < warm:
            return (s + 1) / warm
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    curve, seen, train_time, stage_end = [], 0, 0.0, 0
    evals = set(spec.get("eval_at", [])) | {steps}
    own = [blk.attn.mixer for blk in model.blocks]
    full_first = spec.get("full_first", 0)
    if full_first:  # full attention for the first steps (the same run as the full model's), then the kind
        from mita.nn.causal import FullCausal

        for blk in model.blocks:
            blk.attn.mixer = FullCausal()
    for step in range(1, steps + 1):
        if step == full_first + 1:
            for blk, mixer in zip(model.blocks, own):
                blk.attn.mixer = mixer
        if step > stage_end:  # the next stage of the curriculum (one stage without one)
            st = stages.pop(0)
            train = build_dataset(spec["task"], "train", seed=0, **st["data"])
            batches = _batches(train, st["batch_size"], spec["seed"] + len(stages))
            stage_end = step - 1 + st["steps"]
        x, y = next(batches)
        t0 = time.perf_counter()
        loss, _, _ = _loss(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        train_time += time.perf_counter() - t0
        seen += x.numel()
        if step % 50 == 0 and step not in evals:
            print(f"[{spec['name']}] step {step}/{steps} train {float(loss.detach()):.4f} "
                  f"({seen / train_time:.0f} tok/s)", flush=True)  # fmt: skip
        if step in evals:
            ev = evaluate_lm(model, test, spec["eval_batch_size"])
            curve.append({"step": step, "train_loss": float(loss.detach()), **ev})
            print(f"[{spec['name']}] step {step}/{steps} train {curve[-1]['train_loss']:.4f} "
                  f"test {ev['loss']:.4f} acc {ev['accuracy']:.4f} ({seen / train_time:.0f} tok/s)",
                  flush=True)  # fmt: skip
    rec = {
        **{k: v for k, v in spec.items() if k != "threads"},
        "final": curve[-1],
        "curve": curve,
        "train_seconds": train_time,
        "train_tokens_per_s": seen / train_time,
        "params": sum(p.numel() for p in model.parameters()),
    }
    if spec["task"] == "shakespeare-char":
        rec["final"]["bits_per_byte"] = curve[-1]["loss"] / math.log(2) / info.bytes_per_token
        prompt = torch.tensor([list(b"ROMEO:\n")])
        g = torch.Generator().manual_seed(0)
        out = model.eval().generate(prompt, 300, temperature=0.8, top_k=40, generator=g)
        rec["sample"] = bytes(out[0].tolist()).decode("utf-8", errors="replace")
    if spec["task"] == "mqar" and spec["attention"] == "mita":
        rec["recall"] = mqar_recall(model, test)
    if spec["task"] == "mqar" and spec.get("sweep_grid") and spec["attention"] in ("mita", "full"):
        rec["sweep"] = mqar_sweep(model, test, spec)
    if spec.get("save"):
        from mita.train.checkpoint import save_model_file

        kwargs = {k: v for k, v in model.config.items() if k != "name"}
        meta = {"task": spec["task"], "attention": spec["attention"], "model": "gpt", "model_kwargs": kwargs,
                "data_kwargs": data, "step": steps}  # fmt: skip
        save_model_file(spec["save"], model, meta)
    return rec


def _stages(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The training stages of ``spec``: its ``curriculum`` (data sizes, steps and batch of each stage, the
    last at ``spec["data"]``), or one stage of ``spec["steps"]`` at ``spec["data"]``."""
    if not spec.get("curriculum"):
        return [{"data": spec["data"], "steps": spec["steps"], "batch_size": spec["batch_size"]}]
    return [dict(st) for st in spec["curriculum"]]


def speed_run(
    task: str,
    data: dict[str, Any],
    models: dict[str, dict[str, Any]],
    kinds: dict[str, str],
    batch_size: int,
    rounds: int,
) -> dict[str, Any]:
    """Training-step throughput of each kind, interleaved round by round in one process on one batch
    (median of ``rounds``), so that every kind sees the same machine load; ratios are against ``full``."""
    import statistics

    from mita.data import build_dataset
    from mita.models import build_model

    torch.set_num_threads(1)
    ds = build_dataset(task, "train", seed=0, **data)
    x, y = next(_batches(ds, batch_size, 0))
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
            loss, _, _ = _loss(m, x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if r:
                times[kind].append(time.perf_counter() - t0)
    tok = {k: x.numel() / statistics.median(v) for k, v in times.items()}
    return {
        "task": task, "data": data, "batch_size": batch_size, "rounds": rounds, "models": models,
        "tokens_per_s": tok, "vs_full": {k: v / tok["full"] for k, v in tok.items()},
    }  # fmt: skip


def _run_cached(args: tuple[dict[str, Any], str]) -> dict[str, Any]:
    spec, runs = args
    path = Path(runs) / f"{spec['name']}.json"
    if path.is_file():
        return json.loads(path.read_text())
    rec = train_run(spec)
    from mita.io import write_json

    write_json(path, rec)
    return rec


def run_all(specs: list[dict[str, Any]], runs: str, jobs: int) -> list[dict[str, Any]]:
    """Every spec, ``jobs`` at a time (one torch thread each), cached in ``runs``."""
    work = [(s, runs) for s in specs]
    if jobs <= 1:
        return [_run_cached(w) for w in work]
    with mp.get_context("spawn").Pool(jobs) as pool:
        return pool.map(_run_cached, work, chunksize=1)


# ---- the experiments ----------------------------------------------------------------------------------


def _curriculum(a: argparse.Namespace) -> list[dict[str, Any]]:
    """The stages of ``--curriculum LEN:PAIRS:STEPS[:BATCH],...``, trained before the task itself; a stage
    without BATCH has ``--batch-size x --seq-len`` tokens per step. Empty without the flag. Zoology trains
    MQAR on a mixture of lengths, most of it short; stages do the same in order, with one learning-rate
    schedule over all of them and the task."""
    from mita.data import build_dataset

    if not a.curriculum:
        return []
    stages = []
    for item in a.curriculum.split(","):
        try:
            n, p, steps, *batch = (int(v) for v in item.split(":"))
        except ValueError:
            batch = [0, 0]
        if len(batch) > 1:
            raise ValueError(f"--curriculum: stage {item!r} is not LEN:PAIRS:STEPS[:BATCH] (integers)")
        batch = batch[0] if batch else max(1, a.batch_size * a.seq_len // n)
        if steps < 1 or batch < 1 or not 1 <= n <= a.seq_len:
            raise ValueError(
                f"--curriculum: stage {item!r} needs STEPS, BATCH >= 1 and 1 <= LEN <= --seq-len"
            )
        data = {"seq_len": n, "num_pairs": p, "vocab_size": a.vocab}
        build_dataset("mqar", "test", size=1, **data)  # the task's own checks, before any training
        stages.append({"data": data, "steps": steps, "batch_size": batch})
    return stages


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
            opts |= {"top_blocks": max(1, k // b)}
            tag = f"moba-s{max(1, k // b)}-b{b}"
        elif kind == "full":
            opts, tag = {}, "full"
        data = {"seq_len": a.seq_len, "num_pairs": pairs, "vocab_size": a.vocab}
        cur = pre + [{"data": data, "steps": a.steps, "batch_size": a.batch_size}] if pre else []
        name = f"mqar-n{a.seq_len}-p{pairs}-v{a.vocab}-{tag}-s{a.steps}{ctag}"
        name += (f"-seed{a.seed}" if a.seed else "") + (f"-full{full_first}" if full_first else "")
        save = {"save": str(Path(a.runs) / f"{name}.safetensors")} if getattr(a, "runs", None) else {}
        specs.append({
            "name": name, "task": "mqar", "curriculum": cur, "attention": kind, "data": data,
            "model": {**MQAR_MODEL, **opts}, "steps": a.steps, "batch_size": a.batch_size, "lr": a.lr,
            "weight_decay": 0.1, "seed": a.seed, "test_size": a.test_size, "eval_batch_size": 64,
            "eval_at": [total - a.steps + a.steps // 2], "pairs": pairs, "sweep_grid": grid,
        } | ({"full_first": full_first} if full_first else {}) | save)  # fmt: skip

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
        ("moba", {"block_size": 64, "top_blocks": 1}),
        ("window", {"block_size": 64}),
    ):
        tag = f"{kind}-{opts['landmark_horizon']}" if kind == "mita" else kind
        name = f"shakespeare-n{a.seq_len}-{tag}-s{a.steps}x{a.batch_size}-seed{a.seed}"
        specs.append({
            "name": name, "task": "shakespeare-char", "attention": kind,
            "data": {"seq_len": a.seq_len}, "model": {**SHAKESPEARE_MODEL, **opts}, "steps": a.steps,
            "batch_size": a.batch_size, "lr": a.lr, "weight_decay": 0.1, "seed": a.seed,
            "test_size": a.test_size, "eval_batch_size": 8, "eval_at": [a.steps // 2],
            "save": str(Path(a.runs) / f"{name}.safetensors"),
        })  # fmt: skip
    return specs


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


def report(runs: str, out: str) -> None:
    """Write ``out``.md and ``out``.json from every cached run in ``runs``."""
    from mita.io import write_json, write_text
    from mita.system import hardware

    recs = [json.loads(p.read_text()) for p in sorted(Path(runs).glob("*.json"))]
    recs = [r for r in recs if "task" in r and "final" in r]  # run records only
    lines = ["# Causal attention kinds: MQAR and shakespeare-char (CPU)", ""]
    hw = hardware(torch.device("cpu"))
    lines.append(
        f"Hardware: {hw.get('cpu', '?')}, torch {torch.__version__}; one thread per run, the machine "
        "shared with other jobs. Regenerate: `python results/causal.py report`."
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
    speed = Path(runs) / "speed.json"
    if speed.is_file():
        lines += ["", "## Training-step throughput, interleaved in one process (median of the rounds)", ""]
        lines.append(_row("task", "N", "batch", "attention", "tokens/s", "vs full (SDPA causal)"))
        lines.append("|---|---|---|---|---|---|")
        for row in json.loads(speed.read_text())["speed"]:
            for label, tok in row["tokens_per_s"].items():
                cells = (row["task"], row["data"]["seq_len"], row["batch_size"], label, f"{tok:.0f}")
                lines.append(_row(*cells, f"{row['vs_full'][label]:.2f}x"))
    write_text(Path(out).with_suffix(".md"), "\n".join(lines) + "\n")
    write_json(Path(out).with_suffix(".json"), {"hardware": hw, "torch": torch.__version__, "runs": recs})
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
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--runs", default="runs/results-causal")
    p.add_argument("--out", default=str(HERE / "causal"))
    a = p.parse_args(argv)
    Path(a.runs).mkdir(parents=True, exist_ok=True)
    if a.experiment == "speed":
        from mita.io import write_json

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
        run_all(specs, a.runs, a.jobs)
    report(a.runs, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
