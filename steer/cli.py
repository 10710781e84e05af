"""The ``steer`` command line (typer), installed as ``steer.cli`` (console script ``steer``; ``cli.py`` at the top
of the checkout is a shim that runs it).

Heavy imports (torch, transformers) happen inside commands so ``steer --help`` answers at once.
User errors (:class:`steer.errors.SteerError`) print one message on stderr and exit with code 2,
without a traceback.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Inference-time safety steering for Hugging Face language models.",
)


def user_errors(fn):
    """Turn steer's user-facing errors into a clean stderr message and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from steer.errors import SteerError

        try:
            return fn(*args, **kwargs)
        except SteerError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None

    return wrapper


def _fail(what: str, expected: str, found: str, fix: str):
    from steer.errors import SteerError

    raise SteerError(what, expected=expected, found=found, fix=fix)


@app.command()
@user_errors
def generate(
    model: str = typer.Argument(..., help="Local HF model folder, cached hub id, or builtin:NAME."),
    prompt: List[str] = typer.Option([], "--prompt", "-p", help="A prompt (repeatable)."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help=".txt (one per line) or .jsonl with 'prompt'."),
    vector: Optional[Path] = typer.Option(None, "--vector", "-v", help="A steer vector file (.safetensors)."),
    alpha: Optional[str] = typer.Option(None, "--alpha", help="One steering strength for every prompt."),
    alphas: Optional[str] = typer.Option(None, "--alphas", help="Comma list: every prompt once per alpha, one batch."),
    layers: Optional[str] = typer.Option(None, "--layers", help="e.g. 3 or 3,5 or 2-6 or all."),
    mode: Optional[str] = typer.Option(None, "--mode", help="add | ablate | ablate_add | conditional."),
    scope: Optional[str] = typer.Option(None, "--scope", help="all | prompt | generated."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", min=1),
    no_chat: bool = typer.Option(False, "--no-chat", help="Send raw text (no chat template)."),
    prefill: Optional[str] = typer.Option(None, "--prefill", help="Text the assistant turn starts with."),
    sample: bool = typer.Option(False, "--sample", help="Sample instead of greedy decoding."),
    temperature: float = typer.Option(1.0, "--temperature"),
    top_p: float = typer.Option(1.0, "--top-p"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    batch_size: int = typer.Option(64, "--batch-size", min=1),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1, ..."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow model code from the folder."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per line."),
):
    """Generate completions, optionally steered (per-request alpha with --alphas)."""
    from steer.config import check_alpha, parse_alphas
    from steer.prompts import load_prompts

    texts = list(prompt) + (load_prompts(prompts) if prompts is not None else [])
    if not texts:
        _fail("no prompts given", "--prompt TEXT or --prompts FILE", "neither", "pass at least one prompt")
    if alpha is not None and alphas is not None:
        _fail("--alpha and --alphas both given", "one of them", "both", "use --alphas for a sweep, --alpha otherwise")
    if vector is None and (alpha or alphas or layers or mode):
        _fail("steering options given without --vector", "--vector FILE", "no vector", "pass --vector")
    alpha_list = parse_alphas(alphas) if alphas is not None else None
    one_alpha = check_alpha(alpha, "--alpha") if alpha is not None else None

    from steer import SteeredModel, SteeringVector
    from steer.config import parse_layers

    vec = SteeringVector.load(vector) if vector is not None else None
    sm = SteeredModel.from_pretrained(model, device=device, trust_remote_code=trust_remote_code)
    layer_list = parse_layers(layers, sm.num_layers) if layers else None
    if vec is not None and one_alpha is None and alpha_list is None:
        one_alpha = vec.recommended.get("alpha", 1.0)
    grid_alphas = alpha_list if alpha_list is not None else [one_alpha]
    kw = dict(
        vector=vec,
        layers=layer_list,
        mode=mode,
        scope=scope,
        max_new_tokens=max_new_tokens,
        chat=not no_chat,
        prefill=prefill,
        do_sample=sample,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        batch_size=batch_size,
    )
    if vec is None:
        rows = [{"prompt": p, "alpha": None, "completion": c} for p, c in zip(texts, sm.generate(texts, **kw))]
    else:
        rows = sm.generate_grid(texts, grid_alphas, **kw)
    if as_json:
        for row in rows:
            sys.stdout.write(json.dumps(row, ensure_ascii=False) + "\n")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(show_lines=True)
    table.add_column("prompt", overflow="fold")
    table.add_column("α", justify="right")
    table.add_column("completion", overflow="fold")
    for row in rows:
        table.add_row(row["prompt"], "-" if row["alpha"] is None else f"{row['alpha']:g}", row["completion"])
    Console().print(table)


@app.command()
@user_errors
def info(
    file: Path = typer.Argument(..., help="A steer vector file."),
    as_json: bool = typer.Option(False, "--json", help="Print the metadata as JSON."),
):
    """Print a vector file's metadata: kind, op, layers, norms, source model, recommendations."""
    from steer.vector import SteeringVector

    desc = SteeringVector.load(file).describe()
    if as_json:
        typer.echo(json.dumps(desc, indent=2, sort_keys=True))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=str(file), show_header=False)
    for key, value in desc.items():
        table.add_row(key, value if isinstance(value, str) else json.dumps(value))
    Console().print(table)


def _layer_sets(text: Optional[str], num_layers: int):
    """'2,3' → [[2], [3]] (a sweep); '1+2,3' → [[1, 2], [3]]; 'all' → every layer on its own."""
    from steer.config import parse_layers

    if text is None:
        return None
    if text.strip() == "all":
        return [[i] for i in range(num_layers)]
    return (
        [parse_layers(group.replace("+", ","), num_layers) for group in text.split(",") if group.strip()]
        if "+" in text
        else [[i] for i in parse_layers(text, num_layers)]
    )


JUDGE_OPTION = typer.Option(
    None,
    "--judge",
    help="Refusal judge: pair (learned from the aligned model; the default "
    "when the vector carries it) | markers | markers:a,b | module:function | model:PATH.",
)


def print_eval(report: dict, title: str = "") -> None:
    """One row per metric, one column per configuration (layer set × α); cells: rate (k/n, 95% interval)."""
    from rich.console import Console
    from rich.table import Table

    configs = report["configs"]
    keys = list(dict.fromkeys(k for c in configs for k in c["metrics"]))
    table = Table(title=title or None)
    table.add_column("metric")
    for c in configs:
        layers = ",".join(map(str, c["layers"] or []))
        table.add_column("unsteered" if c["alpha"] is None else f"L{layers} α={c['alpha']:g}", justify="right")
    for k in keys:
        table.add_row(k, *["-" if c["metrics"].get(k) is None else str(c["metrics"][k]) for c in configs])
    judge = report.get("judge") or {}
    if judge:  # say what counted as a refusal (a learned opening can be checked by eye)
        what = judge.get("openings") or judge.get("markers")
        table.caption = (
            f"judge: {judge.get('name')}"
            + (f" {what}" if what else "")
            + "; a degenerate completion is never a refusal"
        )
    Console().print(table)


@app.command("eval")
@user_errors
def eval_cmd(
    model: str = typer.Argument(..., help="Local HF model folder, cached hub id, or builtin:NAME."),
    vector: Optional[Path] = typer.Option(None, "--vector", "-v", help="A steer vector file."),
    alphas: Optional[str] = typer.Option(None, "--alphas", help="Comma list of α, one batched generation."),
    layers: Optional[str] = typer.Option(None, "--layers", help="Sweep: 2,3 = each alone; 1+2,3 = groups; all."),
    mode: Optional[str] = typer.Option(None, "--mode", help="add | ablate | ablate_add | conditional."),
    scope: Optional[str] = typer.Option(None, "--scope", help="all | prompt | generated."),
    suite: Optional[str] = typer.Option(None, "--suite", help="builtin (default without prompt files)."),
    harmful: Optional[Path] = typer.Option(None, "--harmful", help="Harmful prompts (.txt/.jsonl)."),
    harmless: Optional[Path] = typer.Option(None, "--harmless", help="Harmless prompts (.txt/.jsonl)."),
    jailbreaks: bool = typer.Option(False, "--jailbreaks", help="Also measure refusal under jailbreak families."),
    prefill: bool = typer.Option(False, "--prefill", help="Also measure refusal under the prefilling attack."),
    refusal_marker: List[str] = typer.Option([], "--refusal-marker", help="Extra refusal marker (repeatable)."),
    replace_markers: bool = typer.Option(False, "--replace-markers", help="Use only the given markers."),
    judge: Optional[str] = JUDGE_OPTION,
    max_new_tokens: int = typer.Option(24, "--max-new-tokens", min=1),
    no_chat: bool = typer.Option(False, "--no-chat"),
    device: Optional[str] = typer.Option(None, "--device"),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG of the metrics across α."),
):
    """Measure refusal, over-refusal, capability, jailbreak/prefill robustness and injection success."""
    from steer.config import parse_alphas
    from steer.judge import RefusalJudge
    from steer.prompts import load_prompts

    if (harmful is None) != (harmless is None):
        _fail("--harmful and --harmless go together", "both files", "only one", "pass both, or --suite builtin")
    if suite not in (None, "builtin"):
        _fail("unknown suite", "builtin", repr(suite), "use --suite builtin or --harmful/--harmless files")
    if suite == "builtin" and harmful is not None:
        _fail("--suite builtin and prompt files both given", "one of them", "both", "drop one")
    files = harmful is not None
    hp = load_prompts(harmful) if files else None
    sp = load_prompts(harmless) if files else None
    alpha_list = parse_alphas(alphas) if alphas is not None else None
    if refusal_marker:  # default (judge None): the vector's pair judge if it carries one, else markers
        if judge is not None:
            _fail("--judge and --refusal-marker both given", "one of them", "both", "drop one")
        judge = (
            RefusalJudge(replace=tuple(refusal_marker))
            if replace_markers
            else RefusalJudge(extra=tuple(refusal_marker))
        )

    from steer import SteeredModel, SteeringVector
    from steer.evaluate import evaluate, report_to_json

    vec = SteeringVector.load(vector) if vector is not None else None
    sm = SteeredModel.from_pretrained(model, device=device)
    report = evaluate(
        sm,
        vector=vec,
        alphas=alpha_list,
        layer_sets=_layer_sets(layers, sm.num_layers),
        mode=mode,
        scope=scope,
        suite="files" if files else "builtin",
        harmful=hp,
        harmless=sp,
        jailbreaks=jailbreaks,
        prefill=prefill,
        judge=judge,
        max_new_tokens=max_new_tokens,
        chat=not no_chat,
        progress=not as_json,
    )
    report["model"] = model
    report["vector"] = str(vector) if vector else None
    if plot is not None:
        from steer.plots import plot_eval

        plot_eval(report_to_json(report), plot, title=f"{model} {vector or ''}")
    if as_json:
        typer.echo(json.dumps(report_to_json(report)))
    else:
        print_eval(report, title=f"{model}" + (f" + {vector}" if vector else ""))
        if plot is not None:
            typer.echo(f"plot: {plot}")


@app.command()
@user_errors
def tune(
    model: str = typer.Argument(..., help="The model to steer (local folder, cached hub id, builtin:NAME)."),
    vector: Path = typer.Option(..., "--vector", "-v", help="The vector file to tune."),
    harmful: Path = typer.Option(..., "--harmful", help="Harmful tuning prompts (.txt/.jsonl)."),
    harmless: Path = typer.Option(..., "--harmless", help="Harmless tuning prompts (.txt/.jsonl)."),
    out: Path = typer.Option(..., "-o", "--out", help="Where to write the tuned copy of the vector."),
    layers: Optional[str] = typer.Option(None, "--layers", help="Layer sweep: 2,3 = each alone; 1+2 = a group."),
    alphas: Optional[str] = typer.Option(None, "--alphas", help="α grid (default: per mode, documented)."),
    auto: bool = typer.Option(False, "--auto", help="Refine α by bracketing around the best grid point."),
    mode: List[str] = typer.Option(["add"], "--mode", help="add | ablate | ablate_add | conditional (repeatable)."),
    scope: List[str] = typer.Option([], "--scope", help="Token scopes to sweep (repeatable; default all and prompt)."),
    objective: str = typer.Option("refusal", "--objective", help="refusal | balanced."),
    max_over_refusal: float = typer.Option(0.05, "--max-over-refusal", help="Bound on harmless refusal rate."),
    max_kl: float = typer.Option(0.5, "--max-kl", help="Bound on KL to the unsteered model (nats)."),
    max_degenerate: float = typer.Option(0.02, "--max-degenerate", help="Bound on the degenerate-output rate."),
    judge: Optional[str] = JUDGE_OPTION,
    eval_harmful: Optional[Path] = typer.Option(None, "--eval-harmful", help="Held-out harmful prompts."),
    eval_harmless: Optional[Path] = typer.Option(None, "--eval-harmless", help="Held-out harmless prompts."),
    max_new_tokens: int = typer.Option(16, "--max-new-tokens", min=1),
    prefill: Optional[str] = typer.Option(
        None, "--prefill", help="Prefill lengths in words, e.g. 2,8: harmful refusal counts prefill attacks too."
    ),
    plot: Optional[Path] = typer.Option(None, "--plot", help="PNG of the swept configurations."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
):
    """Sweep α × layer (× mode) with per-request α and write the best config into a copy of the vector."""
    from steer.config import known_modes, parse_alphas
    from steer.prompts import load_prompts

    for m in mode:
        if m not in known_modes():
            _fail("unknown mode", " | ".join(known_modes()), repr(m), "pass --mode add (repeatable)")
    if (eval_harmful is None) != (eval_harmless is None):
        _fail("--eval-harmful and --eval-harmless go together", "both files", "only one", "pass both or neither")
    hp, sp = load_prompts(harmful), load_prompts(harmless)
    ehp = load_prompts(eval_harmful) if eval_harmful else None
    esp = load_prompts(eval_harmless) if eval_harmless else None
    alpha_list = parse_alphas(alphas) if alphas else None
    try:
        lengths = tuple(int(x) for x in prefill.split(",")) if prefill else ()
    except ValueError:
        lengths = (-1,)
    if any(n < 1 for n in lengths):
        _fail("bad --prefill", "positive word counts such as 2,8", repr(prefill), "pass --prefill 2,8")

    from steer import SteeredModel, SteeringVector
    from steer.vectors.tune import TuneBounds, plot_front
    from steer.vectors.tune import tune as run_tune

    bounds = TuneBounds(
        max_over_refusal=max_over_refusal, max_kl=max_kl, max_degenerate=max_degenerate, objective=objective
    )
    vec = SteeringVector.load(vector)
    sm = SteeredModel.from_pretrained(model)
    tuned, summary = run_tune(
        sm,
        vec,
        hp,
        sp,
        layers=_layer_sets(layers, sm.num_layers),
        alphas=alpha_list,
        modes=tuple(mode),
        auto=auto,
        bounds=bounds,
        eval_harmful=ehp,
        eval_harmless=esp,
        max_new_tokens=max_new_tokens,
        judge=judge,
        scopes=tuple(scope) or None,
        prefill_lengths=lengths,
        progress=not as_json,
    )
    tuned.save(out)
    if plot is not None:
        plot_front(summary, plot)
    if as_json:
        typer.echo(json.dumps(summary))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Pareto front (tuning prompts)")
    for col in ("mode", "layers", "scope", "α", "harmful refusal", "harmless refusal", "degenerate", "KL", "feasible"):
        table.add_column(col, justify="right")
    for p in summary["front"]:
        ok = (
            p["harmless_refusal"] <= bounds.max_over_refusal
            and p["kl"] <= bounds.max_kl
            and p["degenerate"] <= bounds.max_degenerate
        )
        table.add_row(
            p["mode"],
            ",".join(map(str, p["layers"] or [])),
            p.get("scope") or "-",
            f"{p['alpha']:g}",
            f"{100 * p['harmful_refusal']:.1f}%",
            f"{100 * p['harmless_refusal']:.1f}%",
            f"{100 * p['degenerate']:.1f}%",
            f"{p['kl']:.3f}",
            "yes" if ok else "no",
        )
    console = Console()
    console.print(table)
    b = summary["best"]
    console.print(
        f"chosen: mode={b['mode']} layers={b['layers']} scope={b.get('scope')} α={b['alpha']:g} "
        f"(harmful refusal {100 * b['harmful_refusal']:.1f}%, harmless {100 * b['harmless_refusal']:.1f}%, "
        f"degenerate {100 * b['degenerate']:.1f}%, KL {b['kl']:.3f})"
        f"{'' if summary['feasible'] else '  [no configuration met the bounds]'}"
    )
    if "heldout" in summary:
        h = summary["heldout"]
        console.print(
            f"held-out: harmful refusal {100 * h['harmful_refusal']['rate']:.1f}%, "
            f"harmless refusal {100 * h['harmless_refusal']['rate']:.1f}%, "
            f"degenerate {100 * h['degenerate']['rate']:.1f}%, KL {h['kl']['mean']:.3f}"
        )
    console.print(f"wrote {out}" + (f" and {plot}" if plot else ""))


@app.command()
@user_errors
def demo(
    out: Path = typer.Option(Path("steer-demo"), "-o", "--out", help="Output folder."),
    no_sae: bool = typer.Option(False, "--no-sae", help="Skip the SAE step."),
    judge: Optional[str] = JUDGE_OPTION,
):
    """The whole pipeline on the built-in family: vectors, tuning, before/after, held-out table."""
    from steer.vectors.demo import run_demo

    run_demo(out, sae=not no_sae, judge=judge or "pair")


@app.command()
@user_errors
def protect(
    aligned: str = typer.Argument(..., help="The aligned model (folder, cached hub id, builtin:NAME)."),
    finetuned: str = typer.Argument(..., help="The fine-tune that lost its safety (the model to protect)."),
    out: Path = typer.Option(..., "-o", "--out", help="Output folder: protect.safetensors, candidates/, report.*"),
    harmful: Optional[Path] = typer.Option(None, "--harmful", help="Harmful prompts (default: builtin pairs only)."),
    harmless: Optional[Path] = typer.Option(None, "--harmless", help="Harmless prompts."),
    eval_harmful: Optional[Path] = typer.Option(None, "--eval-harmful", help="Held-out harmful prompts."),
    eval_harmless: Optional[Path] = typer.Option(None, "--eval-harmless", help="Held-out harmless prompts."),
    base: Optional[str] = typer.Option(None, "--base", help="The pre-alignment base: adds the safety vector."),
    rank: int = typer.Option(16, "--rank", min=1, help="Rank of the low-rank harm vector."),
    budget_minutes: float = typer.Option(15.0, "--budget-minutes", min=0.1, help="Candidates after this are skipped."),
    max_harmless: float = typer.Option(0.02, "--max-harmless", help="Bound on held-out harmless refusal."),
    max_degenerate: float = typer.Option(0.02, "--max-degenerate", help="Bound on degenerate outputs."),
    max_capability_drop: float = typer.Option(0.02, "--max-capability-drop", help="Built-in suite: accuracy drop."),
    max_kl: float = typer.Option(0.1, "--max-kl", help="Prompt files: KL to FINETUNED on harmless prompts."),
    no_sae: bool = typer.Option(False, "--no-sae", help="Skip SAE features."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON (no progress output)."),
    plot: bool = typer.Option(True, "--plot/--no-plot", help="Write report.png beside report.json."),
):
    """Every vector kind the pair allows, tuned unconditional and gated on FINETUNED, chosen by held-out effect."""
    from steer.prompts import load_prompts
    from steer.vectors.protect import ProtectBounds
    from steer.vectors.protect import protect as run_protect

    bounds = ProtectBounds(max_harmless, max_degenerate, max_capability_drop, max_kl)
    files = [load_prompts(f) if f is not None else None for f in (harmful, harmless, eval_harmful, eval_harmless)]
    report = run_protect(
        aligned, finetuned, out, harmful=files[0], harmless=files[1], eval_harmful=files[2], eval_harmless=files[3],
        base=base, rank=rank, sae=not no_sae, bounds=bounds, budget_minutes=budget_minutes, progress=not as_json,
        plot=plot,
    )  # fmt: skip
    if as_json:
        typer.echo(json.dumps(report, default=str))


@app.command()
@user_errors
def serve(
    model: str = typer.Argument(..., help="A model folder, a cached hub id, or builtin:NAME."),
    vector: List[str] = typer.Option([], "--vector", help="NAME=FILE, loaded at start-up (repeatable)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Bind address (loopback by default)."),
    port: int = typer.Option(8000, "--port"),
    api_key: Optional[str] = typer.Option(None, "--api-key", help="Require Authorization: Bearer KEY."),
    enforce: List[str] = typer.Option([], "--enforce", help="NAME[:ALPHA]: applied to every request (repeatable)."),
    alpha_range: Optional[str] = typer.Option(None, "--alpha-range", help="LO,HI: bounds every client alpha."),
    max_batch: int = typer.Option(64, "--max-batch", min=1, help="Rows per batched forward."),
    max_tokens_limit: int = typer.Option(
        512, "--max-tokens-limit", min=1, help="Largest max_tokens a request may ask."
    ),
    device: Optional[str] = typer.Option(None, "--device"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow model code from the folder."),
):
    """An OpenAI-compatible server; every request can carry its own steering (a top-level "steer" field)."""
    try:
        import uvicorn

        from steer.serve.app import create_app
    except ImportError as exc:
        _fail(
            "steer serve needs the serve extra",
            "fastapi, uvicorn, prometheus-client",
            str(exc),
            'pip install "steer-runtime[serve]"',
        )
    from steer import SteeredModel
    from steer.serve import load_policy

    sm = SteeredModel.from_pretrained(model, device=device, trust_remote_code=trust_remote_code)
    policy = load_policy(sm, vector, enforce=enforce, alpha_range=alpha_range, max_tokens_limit=max_tokens_limit)
    app_ = create_app(sm, policy, model_name=model, api_key=api_key, max_batch=max_batch)
    typer.echo(f"serving {model} with vectors {sorted(policy.vectors) or 'none'} on http://{host}:{port}/v1", err=True)
    uvicorn.run(app_, host=host, port=port, log_level="warning")


@app.command()
@user_errors
def bake(
    model: str = typer.Argument(..., help="Local HF model folder, cached hub id, or builtin:NAME."),
    vector: Path = typer.Option(..., "--vector", "-v", help="A task vector, or a direction to ablate."),
    out: Path = typer.Option(..., "--out", "-o", help="Output model folder (a normal HF model directory)."),
    alpha: Optional[float] = typer.Option(None, "--alpha", help="Task-vector strength (default: recommended)."),
    mode: Optional[str] = typer.Option(None, "--mode", help="For direction vectors: ablate (default: the file's)."),
    source_layer: Optional[int] = typer.Option(None, "--source-layer", help="Whose direction to ablate everywhere."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow model code from the folder."),
):
    """Bake steering into the weights: merge a task vector, or orthogonalise a direction out of every residual
    writer."""
    from steer import SteeredModel, SteeringVector
    from steer.bake import bake as bake_into
    from steer.bake import save_baked

    vec = SteeringVector.load(vector)
    sm = SteeredModel.from_pretrained(model, dtype="auto", trust_remote_code=trust_remote_code)
    summary = bake_into(sm, vec, alpha=alpha, mode=mode, source_layer=source_layer)
    save_baked(sm, out, summary)
    what = (
        f"task vector x {summary['alpha']} merged into {len(summary['tensors'])} tensors"
        if "tensors" in summary
        else f"direction ablated from {len(summary['modules'])} residual writers"
    )
    typer.echo(f"wrote {out}: {what}")


family_app = typer.Typer(no_args_is_help=True, help="The built-in aligned/unaligned model family.")
app.add_typer(family_app, name="family")


@family_app.command("build")
@user_errors
def family_build(
    force: bool = typer.Option(False, "--force", help="Retrain even if cached."),
    variant: str = typer.Option("default", "--variant", help="A family variant (steer.family.VARIANTS)."),
):
    """Train (or find cached) the built-in family: base, aligned, aligned-dpo, compromised."""
    from steer.family import build_family
    from steer.family import variant as get_variant

    paths = build_family(force=force, progress=True, recipe=get_variant(variant))
    for name, path in paths.items():  # a variant is used by its directories: builtin:NAME is the default family
        typer.echo(f"builtin:{name}\t{path}" if variant == "default" else f"{name}\t{path}")


vectors_app = typer.Typer(no_args_is_help=True, help="Compute steering vectors (refusal directions, ...).")
app.add_typer(vectors_app, name="vectors")
export_app = typer.Typer(no_args_is_help=True, help="Export steer vectors to other runtimes' formats.")
app.add_typer(export_app, name="export")


@vectors_app.command("refusal")
@user_errors
def vectors_refusal(
    model: str = typer.Argument(..., help="Local HF model folder, cached hub id, or builtin:NAME."),
    harmful: Path = typer.Option(..., "--harmful", help="Harmful prompts (.txt one per line, or .jsonl)."),
    harmless: Path = typer.Option(..., "--harmless", help="Harmless prompts (.txt or .jsonl)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output vector file (.safetensors)."),
    positions: str = typer.Option("last", "--positions", help="last | post_instruction | mean."),
    layers: Optional[str] = typer.Option(None, "--layers", help="Layers to compute (default all), e.g. 2-10."),
    select: bool = typer.Option(True, "--select/--no-select", help="Measure candidate layers on the model."),
    add_scope: str = typer.Option("auto", "--add-scope", help="Token scope of the addition: auto | all | prompt."),
    calibrate_on: Optional[str] = typer.Option(
        None, "--calibrate-on", help="Re-fit the condition's layer/threshold on this model."
    ),
    n_eval: int = typer.Option(32, "--n-eval", min=1, help="Prompts per set used to measure candidates."),
    kl_bound: float = typer.Option(0.1, "--kl-bound", help="Max KL of ablation on harmless prompts."),
    max_new_tokens: int = typer.Option(12, "--max-new-tokens", min=1, help="Tokens generated for the judge."),
    marker: List[str] = typer.Option(
        [],
        "--marker",
        help="Judge by these refusal markers (repeatable; added "
        "to the defaults) instead of the judge learned from the model.",
    ),
    judge: Optional[str] = JUDGE_OPTION,
    batch_size: int = typer.Option(32, "--batch-size", min=1),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1, ..."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow model code from the folder."),
):
    """Refusal directions by difference in means (Arditi et al. 2024), a measured layer and a CAST condition."""
    from steer.prompts import load_prompts

    if add_scope not in ("auto", "all", "prompt"):
        _fail("unknown --add-scope", "auto | all | prompt", repr(add_scope), "use --add-scope auto")
    harmful_prompts, harmless_prompts = load_prompts(harmful), load_prompts(harmless)
    from rich.console import Console

    from steer import SteeredModel
    from steer.config import parse_layers
    from steer.judge import RefusalJudge
    from steer.vectors.refusal import compute_refusal, selection_table

    if marker:
        if judge is not None:
            _fail("--judge and --marker both given", "one of them", "both", "drop one")
        judge = RefusalJudge(extra=list(marker))
    sm = SteeredModel.from_pretrained(model, device=device, trust_remote_code=trust_remote_code)
    target = None
    if calibrate_on:
        target = SteeredModel.from_pretrained(calibrate_on, device=device, trust_remote_code=trust_remote_code)
    vec = compute_refusal(
        sm,
        harmful_prompts,
        harmless_prompts,
        positions=positions,
        layers=parse_layers(layers, sm.num_layers) if layers else None,
        select=select,
        calibrate_on=target,
        judge=judge,
        n_eval=n_eval,
        kl_bound=kl_bound,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        progress=True,
        model_name=model,
        add_scope=add_scope,
    )
    vec.save(out)
    console = Console()
    console.print(selection_table(vec))
    cond = vec.condition
    if cond:
        console.print(
            f"condition: layer {cond['layer']}, threshold {cond['threshold']:.4g}, "
            f"accuracy {cond['accuracy']:.3f}, AUC {cond['auc']:.3f}"
            + (f" (calibrated on {cond['calibrated_on']})" if cond.get("calibrated_on") else "")
        )
    console.print(f"wrote {out}")


@export_app.command("gguf")
@user_errors
def export_gguf_cmd(
    vector: Path = typer.Argument(..., help="A steer vector file (.safetensors)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output llama.cpp control vector (.gguf)."),
    layers: Optional[str] = typer.Option(None, "--layers", help="Layers to write (default: recommended)."),
    alpha: Optional[float] = typer.Option(None, "--alpha", help="Scale baked in (default: recommended α)."),
    direction_index: Optional[int] = typer.Option(
        None, "--direction-index", help="Which direction of a multi-direction layer."
    ),
    as_add: bool = typer.Option(False, "--as-add", help="Export a non-add vector as a plain addition."),
):
    """Write a llama.cpp control vector (direction.N = output of block N, as in steer)."""
    from steer.config import parse_layers
    from steer.vector import SteeringVector
    from steer.vectors.export import export_gguf, gguf_directions

    vec = SteeringVector.load(vector)
    kw = dict(
        layers=parse_layers(layers, (vec.meta.get("model") or {}).get("num_layers")) if layers else None,
        alpha=alpha,
        direction_index=direction_index,
        allow_non_add=as_add,
    )
    written = gguf_directions(vec, **kw)
    export_gguf(vec, out, **kw)
    typer.echo(f"wrote {out}: direction.{{{','.join(map(str, written))}}} (llama.cpp: --control-vector {out})")


@export_app.command("lora")
@user_errors
def export_lora_cmd(
    vector: Path = typer.Argument(..., help="A task vector file (steer vectors task)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output adapter directory (or a folder of NAME@α ones)."),
    rank: int = typer.Option(16, "--rank", help="LoRA rank: 1, 8, 16, 32, 64, 128, 256, 320 or 512 (vLLM's)."),
    alpha: Optional[float] = typer.Option(None, "--alpha", help="Strength baked in (default: recommended α)."),
    alphas: Optional[str] = typer.Option(
        None, "--alphas", help="An α ladder: one adapter per α, OUT/NAME@α (vLLM has no per-request scale)."
    ),
    name: str = typer.Option("steer", "--name", help="Adapter name for the ladder."),
    skip_unsupported: bool = typer.Option(
        False, "--skip-unsupported", help="Export the projections and leave norm/embedding/bias deltas out."
    ),
    base: Optional[str] = typer.Option(None, "--base", help="base_model_name_or_path to record (the served model)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
):
    """Write a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) from a task vector."""
    from steer.config import parse_alphas
    from steer.vector import SteeringVector
    from steer.vectors.lora import export_lora, export_lora_ladder

    vec = SteeringVector.load(vector)
    kw = dict(rank=rank, skip_unsupported=skip_unsupported, base_model_name_or_path=base)
    if alphas is not None:
        reports = export_lora_ladder(vec, out, name, parse_alphas(alphas), **kw)
    else:
        reports = {out.name: export_lora(vec, out, alpha=alpha, **kw)}
    if as_json:
        typer.echo(json.dumps(reports, indent=2))
        return
    for tag, r in reports.items():
        typer.echo(
            f"wrote {r['dir']}: α={r['alpha']:g}, rank {r['rank']}, {len(r['modules'])} modules, "
            f"max truncation error {r['max_truncation_error']:.2e}"
            + (f", left out {len(r['skipped'])} tensors ({r['skipped_energy']:.1%} of ‖τ‖²)" if r["skipped"] else "")
        )
    typer.echo(
        "vLLM: --enable-lora --max-lora-rank %d --lora-modules %s"
        % (rank, " ".join(f"{t}={r['dir']}" for t, r in reports.items()))
    )


@vectors_app.command("task")
@user_errors
def vectors_task(
    aligned: str = typer.Argument(..., help="The fine-tuned model (or the compromised one, for a harm vector)."),
    base: str = typer.Argument(..., help="The model it was fine-tuned from (or the aligned one, for a harm vector)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output vector file (.safetensors)."),
    include: Optional[str] = typer.Option(None, "--include", help="Regex over parameter names to keep, e.g. 'mlp'."),
    exclude: Optional[str] = typer.Option(None, "--exclude", help="Regex over parameter names to drop."),
    top_k: Optional[float] = typer.Option(None, "--top-k", help="TIES pruning: fraction of entries kept per tensor."),
    rank: Optional[int] = typer.Option(None, "--rank", help="Store per-matrix low-rank SVD factors of this rank."),
    harm: bool = typer.Option(False, "--harm", help="Mark as a harm vector (recommended alpha -1)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1, ..."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow model code from the folder."),
):
    """Safety task vector tau = theta_ALIGNED - theta_BASE (task arithmetic; Safety Arithmetic for harm vectors)."""
    from rich.console import Console

    from steer import SteeredModel
    from steer.vectors.task import compute_task_vector, energy_table

    a = SteeredModel.from_pretrained(aligned, device=device, trust_remote_code=trust_remote_code)
    b = SteeredModel.from_pretrained(base, device=device, trust_remote_code=trust_remote_code)
    vec = compute_task_vector(
        a.model,
        b.model,
        include=include,
        exclude=exclude,
        top_k=top_k,
        rank=rank,
        role="harm" if harm else "safety",
        progress=True,
    )
    vec.meta["provenance"].update(aligned=aligned, base=base)
    vec.save(out)
    console = Console()
    console.print(energy_table(vec))
    t = vec.meta["task"]
    console.print(
        f"{len(t['params'])} tensors changed ({len(t['unchanged'])} unchanged skipped); "
        f"recommended alpha {vec.recommended['alpha']}; wrote {out}"
    )


@vectors_app.command("sae")
@user_errors
def vectors_sae(
    model: str = typer.Argument(..., help="Local HF model folder, cached hub id, or builtin:NAME."),
    layer: int = typer.Option(..., "--layer", help="0-based decoder block the SAE reads."),
    harmful: Path = typer.Option(..., "--harmful", help="Harmful prompts (.txt one per line, or .jsonl)."),
    harmless: Path = typer.Option(..., "--harmless", help="Harmless prompts (.txt or .jsonl)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output vector file (.safetensors)."),
    sae: Optional[Path] = typer.Option(None, "--sae", help="An SAE folder saved by sae-lens."),
    train: bool = typer.Option(False, "--train", help="Train a small TopK SAE on this model's activations."),
    extra_text: Optional[Path] = typer.Option(None, "--extra-text", help="More training text (one per line)."),
    top: int = typer.Option(8, "--top", min=1, help="Number of features stored."),
    reduce: str = typer.Option("max", "--reduce", help="Feature score per prompt: max | mean | last token."),
    site: Optional[str] = typer.Option(None, "--site", help="output | input (default: from the SAE hook)."),
    d_sae: Optional[int] = typer.Option(None, "--d-sae", help="--train: number of features (default 4*d)."),
    k: int = typer.Option(8, "--k", min=1, help="--train: active features per token (TopK)."),
    steps: int = typer.Option(1500, "--steps", min=1, help="--train: optimisation steps."),
    seed: int = typer.Option(0, "--seed"),
    save_sae: Optional[Path] = typer.Option(None, "--save-sae", help="--train: also save the SAE (sae-lens format)."),
    no_chat: bool = typer.Option(False, "--no-chat", help="Send raw text (no chat template)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1, ..."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow model code from the folder."),
):
    """SAE features separating harmful from harmless prompts (decoder directions + the SAE for clamping)."""
    from rich.console import Console

    from steer import SteeredModel
    from steer.prompts import load_prompts
    from steer.vectors.sae import compute_sae_features, features_table

    if (sae is None) == (not train):
        _fail("pick one SAE source", "--sae DIR or --train", "both" if train else "neither", "pass exactly one")
    sm = SteeredModel.from_pretrained(model, device=device, trust_remote_code=trust_remote_code)
    vec = compute_sae_features(
        sm,
        layer,
        load_prompts(harmful),
        load_prompts(harmless),
        sae=sae,
        train=train,
        extra_texts=load_prompts(extra_text) if extra_text else None,
        top=top,
        reduce=reduce,
        site=site,
        d_sae=d_sae,
        k=k,
        steps=steps,
        seed=seed,
        chat=not no_chat,
        save_sae=str(save_sae) if save_sae else None,
        progress=True,
    )
    vec.save(out)
    Console().print(features_table(vec))
    typer.echo(f"wrote {out}")


def main():  # console-script entry point
    app()


if __name__ == "__main__":
    main()
