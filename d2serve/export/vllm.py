"""Export a merged model for vLLM and prove vLLM loads it: merge, static checks, greedy parity with transformers.

vLLM cannot load D2-LoRA (or DoRA) adapters, so the export is a plain merged
HF checkpoint in the standard unfused per-projection layout (``q_proj``,
``k_proj``, ... as separate tensors), which vLLM loads untouched and can shard
across GPUs with ``--tensor-parallel-size`` like any HF checkpoint.

Parity protocol (the load check)
--------------------------------
* Prompts: the first ``n_prompts`` of :data:`PROMPTS`, each rendered with the
  checkpoint's own chat template (``add_generation_prompt=True``; raw text when
  it has none) and tokenized once; the *same token ids* go to both engines, so
  tokenization cannot differ.
* vLLM: ``vllm.LLM(model=out, dtype=<config dtype>, enforce_eager=True)`` in a
  subprocess (:mod:`d2serve.export._vllm_worker`), ``SamplingParams(temperature=0,
  max_tokens=max_new_tokens, logprobs=1, ignore_eos=True)``.
* transformers: the same checkpoint in the same dtype, ``generate`` greedy,
  EOS ignored, one prompt at a time (no padding), raw logits -> log_softmax.
* Pass: for every prompt the first ``n_exact`` generated tokens are identical
  and, on the common prefix (where both engines saw the same context), every
  chosen-token logprob differs by at most ``logprob_atol`` nats. Greedy paths
  may split later at a near-tie (two tokens whose logprobs differ by less than
  the kernels' rounding, legitimate in bfloat16 on different kernels); the
  first divergence of each prompt is reported with transformers' logprobs of
  both candidate tokens. A divergence inside the first ``n_exact`` tokens is
  accepted only as a near-tie: transformers rates vLLM's token within
  ``2 * logprob_atol`` nats of its own choice (if each engine's logprobs are
  within ``logprob_atol`` of the other's, no larger gap can flip the argmax);
  a real defect (wrong weights or tokenizer) gives whole-nat margins. See
  docs/vllm.md for the measured numbers that justify the defaults
  (:data:`LOGPROB_ATOL`, ``n_exact = 8``).
"""

from __future__ import annotations

import importlib.util
import json
import shlex
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from d2serve.checkpoint import (
    DTYPE_NAMES,
    CheckpointError,
    atomic_output_dir,
    prepare_output_dir,
    read_json,
    write_json,
)
from d2serve.childproc import WorkerError, child_env, run_json_worker
from d2serve.compare import (
    NonFiniteError,
    check_finite,
    content_token_count,
    special_token_ids,
)
from d2serve.console import in_steps, step
from d2serve.errors import CheckFailedError, InputError
from d2serve.export.checks import config_dtype, require_hf_checkpoint
from d2serve.export.manifest import EXPORT_MANIFEST as REPORT_NAME
from d2serve.extras import require
from d2serve.launch_argv import d2serve_cli_argv, vllm_cli_argv

DEFAULT_MAX_NEW_TOKENS = 32
DEFAULT_N_EXACT = 8
# The parity check must compare at least this many content tokens (not EOS/pad/special) per prompt on average.
DEFAULT_MIN_CONTENT_TOKENS_PER_PROMPT = 8
# max |vLLM - transformers| chosen-token logprob (nats) by dtype; bfloat16 measured (docs/vllm.md): max 0.21 on
# SmolLM2, i.e. one to two bfloat16 steps of a logit of magnitude 16-32 (step 0.125-0.25)
LOGPROB_ATOL = {"bfloat16": 0.3, "float16": 0.1, "float32": 0.02}
WORKER_TIMEOUT_S = 1200.0

PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis in one sentence.",
    "List three primary colors.",
    "What is 12 times 7?",
    "Translate 'good morning' into Spanish.",
    "Give me a tip for learning to code.",
    "Who wrote Romeo and Juliet?",
    "Describe a cat to someone who has never seen one.",
    "What is the boiling point of water in Celsius?",
    "Name a planet in our solar system and one fact about it.",
    "Why is the sky blue?",
    "Suggest a name for a friendly robot.",
    "What does a computer's CPU do?",
    "Write one sentence about autumn.",
    "How many days are in a leap year?",
)


class VllmLoadError(CheckFailedError):
    """vLLM failed to start on, or to generate from, the exported checkpoint (message holds its traceback/log tail)."""


