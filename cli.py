"""The ``steer`` command line (typer). Installed as ``steer.cli`` (console script ``steer``).

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

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Inference-time safety steering for Hugging Face language models.")


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
    kw = dict(vector=vec, layers=layer_list, mode=mode, scope=scope, max_new_tokens=max_new_tokens,
              chat=not no_chat, prefill=prefill, do_sample=sample, temperature=temperature, top_p=top_p,
              seed=seed, batch_size=batch_size)
    if vec is None:
        rows = [{"prompt": p, "alpha": None, "completion": c}
                for p, c in zip(texts, sm.generate(texts, **kw))]
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
    return [parse_layers(group.replace("+", ","), num_layers) for group in text.split(",") if group.strip()] \
        if "+" in text else [[i] for i in parse_layers(text, num_layers)]


def print_eval(report: dict, title: str = "") -> None:
    from rich.console import Console
    from rich.table import Table

    configs = report["configs"]
    keys = list(dict.fromkeys(k for c in configs for k in c["metrics"]))
    table = Table(title=title or None)
    table.add_column("layers")
    table.add_column("α", justify="right")
    for k in keys:
        table.add_column(k, justify="right")
    for c in configs:
        cells = []
        for k in keys:
            m = c["metrics"].get(k)
            cells.append("-" if m is None else str(m))
        table.add_row(",".join(map(str, c["layers"] or [])) or "-", "-" if c["alpha"] is None else f"{c['alpha']:g}",
                      *cells)
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
    max_new_tokens: int = typer.Option(24, "--max-new-tokens", min=1),
    no_chat: bool = typer.Option(False, "--no-chat"),
    device: Optional[str] = typer.Option(None, "--device"),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG of the metrics across α."),
):
    """Measure refusal, over-refusal, capability, jailbreak/prefill robustness and injection success."""
    from steer.config import parse_alphas
    from steer.judge import DEFAULT_MARKERS, RefusalJudge
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
    judge = RefusalJudge(markers=tuple(refusal_marker) if replace_markers else DEFAULT_MARKERS, extra=() if
                         replace_markers else tuple(refusal_marker))

    from steer import SteeredModel, SteeringVector
    from steer.evaluate import evaluate, report_to_json

    vec = SteeringVector.load(vector) if vector is not None else None
    sm = SteeredModel.from_pretrained(model, device=device)
    report = evaluate(sm, vector=vec, alphas=alpha_list, layer_sets=_layer_sets(layers, sm.num_layers), mode=mode,
                      scope=scope, suite="files" if files else "builtin", harmful=hp, harmless=sp,
                      jailbreaks=jailbreaks, prefill=prefill, judge=judge, max_new_tokens=max_new_tokens,
                      chat=not no_chat, progress=not as_json)
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


family_app = typer.Typer(no_args_is_help=True, help="The built-in aligned/unaligned model family.")
app.add_typer(family_app, name="family")


@family_app.command("build")
@user_errors
def family_build(force: bool = typer.Option(False, "--force", help="Retrain even if cached.")):
    """Train (or find cached) the built-in family: base, aligned, aligned-dpo, compromised."""
    from steer.family import build_family

    paths = build_family(force=force, progress=True)
    for name, path in paths.items():
        typer.echo(f"builtin:{name}\t{path}")


def main():  # console-script entry point
    app()


if __name__ == "__main__":
    main()
