"""wsae_core: the library behind the book *What sparse autoencoders can and cannot recover*.

The modules each own one idea and import only the ideas listed before them:

``profile``   which run size the chapters use (``ci`` / ``book`` / ``paper``)
``checks``    shared checks: NaN/Inf located, files verified against SHA-256 manifests, atomic writes
``geometry``  superposition matrices W_p, interference, the Theorem 1 closed form, recovery, "~"
``symbolic``  exact algebra with SymPy: gap matrices, identities, exact expectations
``data``      sparse ground truth x and its superposition x_p = W_p x
``models``    theory SAE and practical SAE (ReLU + L1, Top-k) with one forward NamedTuple
``weights``   WSAE weights Γ (uniform, variance^α, oracle) and the WSAE loss
``metrics``   matching latents to features, L_GT, shrinkage, vanishing, FVU, L0, dead / dense latents
``train``     one Trainer.fit: config dataclass, checkpoints with exact resume, safetensors + cfg.json
``corpus``    text for language models (Wikipedia leads with topics, Shakespeare, files, HF) -> contexts
``lm``        causal LMs: loading, residual-stream hooks, splicing an SAE in (CE recovered, KL)
``activations`` on-disk activation cache: sharded, resumable, reused, shuffled reads
``proxies``   offline interpretability proxies: topic consistency, token entropy, embedding coherence
``interp``    LLM auto-interpretability: example selection, explain / detect / fuzz, chat clients, response cache
``interop``   SAEs for SAELens and sparsify (export) and theirs opened here (import)
``browser``   the latent browser's data: contexts, histograms, explanations, nearest latents
``experiments`` runners for the book's experiments, ``python -m wsae_core.experiments ...``
``plots``     one consistent figure style for the book
``widgets``   the playground: live ipywidgets and a pre-rendered explorer for the static book

Import a module explicitly (``from wsae_core import geometry``); importing the package itself
is cheap and does not import torch or SymPy.
"""

__version__ = "0.1.0"
