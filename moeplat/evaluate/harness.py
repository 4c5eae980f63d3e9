"""Downstream evaluation through lm-evaluation-harness (lm_eval), on a moeplat model as it is.

    results = run_tasks(loaded, ["hellaswag", "arc_easy"])   # {task: {metric: value}}

Why an adapter (MoeplatLM, an lm_eval LM over moeplat.nn.TransformerLM and the run's tokenizer)
and not an export to transformers + lm_eval's HFLM: it scores every spec, including routers and
layouts that no transformers model family expresses, and needs no conversion or second copy of
the weights. The tokenisation follows lm_eval's convention exactly because MoeplatLM subclasses
its TemplateLM: the pair (context, continuation) is encoded whole, the continuation is what the
whole has beyond encode(context), and trailing whitespace of the context moves to the continuation.

Batching: requests are sorted by length (longest first) and right-padded; a causal model's
scores at the real positions do not see the padding. MoE layers with a capacity limit, or
expert-choice routing, let tokens of one batch compete for experts (as in training): pass
batch_size=1 to score every request on its own.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM

log = logging.getLogger(__name__)

DEFAULT_MAX_GEN_TOKS = 256  # lm_eval's HFLM default for generate_until


@dataclass
class LoadedTask:
    """What run_tasks needs of a model (moeplat.evaluate.load.LoadedModel has it too)."""

    model: torch.nn.Module
    tok: object


class UnknownTask(Exception):
    """A task name lm_eval does not know (message lists close matches): a user mistake."""


class MoeplatLM(TemplateLM):
    """lm_eval's LM interface over a moeplat TransformerLM and a moeplat tokenizer (`Tok`)."""

    def __init__(self, model: torch.nn.Module, tok, *, device: str = "cpu", batch_size: int = 16) -> None:
        super().__init__()
        assert batch_size >= 1, batch_size
        self._device = torch.device(device)
        self.model = model.to(self._device).eval()
        self.tok = tok
        self.batch_size = batch_size
        self.max_length = model.max_seq_len

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id  # the id packed between documents in training: the natural "start"

    @property
    def tokenizer_name(self) -> str:
        return f"moeplat-{self.tok.kind}-{self.tok.fingerprint}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        # moeplat tokenizers add no special tokens: add_special_tokens changes nothing
        return [int(i) for i in self.tok.encode_texts([string])[0]]

    def tok_decode(self, ids) -> str:
        return self.tok.decode(ids)

    @torch.inference_mode()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        """(sum of log p(continuation | context), continuation is the greedy one) per request
        (key, context_ids, continuation_ids). The input is left-truncated to max_seq_len tokens."""
        L = self.max_length
        rows = []
        for _, ctx, cont in requests:
            if len(cont) > L:
                raise ValueError(
                    f"a continuation of {len(cont)} tokens does not fit the model's max_seq_len ({L})"
                )
            whole = (list(ctx) + list(cont))[-(L + 1) :]
            rows.append(
                (whole[:-1], whole[len(whole) - len(cont) :])
            )  # input, the targets at its last positions
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # longest first
        out: list[tuple[float, bool] | None] = [None] * len(rows)
        bs = override_bs or self.batch_size
        for start in range(0, len(order), bs):
            batch = order[start : start + bs]
            for i, res in zip(batch, self._score([rows[i] for i in batch]), strict=True):
                out[i] = res
                key = requests[i][0]
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, res)
        return out

    def _score(self, rows: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """One forward over right-padded inputs; log-softmax in float32 at the scored positions only
        (the whole B x S x V of a large vocabulary would not fit)."""
        S = max(len(inp) for inp, _ in rows)
        idx_BS = torch.zeros(len(rows), S, dtype=torch.long)
        for b, (inp, _) in enumerate(rows):
            idx_BS[b, : len(inp)] = torch.tensor(inp)
        logits_BSV = self.model(idx_BS.to(self._device)).logits_BSV
        res = []
        for b, (inp, target) in enumerate(rows):
            n = len(target)
            logp_NV = F.log_softmax(logits_BSV[b, len(inp) - n : len(inp)].float(), dim=-1)
            target_N = torch.tensor(target, device=logp_NV.device)
            logp = logp_NV.gather(1, target_N[:, None]).sum().item()
            res.append((float(logp), bool((logp_NV.argmax(-1) == target_N).all())))
        return res

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-text log-likelihood: disjoint windows of max_seq_len tokens, the first conditioned
        on eot (lm_eval.utils.get_rolling_token_windows with context_len=1), each token once."""
        windows, owner = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            pairs = lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.eot_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for ctx, cont in map(lm_utils.make_disjoint_window, pairs):
                windows.append((None, ctx, cont))
                owner.append(i)
        scores = self._loglikelihood_tokens(windows)
        totals = [0.0] * len(requests)
        for i, (logp, _) in zip(owner, scores, strict=True):
            totals[i] += logp
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Each context continued until one of its `until` strings (cut there), the eot token or
        max_gen_toks tokens: greedy, or sampled when the task asks (do_sample, temperature, top_k,
        top_p), with the KV cache of moeplat.evaluate.generate. As lm_eval's HFLM, the context is
        left-truncated to max_seq_len - max_gen_toks tokens so that the whole generation fits."""
        out = []
        for req in requests:
            context, kwargs = req.args
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else [s for s in until if s]
            max_new = min(int(kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS)), self.max_length - 1)
            ids = (self.tok_encode(context) or [self.eot_token_id])[-(self.max_length - max_new) :]
            text = self._continue(ids, max_new, until, _sampling(kwargs))
            self.cache_hook.add_partial("generate_until", req.args, text)
            out.append(text)
        return out

    def _continue(self, ids: list[int], max_new: int, until: list[str], sampling: dict) -> str:
        from moeplat.evaluate.generate import generate

        new: list[int] = []

        def seen(_, token: int) -> None:
            new.append(token)
            if until and any(s in self.tok_decode(new) for s in until):
                raise _Stop  # the only way to end generate() early: the text is complete

        with contextlib.suppress(_Stop):
            generate(
                self.model, [ids], max_new_tokens=max_new, eos_id=self.eot_token_id, on_token=seen, **sampling
            )
        text = self.tok_decode(new) if new else ""
        cuts = [text.index(s) for s in until if s in text]
        return text[: min(cuts)] if cuts else text