@dataclass
class PromptParity:
    """Greedy comparison of one prompt.

    Attributes:
        prompt: the user message.
        n_prompt_tokens: prompt length in tokens (chat template applied).
        first_divergence: index (0-based, among generated tokens) of the first
            differing token, or None when all ``max_new_tokens`` agree.
        n_common: number of identical leading tokens.
        max_abs_logprob_diff: max |vLLM - transformers| chosen-token logprob
            over the common prefix, in nats.
        divergence: at ``first_divergence``: both tokens and transformers'
            logprobs of each (``hf_margin`` = hf logprob of its own token minus
            that of vLLM's token, nats; small means a near-tie); else None.
        near_tie: the divergence is a near-tie (``hf_margin <= 2 * logprob_atol``).
        vllm_text, hf_text: decoded generations.
        n_compared: generated tokens compared on the same context (the common prefix plus the divergent one).
        n_content_compared: of those, transformers' tokens that are content tokens (not EOS, pad or another
            special token); EOS is ignored by both engines, so an EOS-only model gives 0 here.
        nonfinite: None, or the :meth:`d2serve.compare.NonFiniteError.to_json` of a NaN/inf logprob (engine,
            token index).
    """

    prompt: str
    n_prompt_tokens: int
    first_divergence: int | None
    n_common: int
    max_abs_logprob_diff: float | None
    divergence: dict | None
    near_tie: bool | None
    vllm_text: str
    hf_text: str
    n_compared: int = 0
    n_content_compared: int = 0
    nonfinite: dict | None = None


@dataclass
class ParityReport:
    """vLLM vs transformers greedy parity on the exported checkpoint (see the module docstring).

    Times are wall-clock seconds: ``vllm_startup_s`` is the construction of
    ``vllm.LLM`` (engine ready to serve; excludes ``vllm_import_s``).
    """

    passed: bool
    prompt_format: str
    dtype: str
    device: str
    n_prompts: int
    max_new_tokens: int
    n_exact: int
    logprob_atol: float
    n_prompts_fully_identical: int
    n_early_near_tie_divergences: int
    min_first_divergence: int | None
    max_abs_logprob_diff: float
    vllm_version: str
    vllm_import_s: float
    vllm_startup_s: float
    vllm_generate_s: float
    vllm_worker_wall_s: float
    hf_generate_s: float
    prompts: list[PromptParity] = field(default_factory=list)
    n_content_tokens_compared: int = 0
    min_content_tokens_per_prompt: float = DEFAULT_MIN_CONTENT_TOKENS_PER_PROMPT
    failures: list[str] = field(default_factory=list)


@dataclass
class VllmExportReport:
    """Outcome of :func:`export_vllm`; :meth:`to_json` gives the stable JSON written to ``<out>/d2serve_export.json``."""

    passed: bool
    out: str
    source: str
    base: str | None
    adapter: str | None
    merged: str | None
    dtype: str
    static_checks: str
    load_check: ParityReport | None
    vllm_serve_command: str
    d2serve_serve_command: str
    merge_seconds: float | None
    total_seconds: float
    threads: dict | None = None  # d2serve.threads.record: --threads and the merge's row-block workers

    def to_json(self) -> dict:
        """A JSON-serialisable dict with stable keys."""
        return asdict(self)


def vllm_available() -> bool:
    """True when the ``vllm`` package is importable (checked without importing it)."""
    return importlib.util.find_spec("vllm") is not None


def vllm_serve_command(model_dir: str | Path, dtype: str) -> list[str]:
    """The ``vllm serve`` argv for an exported checkpoint (absolute path, explicit dtype), run by this
    interpreter in a form that works here (:func:`d2serve.launch_argv.vllm_cli_argv`)."""
    return vllm_cli_argv(["serve", str(Path(model_dir).resolve()), "--dtype", dtype])