class _Stop(Exception):
    """An `until` string was generated."""


def _sampling(kwargs: dict) -> dict:
    """moeplat.evaluate.generate's sampling options from an lm_eval request's generation kwargs."""
    if not kwargs.get("do_sample") or not kwargs.get("temperature", 1.0):
        return {"temperature": 0.0}
    return {
        "temperature": float(kwargs.get("temperature", 1.0)),
        "top_k": kwargs.get("top_k"),
        "top_p": kwargs.get("top_p"),
        "seed": torch.initial_seed() % 2**32,  # lm_eval seeds torch (torch_random_seed)
    }


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def task_manager(tasks: list[str], include_path: str | None = None):
    """(lm_eval TaskManager that knows every task in `tasks`, whether they are all local ones).
    Only local tasks: the built-in index (thousands of YAML files, seconds) is not read."""
    from lm_eval.tasks import TaskManager

    if include_path:
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(_known(local, t) for t in tasks):
            return local, True
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [t for t in tasks if not _known(manager, t)]
    if unknown:
        raise UnknownTask("; ".join(_unknown_message(manager, t) for t in unknown))
    return manager, False


def _known(manager, name: str) -> bool:
    return name in manager.all_tasks or ("*" in name and bool(manager.match_tasks([name])))


def _unknown_message(manager, name: str) -> str:
    close = difflib.get_close_matches(name, manager.all_tasks, n=5, cutoff=0.6)
    hint = f"; close matches: {', '.join(close)}" if close else ""
    return (
        f"unknown task {name!r}{hint} (local tasks: pass the directory of their YAML files as include path)"
    )


@contextlib.contextmanager
def offline():
    """No Hugging Face Hub access: the libraries read these settings at import, so their module
    constants are set too (and restored after)."""
    import datasets.config
    import huggingface_hub.constants

    saved_env = {k: os.environ.get(k) for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
    targets = [(datasets.config, "HF_HUB_OFFLINE"), (datasets.config, "HF_DATASETS_OFFLINE")]
    targets.append((huggingface_hub.constants, "HF_HUB_OFFLINE"))
    saved = [getattr(m, a) for m, a in targets]
    os.environ.update({k: "1" for k in saved_env})
    for m, a in targets:
        setattr(m, a, True)
    try:
        yield
    finally:
        for (m, a), v in zip(targets, saved, strict=True):
            setattr(m, a, v)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def flat_results(results: dict) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from lm_eval's results: the default filter's ",none" suffix is
    dropped, another filter is kept as metric/filter; stderr stays as <metric>_stderr."""
    flat: dict[str, dict[str, float]] = {}
    for task, row in results.items():
        metrics = {}
        for key, value in row.items():
            metric, sep, filt = key.partition(",")
            if not sep or isinstance(value, bool) or not isinstance(value, int | float):
                continue  # alias, name, sample_len; "N/A" stderr
            metrics[metric if filt == "none" else f"{metric}/{filt}"] = float(value)
        flat[task] = metrics
    return flat


def run_tasks(
    loaded,
    tasks: list[str],
    *,
    include_path: str | None = None,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    batch_size: int = 16,
    seed: int = 0,
    device: str | None = None,
) -> dict[str, dict[str, float]]:
    """Evaluate `loaded` (a moeplat.evaluate.load.LoadedModel, or anything with .model and .tok) on
    lm_eval `tasks`; {task: {metric: value}}. Raises UnknownTask for a name lm_eval does not know.
    Local tasks (all found under include_path) run with the Hub switched off."""
    from lm_eval import simple_evaluate

    manager, local = task_manager(tasks, include_path)
    lm = MoeplatLM(loaded.model, loaded.tok, device=device or default_device(), batch_size=batch_size)
    with offline() if local else contextlib.nullcontext():
        out = simple_evaluate(
            model=lm,
            tasks=list(tasks),
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=manager,
            log_samples=False,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    return flat_results(out["results"])


def eval_metrics(results: dict[str, dict[str, float]]) -> dict[str, float]:
    """MLflow metric names eval/<task>/<metric> (characters MLflow refuses become _)."""

    def clean(s: str) -> str:
        return re.sub(r"[^\w\-. /:]", "_", s)

    return {f"eval/{clean(t)}/{clean(m)}": v for t, row in results.items() for m, v in row.items()}


def end_of_run(loaded_spec, model: torch.nn.Module, tok) -> dict[str, float]:
    """train.eval of `loaded_spec` (a LoadedSpec) on a run's final model: MLflow metrics
    eval/<task>/<metric> (moeplat.train.run calls it through the hook `moeplat run` passes)."""
    ev, spec = loaded_spec.spec.train.eval, loaded_spec.spec
    device = "cuda" if spec.parallel.accelerator != "cpu" and torch.cuda.is_available() else "cpu"
    loaded = LoadedTask(model, tok)
    results = run_tasks(
        loaded,
        ev.tasks,
        include_path=ev.include_dir,
        num_fewshot=ev.num_fewshot,
        limit=ev.limit,
        batch_size=spec.train.batch_size,
        seed=spec.train.seed,
        device=device,
    )
    return eval_metrics(results)