def prompt_token_ids(model_dir: str | Path, prompts: tuple[str, ...] | list[str]) -> tuple[list[list[int]], str]:
    """Tokenize each prompt as a single-turn chat (``add_generation_prompt=True``), or raw text without a template.

    Returns:
        (token id lists, ``"chat_template"`` or ``"raw"``).
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    if tok.chat_template:
        ids = [
            list(tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                         tokenize=True, return_dict=True)["input_ids"])
            for p in prompts
        ]
        return ids, "chat_template"
    return [tok(p)["input_ids"] for p in prompts], "raw"


def run_vllm_worker(model_dir: Path, dtype: str, prompt_ids: list[list[int]], max_tokens: int,
                    max_model_len: int, timeout_s: float = WORKER_TIMEOUT_S) -> dict:
    """Run :mod:`d2serve.export._vllm_worker` in a fresh process group tied to this one and return its result dict.

    The worker's output goes to a log file; on failure its tail is in the error.

    Raises:
        VllmLoadError: the worker failed, timed out (its process group is
            killed), or wrote no result.
    """
    request = {"model": str(model_dir), "dtype": dtype, "max_model_len": max_model_len, "max_tokens": max_tokens,
               "prompt_token_ids": prompt_ids}
    with tempfile.TemporaryDirectory(prefix="d2serve-vllm-") as td:
        log = Path(td) / "vllm.log"
        t0 = time.perf_counter()
        try:
            result = run_json_worker("d2serve.export._vllm_worker", request, log=log, env=child_env(kv_cache_gib=1),
                                     timeout_s=timeout_s)
        except WorkerError as e:
            if e.timed_out:
                raise VllmLoadError(f"vLLM did not finish within {timeout_s:.0f} s on {model_dir}; log tail:\n"
                                    + e.log_tail()) from None
            raise VllmLoadError(f"vLLM failed on {model_dir}:\n{e.detail}\nlog tail:\n{e.log_tail()}") from None
        result["wall_s"] = time.perf_counter() - t0
        return result


def transformers_greedy(model_dir: Path, dtype: torch.dtype, prompt_ids: list[list[int]], max_tokens: int,
                        other_ids: list[list[int]] | None = None) -> tuple[list[dict], str]:
    """Greedy decoding with transformers on ``model_dir``: argmax of the raw logits, EOS ignored, one prompt at a time.

    A plain KV-cache loop rather than ``generate``, so no logits processor
    (e.g. one suppressing EOS, or a repetition penalty from
    generation_config.json) touches the scores: this is what vLLM's
    ``temperature=0, ignore_eos=True`` computes.

    Args:
        other_ids: per prompt, another engine's tokens; their transformers
            logprobs (on transformers' own greedy path) are returned too.

    Returns:
        (per prompt ``{"token_ids", "logprobs", "other_logprobs"}`` with logprobs
        in nats, float; the device name).
    """
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, local_files_only=True,
                                                 use_safetensors=True).to(device).eval()
    results = []
    try:
        for i, ids in enumerate(prompt_ids):
            other = other_ids[i] if other_ids else []
            toks, lps, other_lps = [], [], []
            x, past = torch.tensor([ids], device=device), None
            with torch.inference_mode():
                for step in range(max_tokens):
                    out = model(input_ids=x, past_key_values=past, use_cache=True)
                    past = out.past_key_values
                    lp = torch.log_softmax(out.logits[0, -1].float(), -1)
                    t = int(torch.argmax(out.logits[0, -1]))
                    toks.append(t)
                    lps.append(float(lp[t]))
                    if step < len(other):
                        other_lps.append(float(lp[other[step]]))
                    x = torch.tensor([[t]], device=device)
            results.append({"token_ids": toks, "logprobs": lps, "other_logprobs": other_lps})
    finally:
        del model
    return results, device


def compare_greedy(prompts: list[str], prompt_ids: list[list[int]], vllm_out: list[dict], hf_out: list[dict],
                   decode, n_exact: int, logprob_atol: float, special_ids=frozenset()) -> list[PromptParity]:
    """Per-prompt :class:`PromptParity` from the two engines' greedy outputs (see the module docstring).

    Every logprob is checked finite first (:func:`d2serve.compare.check_finite`): a NaN/inf is recorded in
    the prompt's ``nonfinite`` (engine and token index named), never compared. ``special_ids`` are the token
    ids that do not count as content (see :func:`d2serve.compare.special_token_ids`).
    """
    rows = []
    for i, (p, ids, v, h) in enumerate(zip(prompts, prompt_ids, vllm_out, hf_out)):
        vt, ht = v["token_ids"], h["token_ids"]
        where = f"vllm parity, prompt {i} ({p[:40]!r})"
        try:
            check_finite(v["logprobs"], where=where, side="vLLM logprobs", dims=("new token",))
            check_finite(h["logprobs"], where=where, side="transformers logprobs", dims=("new token",))
            check_finite(h["other_logprobs"], where=where, side="transformers logprobs of vLLM's tokens",
                         dims=("new token",))
        except NonFiniteError as e:
            rows.append(PromptParity(p, len(ids), None, 0, None, None, None, decode(vt), decode(ht),
                                     0, 0, e.to_json()))
            continue
        n = min(len(vt), len(ht))
        first = next((j for j in range(n) if vt[j] != ht[j]), None if len(vt) == len(ht) else n)
        common = n if first is None else first
        diffs = [abs(a - b) for a, b in zip(v["logprobs"][:common], h["logprobs"][:common])]
        div = None
        if first is not None and first < n:
            hf_own, hf_of_vllm = h["logprobs"][first], h["other_logprobs"][first]
            div = {"position": first, "vllm_token": vt[first], "hf_token": ht[first],
                   "vllm_logprob": v["logprobs"][first], "hf_logprob": hf_own,
                   "hf_logprob_of_vllm_token": hf_of_vllm, "hf_margin": hf_own - hf_of_vllm}
        tie = None if div is None else div["hf_margin"] <= 2 * logprob_atol
        n_cmp = min(common + 1, len(ht)) if first is not None else len(ht)
        rows.append(PromptParity(p, len(ids), first, common, max(diffs, default=0.0), div, tie, decode(vt), decode(ht),
                                 n_cmp, content_token_count(ht[:n_cmp], special_ids)))
    return rows


def load_check(model_dir: str | Path, *, n_prompts: int = 16, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
               n_exact: int = DEFAULT_N_EXACT, logprob_atol: float | None = None,
               timeout_s: float = WORKER_TIMEOUT_S,
               min_content_tokens_per_prompt: float = DEFAULT_MIN_CONTENT_TOKENS_PER_PROMPT) -> ParityReport:
    """Load ``model_dir`` in vLLM and compare its greedy generations with transformers (module docstring).

    Args:
        model_dir: a checkpoint that passed the static checks.
        n_prompts: 1..16 prompts of :data:`PROMPTS`.
        max_new_tokens: tokens generated per prompt (EOS ignored).
        n_exact: leading tokens that must be identical for every prompt.
        logprob_atol: max |logprob difference| in nats on the common prefix
            (None: :data:`LOGPROB_ATOL` of the checkpoint's dtype).
        min_content_tokens_per_prompt: the check fails unless, on average per prompt, at least this many
            content tokens (not EOS/pad/special) were compared: an EOS-only output is not evidence.

    Raises:
        MissingExtraError: vLLM is not installed (``pip install 'd2serve[vllm]'``).
        ValueError: bad counts.
        VllmLoadError: vLLM could not load the checkpoint or generate.
    """
    require("vllm", purpose="the vLLM load check")
    if not 1 <= n_prompts <= len(PROMPTS):
        raise InputError(f"n_prompts must be within 1..{len(PROMPTS)}, got {n_prompts}")
    if not 1 <= n_exact <= max_new_tokens:
        raise InputError(f"n_exact must be within 1..max_new_tokens ({max_new_tokens}), got {n_exact}")
    if max_new_tokens < min_content_tokens_per_prompt:
        raise InputError(f"max_new_tokens {max_new_tokens} < min_content_tokens_per_prompt "
                         f"{min_content_tokens_per_prompt:g}: the parity check could never compare enough content tokens")
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    dtype = config_dtype(config) or "float32"
    if logprob_atol is None:
        logprob_atol = LOGPROB_ATOL.get(dtype, 0.3)
    prompts = list(PROMPTS[:n_prompts])
    ids, fmt = prompt_token_ids(model_dir, prompts)
    max_len = max(len(x) for x in ids) + max_new_tokens + 16
    max_len = min(max(max_len, 256), int(config.get("max_position_embeddings") or max_len))
    step(f"vLLM: loading {model_dir.name} and generating {n_prompts} x {max_new_tokens} greedy tokens "
         "(a fresh process; minutes on CPU)")
    v = run_vllm_worker(model_dir, dtype, ids, max_new_tokens, max_len, timeout_s)
    step(f"transformers: the same {n_prompts} greedy generations for comparison")
    t0 = time.perf_counter()
    h, device = transformers_greedy(model_dir, DTYPE_NAMES[dtype], ids, max_new_tokens,
                                    [o["token_ids"] for o in v["outputs"]])
    hf_s = time.perf_counter() - t0
    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    gen_cfg = model_dir / "generation_config.json"
    gen_eos = json.loads(gen_cfg.read_text()).get("eos_token_id") if gen_cfg.is_file() else None
    special = special_token_ids(tok, extra=[gen_eos] if gen_eos is not None else [])
    rows = compare_greedy(prompts, ids, v["outputs"], h, lambda t: tok.decode(t, skip_special_tokens=False),
                          n_exact, logprob_atol, special)
    failures = [r.nonfinite["message"] for r in rows if r.nonfinite]
    finite = [r for r in rows if not r.nonfinite]
    firsts = [r.first_divergence for r in finite if r.first_divergence is not None]
    max_diff = max((r.max_abs_logprob_diff for r in finite), default=0.0)
    early = [r for r in finite if r.first_divergence is not None and r.first_divergence < n_exact]
    failures += [f"vllm parity, prompt {r.prompt!r}: the first {n_exact} tokens differ at {r.first_divergence} "
                 f"(transformers margin {r.divergence['hf_margin']:.3g} nats > 2 * logprob_atol)"
                 for r in early if not r.near_tie]
    if max_diff > logprob_atol:
        failures.append(f"vllm parity: max chosen-token logprob difference {max_diff:.3g} nats > logprob_atol "
                        f"{logprob_atol:g}")
    n_content = sum(r.n_content_compared for r in rows)
    if n_content / len(rows) < min_content_tokens_per_prompt:
        failures.append(
            f"vllm parity: only {n_content} content tokens compared over {len(rows)} prompts (per prompt: "
            f"{', '.join(str(r.n_content_compared) for r in rows)}) < min_content_tokens_per_prompt "
            f"{min_content_tokens_per_prompt:g} on average: the outputs are EOS/special tokens, not evidence")
    passed = not failures
    return ParityReport(
        passed=passed, n_content_tokens_compared=n_content, min_content_tokens_per_prompt=min_content_tokens_per_prompt,
        failures=failures, prompt_format=fmt, dtype=dtype, device=device, n_prompts=n_prompts,
        max_new_tokens=max_new_tokens, n_exact=n_exact, logprob_atol=logprob_atol,
        n_prompts_fully_identical=sum(r.first_divergence is None for r in rows),
        n_early_near_tie_divergences=sum(bool(r.near_tie) for r in early),
        min_first_divergence=min(firsts, default=None), max_abs_logprob_diff=max_diff,
        vllm_version=v["vllm_version"], vllm_import_s=v["import_s"], vllm_startup_s=v["startup_s"],
        vllm_generate_s=v["generate_s"], vllm_worker_wall_s=v["wall_s"], hf_generate_s=hf_s, prompts=rows,
    )


def _copy_checkpoint(src: Path, dst: Path) -> None:
    """Copy every file and folder of a checkpoint directory except earlier d2serve export reports and hidden names."""
    for p in sorted(src.iterdir()):
        if p.name == REPORT_NAME or p.name.startswith("."):
            continue
        if p.is_dir():
            shutil.copytree(p, dst / p.name)
        else:
            shutil.copy2(p, dst / p.name)


def _reference_base(base: str | Path | None, merged: Path | None) -> Path | None:
    """The base whose tokenizer the export must reproduce: ``base``, else the one named in the merge manifest."""
    if base is not None:
        return Path(base)
    if merged is not None:
        from d2serve.merge import read_manifest

        b = read_manifest(merged).get("base")
        if b and Path(b, "config.json").is_file():
            return Path(b)
    return None


@in_steps  # long steps shown as stages with elapsed time (d2serve.console; the CLI shows them)
def export_vllm(
    *,
    out: str | Path | None,
    base: str | Path | None = None,
    adapter: str | Path | None = None,
    merged: str | Path | None = None,
    dtype: str = "auto",
    check: bool | None = None,
    overwrite: bool = False,
    n_prompts: int = 16,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    n_exact: int = DEFAULT_N_EXACT,
    logprob_atol: float | None = None,
    progress: bool = False,
    threads: int | None = None,
) -> VllmExportReport:
    """Write a checkpoint vLLM loads untouched, check it statically, and (``check``) prove it loads in vLLM.

    Two sources: ``base`` + ``adapter`` (merged with :func:`d2serve.merge.merge`
    into ``out``), or an already ``merged`` directory (copied into ``out``; with
    ``out=None`` it is validated in place and nothing is written).

    Output: the checkpoint is written into a temporary sibling of ``out``,
    checked there, and renamed to ``out`` with the report
    ``d2serve_export.json``. A static-check failure or a vLLM load failure
    leaves nothing at ``out``; a parity failure keeps the (loadable) export with
    ``"passed": false`` in its report so it can be inspected.

    Args:
        out: output directory (must be empty/absent unless ``overwrite``).
        base, adapter: the base checkpoint and adapter directories.
        merged: an already merged checkpoint (instead of base + adapter); ``base``
            may still be given as the tokenizer reference (default: the base
            named in its ``d2serve_merge.json``).
        dtype: ``auto`` (the base's), ``float32``, ``bfloat16``, ``float16``; with
            ``merged`` only ``auto`` or the merged dtype (no conversion).
        check: run :func:`load_check`; None = when vLLM is installed.
        overwrite: replace a non-empty ``out``.
        n_prompts, max_new_tokens, n_exact, logprob_atol: see :func:`load_check`.
        threads: the merge's row-block workers (:func:`d2serve.merge.merge`); None: the cores this process may
            use. Recorded in the report (``threads``). (vLLM's own CPU threads are vLLM's settings.)

    Returns:
        :class:`VllmExportReport` (``passed`` False only for a parity failure).

    Raises:
        ValueError: inconsistent sources/options, unknown dtype, or ``out`` overlapping an input.
        FileExistsError: ``out`` is non-empty and ``overwrite`` is False.
        CheckpointError: the export fails a static check (listing every problem), or unreadable inputs.
        VllmLoadError: ``check`` and vLLM cannot load the export.
        MissingExtraError: ``check=True`` but vLLM is not installed (``pip install 'd2serve[vllm]'``).
    """
    t0 = time.perf_counter()
    if merged is not None and (adapter is not None):
        raise InputError("give either merged or base with adapter, not both")
    if merged is None and (base is None or adapter is None):
        raise InputError("give base and adapter (or an already merged checkpoint as merged)")
    if dtype != "auto" and (dtype not in DTYPE_NAMES or dtype == "float64"):
        raise InputError(f"dtype {dtype!r} not supported; expected auto, float32, bfloat16 or float16")
    if check is None:
        check = vllm_available()
    elif check:
        require("vllm", purpose="the vLLM load check (check=True; or pass check=False)")
    merged_p = Path(merged) if merged is not None else None
    reference = _reference_base(base, merged_p)
    if merged_p is not None:
        if not (merged_p / "config.json").is_file():
            raise CheckpointError(f"{merged_p}: no config.json; expected a merged HF checkpoint directory")
        have = config_dtype(read_json(merged_p / "config.json"))
        if dtype not in ("auto", have):
            raise InputError(f"dtype {dtype} differs from the merged checkpoint's {have}; "
                             "a merged checkpoint is exported as is (merge again with that dtype instead)")

    def finish(target: Path, final: Path, merge_s: float | None) -> VllmExportReport:
        step("static checks (config, tensors, tokenizer)")
        require_hf_checkpoint(target, reference)
        parity = load_check(target, n_prompts=n_prompts, max_new_tokens=max_new_tokens, n_exact=n_exact,
                            logprob_atol=logprob_atol) if check else None
        out_dtype = config_dtype(json.loads((target / "config.json").read_text())) or "float32"
        return VllmExportReport(
            passed=parity.passed if parity else True, out=str(final.resolve()),
            source="merged" if merged_p is not None else "base+adapter",
            base=str(base) if base is not None else None, adapter=str(adapter) if adapter is not None else None,
            merged=str(merged_p) if merged_p is not None else None, dtype=out_dtype, static_checks="passed",
            load_check=parity, vllm_serve_command=shlex.join(vllm_serve_command(final, out_dtype)),
            d2serve_serve_command=shlex.join([*d2serve_cli_argv(), "serve", "--model", str(final.resolve())]),
            merge_seconds=merge_s, total_seconds=0.0,
        )

    if out is None:
        if merged_p is None:
            raise InputError("out is required when merging base with adapter")
        report = finish(merged_p, merged_p, None)  # in place: nothing written (inputs are never modified)
        report.total_seconds = time.perf_counter() - t0
        return report
    out = Path(out)
    prepare_output_dir(out, overwrite, inputs=tuple(Path(p) for p in (base, adapter, merged) if p is not None))
    from d2serve.threads import check_requested, record

    threads = check_requested(threads)
    with atomic_output_dir(out, overwrite) as tmp:
        merge_s = merge_threads = None
        if merged_p is not None:
            _copy_checkpoint(merged_p, tmp)
        else:
            from d2serve.merge import merge

            res = merge(base=base, adapter=adapter, out=tmp, dtype=dtype, overwrite=True, progress=progress,
                        threads=threads)
            merge_s = res.seconds
            merge_threads = res.manifest["threads"]["row_workers"]
        report = finish(tmp, out, merge_s)
        report.threads = record(threads, merge=merge_threads)
        report.total_seconds = time.perf_counter() - t0
        write_json(tmp / REPORT_NAME, report.to_json())
    return report
