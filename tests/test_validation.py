"""Bad input, everywhere: every case below is one wrong value given to a public function, class or
command-line option, and must raise the stated error with a message naming the value and what was
expected, before any long work. Plus: the inputs that are converted rather than refused (NumPy,
float64, lists), NaN/Inf caught where they enter, and a WSAE saved and reloaded with its Γ.

Count of bad inputs: ``pytest tests -m bad_input --collect-only -q`` (one collected case each).
"""

import argparse
import json
import math
import os

import numpy as np
import pytest
import torch

from wsae_core import activations as A
from wsae_core import checks, data, geometry, metrics, models, symbolic, train, weights
from wsae_core import corpus as C
from wsae_core import lm as L
from wsae_core.experiments import __main__ as cli
from wsae_core.experiments import lm as XL
from wsae_core.experiments import synthetic as XS
from wsae_core.experiments import theory as XT

W_P = geometry.superposition_matrix([1, 2, 3])  # (n_p = 4, n = 6)
NAN = float("nan")


def _sae(kind="theory", n_p=4, n_m=8):
    return models.build_sae(models.SAEConfig(n_p=n_p, n_m=n_m, kind=kind, k=2 if kind == "topk" else None))


def _with_nan(shape, at):
    x = torch.rand(*shape)
    x[at] = NAN
    return x


def _saved(tmp, gamma=None):
    sae = _sae("topk")
    return train.save_sae(sae, tmp / "sae", gamma=gamma)


def _edit_json(path, fn):
    obj = json.loads(path.read_text())
    fn(obj)
    path.write_text(json.dumps(obj))


def _corrupt_cfg(tmp, text):
    folder = _saved(tmp)
    (folder / "cfg.json").write_text(text)
    return folder


def _bad_cfg_field(tmp, key, value):
    folder = _saved(tmp)
    _edit_json(folder / "cfg.json", lambda c: c["sae"].__setitem__(key, value))
    return folder


def _truncate(path, keep=0.5):
    b = path.read_bytes()
    path.write_bytes(b[: int(len(b) * keep)])


def _flip_byte(path, offset=-3):
    b = bytearray(path.read_bytes())
    b[offset] ^= 0xFF
    path.write_bytes(bytes(b))


def _rehash(folder, name):
    """Make the manifest agree with an altered file: what a careless or hostile editor would do."""
    _edit_json(folder / "cfg.json", lambda c: c["files"].__setitem__(name, checks.file_entry(folder / name)))


def _weights_replaced(tmp, tensors):
    from safetensors.torch import save_file

    folder = _saved(tmp)
    save_file(tensors, str(folder / "model.safetensors"))
    _rehash(folder, "model.safetensors")
    return folder


def _checkpoint(tmp):
    sae = _sae("topk")
    cfg = train.TrainConfig(steps=4, batch_size=16, warmup_steps=1, progress=False, checkpoint_every=2,
                            checkpoint_dir=str(tmp / "ck"))
    train.Trainer(sae, data.SparseSource(W_P, 0.5), cfg).fit()
    folder = train._resolve_checkpoint(tmp / "ck")
    return tmp / "ck", folder


def _from_ck(ck):
    return train.Trainer.from_checkpoint(ck, data.SparseSource(W_P, 0.5))


def _ck_then(tmp, fn):
    ck, folder = _checkpoint(tmp)
    fn(ck, folder)
    return _from_ck(ck)


def _cli(argv):
    """Run a command line; argparse reports a bad option as exit 2 with the message on stderr."""
    return cli.main(argv)


# (id, call(tmp_path), expected exception, regex the message must match)
CASES = [
    # --- TrainConfig
    ("train-warmup>steps", lambda t: train.TrainConfig(steps=10, warmup_steps=100), ValueError, r"warmup_steps must be <= steps = 10.*got 100"),
    ("train-steps0", lambda t: train.TrainConfig(steps=0), ValueError, r"steps must be an integer >= 1, got 0"),
    ("train-steps-float", lambda t: train.TrainConfig(steps=1.5), ValueError, r"steps must be an integer >= 1, got 1.5"),
    ("train-batch0", lambda t: train.TrainConfig(batch_size=0), ValueError, r"batch_size must be an integer >= 1"),
    ("train-lr0", lambda t: train.TrainConfig(lr=0.0), ValueError, r"lr must be a finite number > 0 or None, got 0.0"),
    ("train-lr-inf", lambda t: train.TrainConfig(lr=math.inf), ValueError, r"lr must be a finite number > 0 or None, got inf"),
    ("train-lr-str", lambda t: train.TrainConfig(lr="1e-3"), ValueError, r"lr must be a finite number > 0 or None, got '1e-3'"),
    ("train-decay", lambda t: train.TrainConfig(decay="exp"), ValueError, r"decay must be .*got 'exp'"),
    ("train-final-ratio", lambda t: train.TrainConfig(final_lr_ratio=-0.1), ValueError, r"final_lr_ratio must be in \[0, 1\], got -0.1"),
    ("train-beta1", lambda t: train.TrainConfig(beta1=1.0), ValueError, r"beta1 must be in \[0, 1\), got 1.0"),
    ("train-seed-neg", lambda t: train.TrainConfig(seed=-1), ValueError, r"seed must be an integer >= 0, got -1"),
    ("train-seed-huge", lambda t: train.TrainConfig(seed=2**64), ValueError, r"seed must be < 2\*\*63"),
    ("train-device", lambda t: train.TrainConfig(device="tpu"), ValueError, r"device must be 'cpu', 'cuda' or 'cuda:N', got 'tpu'"),
    ("train-device-index", lambda t: train.TrainConfig(device="cuda:x"), ValueError, r"got 'cuda:x'"),
    ("train-ckpt-no-dir", lambda t: train.TrainConfig(checkpoint_every=5), ValueError, r"checkpoint_every = 5 needs a checkpoint_dir"),
    ("train-ckpt-dir-type", lambda t: train.TrainConfig(checkpoint_dir=123), ValueError, r"checkpoint_dir must be a folder path or None, got 123"),
    ("train-threads0", lambda t: train.TrainConfig(threads=0), ValueError, r"threads must be an integer >= 1, got 0"),
    ("train-progress", lambda t: train.TrainConfig(progress="yes"), ValueError, r"progress must be True, False or None, got 'yes'"),
    ("train-precision", lambda t: train.TrainConfig(precision="fp16"), ValueError, r"precision must be .*got 'fp16'"),
    # --- SAEConfig
    ("sae-n_p0", lambda t: models.SAEConfig(n_p=0, n_m=4), ValueError, r"n_p must be a positive integer, got 0"),
    ("sae-n_m-float", lambda t: models.SAEConfig(n_p=4, n_m=4.0), ValueError, r"n_m must be a positive integer, got 4.0"),
    ("sae-kind", lambda t: models.SAEConfig(n_p=4, n_m=4, kind="conv"), ValueError, r"kind must be one of .*got 'conv'"),
    ("sae-topk-no-k", lambda t: models.SAEConfig(n_p=4, n_m=4, kind="topk"), ValueError, r"k must be an integer in \[1, n_m = 4\].*got None"),
    ("sae-topk-k-big", lambda t: models.SAEConfig(n_p=4, n_m=4, kind="topk", k=5), ValueError, r"got 5"),
    ("sae-relu-k", lambda t: models.SAEConfig(n_p=4, n_m=4, kind="relu", k=2), ValueError, r"k is only used by kind 'topk'"),
    ("sae-l1-neg", lambda t: models.SAEConfig(n_p=4, n_m=4, kind="relu", l1_coeff=-1.0), ValueError, r"l1_coeff must be a finite number >= 0, got -1.0"),
    ("sae-l1-theory", lambda t: models.SAEConfig(n_p=4, n_m=4, l1_coeff=0.1), ValueError, r"l1_coeff is only used by kind 'relu'"),
    ("sae-init-scale", lambda t: models.SAEConfig(n_p=4, n_m=4, init_scale=0.0), ValueError, r"init_scale must be a finite number > 0, got 0.0"),
    ("sae-seed", lambda t: models.SAEConfig(n_p=4, n_m=4, seed=-3), ValueError, r"seed must be an integer in \[0, 2\*\*63\), got -3"),
    ("build-not-cfg", lambda t: models.build_sae({"n_p": 4}), TypeError, r"cfg must be an SAEConfig, got dict"),
    # --- SAE forward / encode
    *[(f"forward-{kind}-1d", lambda t, k=kind: _sae(k)(torch.rand(4)), ValueError,
       r"x_p must have shape \(batch, n_p = 4\), got \(4,\); for one sample use x_p\[None\]") for kind in ("theory", "relu", "topk")],
    *[(f"forward-{kind}-width", lambda t, k=kind: _sae(k)(torch.rand(3, 5)), ValueError,
       r"x_p must have shape \(batch, n_p = 4\), got \(3, 5\)") for kind in ("theory", "relu", "topk")],
    *[(f"forward-{kind}-nan", lambda t, k=kind: _sae(k)(_with_nan((3, 4), (1, 2))), checks.NonFiniteError,
       r"x_p must be finite, got nan at \[1, 2\]") for kind in ("theory", "relu", "topk")],
    ("forward-inf", lambda t: _sae()(torch.tensor([[0.0, 1.0, math.inf, 0.0]])), checks.NonFiniteError, r"got inf at \[0, 2\]"),
    ("forward-empty", lambda t: _sae()(torch.rand(0, 4)), ValueError, r"at least one sample, got shape \(0, 4\)"),
    ("forward-bool", lambda t: _sae()(torch.ones(2, 4, dtype=torch.bool)), TypeError, r"x_p must hold real numbers, got dtype torch.bool"),
    ("forward-str", lambda t: _sae()("abc"), TypeError, r"x_p must be a \(batch, n_p = 4\) tensor or array of numbers, got str"),
    ("forward-3d", lambda t: _sae("topk")(torch.rand(2, 3, 4)), ValueError, r"got \(2, 3, 4\)"),
    ("forward-gamma-len", lambda t: _sae("relu")(torch.rand(3, 4), torch.ones(3)), ValueError, r"gamma must have shape \(n_p,\) = \(4,\), got \(3,\)"),
    ("encode-width", lambda t: _sae("relu").encode(torch.rand(2, 6)), ValueError, r"got \(2, 6\)"),
    ("encode-nan", lambda t: _sae("theory").encode(_with_nan((2, 4), (0, 0))), checks.NonFiniteError, r"nan at \[0, 0\]"),
    # --- Trainer
    ("trainer-data", lambda t: train.Trainer(_sae(), [1, 2, 3]), TypeError, r"data must have a sample\(batch, generator\) method, got list"),
    ("trainer-n_p", lambda t: train.Trainer(_sae(), data.SparseSource(geometry.superposition_matrix([2, 2]), 0.5)), ValueError, r"data has n_p = 2 but the model expects n_p = 4"),
    ("trainer-gamma0", lambda t: train.Trainer(_sae(), data.SparseSource(W_P, 0.5), gamma=[0.0, 1, 1, 1]), ValueError, r"gamma must be > 0 .*gamma\[0\] = 0.0"),
    ("trainer-cfg", lambda t: train.Trainer(_sae(), data.SparseSource(W_P, 0.5), cfg={"steps": 3}), TypeError, r"cfg must be a TrainConfig, got dict"),
    ("trainer-until", lambda t: train.Trainer(_sae(), data.SparseSource(W_P, 0.5)).fit(until=-1), ValueError, r"until must be None or an integer >= 0, got -1"),
    # --- save_sae / load_sae
    ("load-missing", lambda t: train.load_sae(t / "nowhere"), FileNotFoundError, r"nowhere does not exist .*cfg.json"),
    ("load-no-cfg", lambda t: (t / "empty").mkdir() or train.load_sae(t / "empty"), FileNotFoundError, r"cfg.json not found: .* not a complete saved SAE"),
    ("load-cfg-garbage", lambda t: train.load_sae(_corrupt_cfg(t, "{not json")), checks.CorruptFileError, r"cfg.json \(saved SAE\) is not valid JSON"),
    ("load-cfg-not-object", lambda t: train.load_sae(_corrupt_cfg(t, "[1, 2]")), checks.CorruptFileError, r"must be a JSON object with an 'sae' object"),
    ("load-cfg-unknown-key", lambda t: train.load_sae(_bad_cfg_field(t, "bogus", 1)), ValueError, r"unknown SAEConfig field\(s\) \['bogus'\]; expected fields among"),
    ("load-cfg-bad-value", lambda t: train.load_sae(_bad_cfg_field(t, "n_p", -1)), ValueError, r"invalid SAEConfig .*n_p must be a positive integer, got -1"),
    ("load-mismatched-weights", lambda t: train.load_sae(_bad_cfg_field(t, "n_m", 10)), ValueError, r"W_enc has shape \(8, 4\), but the config \(n_p = 4, n_m = 10\) needs \(10, 4\)"),
    ("load-cfg-k-none", lambda t: train.load_sae(_bad_cfg_field(t, "k", None)), ValueError, r"invalid SAEConfig .*k must be an integer"),
    ("load-truncated", lambda t: (_truncate(_saved(t) / "model.safetensors"), train.load_sae(t / "sae")), checks.CorruptFileError, r"model.safetensors has \d[\d,]* bytes, the manifest says"),
    ("load-altered", lambda t: (_flip_byte(_saved(t) / "model.safetensors"), train.load_sae(t / "sae")), checks.CorruptFileError, r"does not match its SHA-256"),
    ("load-missing-weights", lambda t: ((_saved(t) / "model.safetensors").unlink(), train.load_sae(t / "sae")), checks.CorruptFileError, r"model.safetensors is missing"),
    ("load-not-safetensors", lambda t: ((_saved(t) / "model.safetensors").write_bytes(b"\x80\x04K\x01." * 20), _rehash(t / "sae", "model.safetensors"), train.load_sae(t / "sae")), checks.CorruptFileError, r"is not a valid safetensors file"),
    ("load-manifest-escape", lambda t: (_edit_json(_saved(t) / "cfg.json", lambda c: c["files"].__setitem__("model.safetensors", "x")), train.load_sae(t / "sae")), checks.CorruptFileError, r"bad manifest entry 'model.safetensors'"),
    ("load-extra-tensor", lambda t: train.load_sae(_weights_replaced(t, {**_sae("topk").state_dict(), "bogus": torch.zeros(2)})), ValueError, r"unexpected \['bogus'\]"),
    ("load-nan-weights", lambda t: train.load_sae(_weights_replaced(t, {k: v.fill_(NAN) if k == "b_enc" else v for k, v in _sae("topk").state_dict().items()})), checks.NonFiniteError, r"b_enc must be finite, got nan at \[0\]"),
    ("load-bad-gamma", lambda t: train.load_sae(_weights_replaced(t, {**_sae("topk").state_dict(), "gamma": -torch.ones(4)})), ValueError, r"gamma must be > 0"),
    ("save-reserved-extra", lambda t: train.save_sae(_sae(), t / "s", extra={"files": 1}), ValueError, r"extra must not use the keys .*got \['files'\]"),
    ("save-extra-not-json", lambda t: train.save_sae(_sae(), t / "s", extra={"x": object()}), ValueError, r"extra must be JSON-serialisable"),
    ("save-extra-nan", lambda t: train.save_sae(_sae(), t / "s", extra={"x": NAN}), ValueError, r"extra must be JSON-serialisable with finite numbers"),
    ("save-gamma-len", lambda t: train.save_sae(_sae(), t / "s", gamma=torch.ones(3)), ValueError, r"gamma must have length n_p = 4, got length 3"),
    ("save-rule-no-gamma", lambda t: train.save_sae(_sae(), t / "s", gamma_rule="variance"), ValueError, r"describe a WSAE: pass its gamma too"),
    ("save-not-model", lambda t: train.save_sae(torch.nn.Linear(2, 2), t / "s"), TypeError, r"model must be an SAE built by build_sae, got Linear"),
    ("save-onto-file", lambda t: ((t / "f").write_text("x"), train.save_sae(_sae(), t / "f")), FileExistsError, r"is a file; save_sae writes a folder"),
    # --- Trainer.from_checkpoint
    ("ckpt-missing", lambda t: _from_ck(t / "none"), FileNotFoundError, r"expected a folder with cfg.json and model.safetensors written by Trainer.save_checkpoint"),
    ("ckpt-pointer-escape", lambda t: _ck_then(t, lambda ck, f: (ck / "checkpoint.json").write_text('{"folder": "../../etc"}')), checks.CorruptFileError, r"must name a step folder like 'step_00000040_0123abcd', got '../../etc'"),
    ("ckpt-pointer-garbage", lambda t: _ck_then(t, lambda ck, f: (ck / "checkpoint.json").write_text("\x00\x01")), checks.CorruptFileError, r"checkpoint pointer\) is not valid JSON"),
    ("ckpt-state-truncated", lambda t: _ck_then(t, lambda ck, f: _truncate(f / "state.safetensors")), checks.CorruptFileError, r"state.safetensors has \d[\d,]* bytes, the manifest says"),
    ("ckpt-state-json-altered", lambda t: _ck_then(t, lambda ck, f: (f / "state.json").write_text((f / "state.json").read_text().replace('"step": 4', '"step": 3'))), checks.CorruptFileError, r"state.json does not match its SHA-256"),
    ("ckpt-no-manifest", lambda t: _ck_then(t, lambda ck, f: _edit_json(f / "cfg.json", lambda c: c.pop("files"))), checks.CorruptFileError, r"the manifest's 'files' must map names"),
    ("ckpt-unknown-override", lambda t: train.Trainer.from_checkpoint(_checkpoint(t)[0], data.SparseSource(W_P, 0.5), lr_max=1.0), ValueError, r"overrides must be TrainConfig fields, got unknown \['lr_max'\]"),
    ("ckpt-bad-override", lambda t: train.Trainer.from_checkpoint(_checkpoint(t)[0], data.SparseSource(W_P, 0.5), steps=0), ValueError, r"steps must be an integer >= 1, got 0"),
    # --- weights
    ("variance-nan", lambda t: weights.variance_gamma(_with_nan((5, 4), (2, 1)), 1.0), checks.NonFiniteError, r"x_p must be finite, got nan at \[2, 1\]"),
    ("variance-1d", lambda t: weights.variance_gamma(np.ones(4), 1.0), ValueError, r"x_p must be a \(batch, n_p\) sample with batch >= 2, got shape \(4,\)"),
    ("variance-alpha", lambda t: weights.variance_gamma(np.random.rand(5, 4), NAN), ValueError, r"alpha must be a finite number, got nan"),
    ("variance-constant-dim", lambda t: weights.variance_gamma(np.c_[np.random.rand(5, 3), np.ones(5)], 1.0), ValueError, r"variance of x_p\[:, 3\] is 0.0"),
    ("variance-str", lambda t: weights.variance_gamma("abc", 1.0), ValueError, r"x_p must be a \(batch, n_p\) array of numbers, got str"),
    ("gamma-neg", lambda t: weights.validate_gamma([1.0, -2.0]), ValueError, r"gamma must be > 0 in every dimension, got gamma\[1\] = -2.0"),
    ("gamma-nan", lambda t: weights.validate_gamma([1.0, NAN]), ValueError, r"gamma must be finite, got gamma\[1\] = nan"),
    ("gamma-2d", lambda t: weights.validate_gamma(np.ones((2, 2))), ValueError, r"gamma must be 1-D .*got shape \(2, 2\)"),
    ("gamma-str", lambda t: weights.validate_gamma("ab"), ValueError, r"gamma must be a 1-D array of positive numbers, got 'ab'"),
    ("make-gamma-rule", lambda t: weights.make_gamma("inverse", n_p=4), ValueError, r"rule must be one of .*got 'inverse'"),
    ("make-gamma-variance-no-x", lambda t: weights.make_gamma("variance", n_p=4), ValueError, r"rule 'variance' needs a sample x_p"),
    ("make-gamma-oracle-no-W", lambda t: weights.make_gamma("oracle", n_p=4), ValueError, r"rule 'oracle' needs the true W_p"),
    ("uniform-0", lambda t: weights.uniform_gamma(0), ValueError, r"n_p must be a positive integer, got 0"),
    ("wsae-loss-shapes", lambda t: weights.wsae_loss(torch.rand(3, 4), torch.rand(3, 5)), ValueError, r"x_p and x_hat must have the same shape \(batch, n_p\), got \(3, 4\) and \(3, 5\)"),
    # --- metrics
    ("fvu-constant", lambda t: metrics.fvu(np.ones((5, 3)), np.zeros((5, 3))), ValueError, r"x_p is constant over its 5 samples \(zero variance\): FVU is undefined"),
    ("fvu-shapes", lambda t: metrics.fvu(np.random.rand(5, 3), np.random.rand(5, 2)), ValueError, r"x_p and x_hat must have the same shape, got \(5, 3\) and \(5, 2\)"),
    ("fvu-nan", lambda t: metrics.fvu(_with_nan((5, 3), (4, 0)), np.zeros((5, 3))), checks.NonFiniteError, r"x_p must be finite, got nan at \[4, 0\]"),
    ("fvu-1d", lambda t: metrics.fvu(np.ones(3), np.ones(3)), ValueError, r"x_p must be 2-D, got shape \(3,\)"),
    ("fvu-empty", lambda t: metrics.fvu(np.ones((0, 3)), np.ones((0, 3))), ValueError, r"x_p must not be empty"),
    ("eval-x-width", lambda t: metrics.evaluate_recovery(_sae(), torch.rand(10, 5), W_P), ValueError, r"x must have shape \(batch, n = 6\) to match W_p \(4, 6\), got \(10, 5\)"),
    ("eval-W_p-rows", lambda t: metrics.evaluate_recovery(_sae(), torch.rand(10, 6), np.ones((3, 6))), ValueError, r"W_p must have n_p = 4 rows \(the model's input width\), got shape \(3, 6\)"),
    ("eval-x-1d", lambda t: metrics.evaluate_recovery(_sae(), torch.rand(6), W_P), ValueError, r"x must be 2-D, got shape \(6,\)"),
    ("eval-x-constant", lambda t: metrics.evaluate_recovery(_sae(), torch.zeros(10, 6), W_P), ValueError, r"x must hold at least 2 samples whose x_p = W_p x differ"),
    ("eval-not-model", lambda t: metrics.evaluate_recovery(torch.nn.Linear(4, 4), torch.rand(10, 6), W_P), TypeError, r"model must be an SAE .*got Linear"),
    ("eval-W_p-nan", lambda t: metrics.evaluate_recovery(_sae(), torch.rand(10, 6), np.full((4, 6), NAN)), checks.NonFiniteError, r"W_p must be finite, got nan at \[0, 0\]"),
    ("gt-shapes", lambda t: metrics.ground_truth_error(np.ones((4, 6)), np.ones((4, 5))), ValueError, r"matched latents must have shape \(4, 6\), got \(4, 5\)"),
    ("gt-perm-float", lambda t: metrics.ground_truth_error(np.ones((4, 2)), np.ones((4, 3)), perm=np.array([0.5, 1.0])), ValueError, r"perm must be a 1-D integer array"),
    ("gt-perm-range", lambda t: metrics.ground_truth_error(np.ones((4, 2)), np.ones((4, 3)), perm=np.array([0, 7])), ValueError, r"perm refers to latent 7 but latents have only 3 columns"),
    ("shrinkage-shapes", lambda t: metrics.feature_shrinkage(np.ones((4, 6)), np.ones((4, 2))), ValueError, r"matched latents must have shape \(4, 6\), got \(4, 2\)"),
    ("dense-threshold", lambda t: metrics.dense_fraction(np.ones((3, 3)), threshold=2), ValueError, r"threshold must be a number in \[0, 1\], got 2"),
    ("vanished-tol", lambda t: metrics.vanished_fraction(np.ones((3, 3)), np.ones((3, 3)), tol=-1.0), ValueError, r"tol must be a finite number >= 0, got -1.0"),
    ("l0-1d", lambda t: metrics.l0(np.ones(3)), ValueError, r"latents must be 2-D, got shape \(3,\)"),
    ("recon-shapes", lambda t: metrics.reconstruction_error(np.ones((2, 3)), np.ones((3, 3))), ValueError, r"same shape, got \(2, 3\) and \(3, 3\)"),
    ("dead-str", lambda t: metrics.dead_fraction("latents"), ValueError, r"latents must be a 2-D array of real numbers, got str"),
    # --- geometry
    ("blocks-empty", lambda t: geometry.superposition_matrix([]), ValueError, r"blocks must list at least one group size"),
    ("blocks-zero", lambda t: geometry.superposition_matrix([1, 0]), ValueError, r"every block size must be a positive integer .*got 0"),
    ("blocks-str", lambda t: geometry.superposition_matrix("12"), ValueError, r"blocks must be a sequence of positive group sizes, got '12'"),
    ("blocks-float", lambda t: geometry.superposition_matrix([1.5]), ValueError, r"every block size must be a positive integer, got 1.5"),
    ("nonpositive-too-many", lambda t: geometry.random_nonpositive_superposition(10, 3), ValueError, r"need n_p <= n <= 2 \* n_p .*got n = 10, n_p = 3"),
    ("closed-form-n_m", lambda t: geometry.closed_form_sae(W_P, 2), ValueError, r"n_m must be >= n = 6 .*got n_m = 2"),
    ("closed-form-float", lambda t: geometry.closed_form_sae(W_P, 6.5), ValueError, r"n_m must be an integer, got 6.5"),
    ("recover-width", lambda t: geometry.recover(W_P.T, np.ones(3)), ValueError, r"x_p must have shape \(4,\) or \(batch, 4\)"),
    ("recover-nan", lambda t: geometry.recover(W_P.T, [1.0, NAN, 0, 0]), ValueError, r"x_p must have finite entries"),
    ("interference-1d", lambda t: geometry.interference(np.ones(3)), ValueError, r"W_p must be a 2-D matrix, got an array of shape \(3,\)"),
    ("interference-nan", lambda t: geometry.interference(np.full((2, 2), NAN)), ValueError, r"W_p must have finite entries"),
    ("nonpositive-tol", lambda t: geometry.has_nonpositive_interference(W_P, tol=-1), ValueError, r"tol must be a finite non-negative number, got -1"),
    ("theory-losses-x", lambda t: geometry.theory_losses(W_P, W_P.T, np.ones((3, 5))), ValueError, r"x must have shape \(batch, 6\)"),
    ("theory-losses-gamma", lambda t: geometry.theory_losses(W_P, W_P.T, np.ones((3, 6)), gamma=[1, 1]), ValueError, r"gamma must have shape \(4,\)"),
    ("theory-losses-W_m", lambda t: geometry.theory_losses(W_P, np.ones((6, 3)), np.ones((3, 6))), ValueError, r"W_m must have 4 columns"),
    ("fit-theory-init", lambda t: geometry.fit_theory_sae(W_P, np.ones((3, 6)), 6, init="zeros"), ValueError, r"init must be 'closed_form', 'random' or an array, got 'zeros'"),
    ("fit-theory-n_m", lambda t: geometry.fit_theory_sae(W_P, np.ones((3, 6)), 0), ValueError, r"n_m must be a positive integer, got 0"),
    ("frobenius-gap-gamma", lambda t: geometry.frobenius_gap(W_P, gamma=[1, 1, -1, 1]), ValueError, r"gamma must be finite and positive, got -1.0 at index 2"),
    ("rotate-rows-cols", lambda t: geometry.rotate_rows(np.ones((3, 3)), 0.1), ValueError, r"needs an encoder with 2 columns .*got shape \(3, 3\)"),
    ("rotation-nan", lambda t: geometry.rotation(NAN), ValueError, r"theta must be finite, got nan"),
    # --- symbolic
    ("gap-gamma-len", lambda t: symbolic.gap_matrix(W_P, gamma=[1, 1]), ValueError, r"gamma must have length n_p = 4"),
    ("exact-recovery-x", lambda t: symbolic.exact_recovery(W_P, [1, 2]), ValueError, r"x must have length n = 6"),
    ("expected-losses-n", lambda t: symbolic.expected_losses(np.eye(2, 7)), ValueError, r"n must be <= 6, got n = 7"),
    ("verify-gap-n_p", lambda t: symbolic.verify_gap_identity(0, 2), ValueError, r"n_p must be a positive integer, got 0"),
    ("mc-estimate-1", lambda t: symbolic.mc_estimate([1.0]), ValueError, r"need at least 2 samples for a standard error, got 1"),
    ("one-sparse-activation", lambda t: symbolic.one_sparse_limit(W_P, activation="tanh"), ValueError, r"activation must be 'relu' or 'linear', got 'tanh'"),
    ("expected-losses-S", lambda t: symbolic.expected_losses(geometry.superposition_matrix([2]), S_value=1), ValueError, r"S must be in \[0, 1\), got 1"),
    ("gap-nan", lambda t: symbolic.gap_matrix(np.full((2, 2), NAN)), ValueError, r"W_p must have finite real entries"),
    # --- data
    ("sample-S1", lambda t: data.sample_sparse(4, 3, 1.0), ValueError, r"S must be in \[0, 1\), got 1.0"),
    ("sample-batch0", lambda t: data.sample_sparse(0, 3, 0.5), ValueError, r"batch must be a positive integer, got 0"),
    ("sample-values", lambda t: data.sample_sparse(4, 3, 0.5, values="gauss"), ValueError, r"values must be one of .*got 'gauss'"),
    ("sparsity-nan", lambda t: data.check_sparsity(NAN), ValueError, r"S must be a finite number in \[0, 1\), got nan"),
    ("superpose-shape", lambda t: data.superpose(np.ones((2, 5)), W_P), ValueError, r"x must be \(batch, 6\) to match W_p of shape \(4, 6\), got \(2, 5\)"),
    ("superpose-nan", lambda t: data.superpose(_with_nan((2, 6), (1, 3)), W_P), checks.NonFiniteError, r"x must be finite, got nan at \[1, 3\]"),
    ("source-W_p-1d", lambda t: data.SparseSource(np.ones(3), 0.5), ValueError, r"W_p must be a finite 2-D matrix \(n_p, n\), got shape \(3,\)"),
    ("source-values", lambda t: data.SparseSource(W_P, 0.5, values="normal"), ValueError, r"values must be one of"),
    ("source-generator", lambda t: data.SparseSource(W_P, 0.5).sample(4, 0), TypeError, r"generator must be a torch.Generator, got int"),
    ("tensor-source-1d", lambda t: data.TensorSource(torch.ones(5)), ValueError, r"acts must be a non-empty \(N, d\) matrix, got shape \(5,\)"),
    ("tensor-source-nan", lambda t: data.TensorSource(_with_nan((7, 3), (5, 2))), checks.NonFiniteError, r"acts must be finite, got nan at \[5, 2\] \(row = sample, column = dimension\)"),
    ("tensor-source-int", lambda t: data.TensorSource(torch.ones(5, 3, dtype=torch.long)), TypeError, r"acts must hold floating-point activations, got dtype torch.int64"),
    ("tensor-source-batch", lambda t: data.TensorSource(torch.ones(5, 3)).sample(0, torch.Generator()), ValueError, r"batch must be a positive integer, got 0"),
    ("polygon-layout", lambda t: data.polygon_layout(10, 20, n_mono=30), ValueError, r"n_mono \+ n_digons must be <= n_p = 20"),
    ("synthetic-kind", lambda t: data.synthetic_superposition("spiral"), ValueError, r"kind must be one of .*got 'spiral'"),
    # --- corpus
    ("docs-missing-path", lambda t: C.load_documents(str(t / "no_such_corpus")), ValueError, r"source must be 'wiki', 'shakespeare', 'hf:NAME' or an existing path, got"),
    ("docs-empty-folder", lambda t: (t / "d").mkdir() or C.text_file_documents(t / "d"), FileNotFoundError, r"no text files found at"),
    ("contexts-len", lambda t: C.tokenize_contexts([C.Document("a b", "x", "t")], None, context_len=1, n_contexts=1), ValueError, r"context_len must be at least 2, got 1"),
    ("contexts-n", lambda t: C.tokenize_contexts([C.Document("a b", "x", "t")], None, context_len=4, n_contexts=0), ValueError, r"n_contexts must be a positive integer, got 0"),
    ("contexts-no-docs", lambda t: C.tokenize_contexts([], None, context_len=4, n_contexts=1), ValueError, r"docs is empty"),
    # --- language models (no model loaded: these fail before)
    ("lm-missing-dir", lambda t: L.load_lm(str(t / "no_model")), FileNotFoundError, r"local model directory .*no_model' does not exist"),
    ("lm-relative-missing", lambda t: L.load_lm("./models/none"), FileNotFoundError, r"local model directory './models/none' does not exist"),
    ("lm-file", lambda t: ((t / "w.bin").write_bytes(b"x"), L.load_lm(str(t / "w.bin"))), ValueError, r"must be a directory saved with save_pretrained, got file"),
    ("lm-dir-no-config", lambda t: (t / "m").mkdir() or L.load_lm(str(t / "m")), FileNotFoundError, r"has no config.json: not a folder written by save_pretrained"),
    ("lm-unknown-id-offline", lambda t: L.load_lm("no-such-org/no-such-model-123"), FileNotFoundError, r"'no-such-org/no-such-model-123' is neither a local directory nor in the Hugging Face cache, and HF_HUB_OFFLINE"),
    ("lm-dtype", lambda t: L.load_lm(str(t), dtype=torch.int64), ValueError, r"dtype must be a floating torch.dtype .*got torch.int64"),
    ("lm-device", lambda t: L.load_lm(str(t), device="gpu"), ValueError, r"device must be 'cpu', 'cuda' or 'cuda:N', got 'gpu'"),
    ("lm-name-type", lambda t: L.load_lm(123), TypeError, r"name_or_path must be a hub id, a folder or None, got int"),
    ("cache-missing", lambda t: A.ActivationCache(t / "none"), FileNotFoundError, r"no activation cache at .*meta.json missing"),
    ("cache-meta-corrupt", lambda t: ((t / "c").mkdir(), (t / "c" / "meta.json").write_text("{oops"), A.ActivationCache(t / "c")), checks.CorruptFileError, r"meta.json \(activation-cache metadata\) is not valid JSON"),
    ("norm-scale-nan", lambda t: A.norm_scale(_with_nan((4, 3), (3, 1))), checks.NonFiniteError, r"x must be finite, got nan at \[3, 1\]"),
    ("norm-scale-zeros", lambda t: A.norm_scale(torch.zeros(4, 3)), ValueError, r"x is all zeros"),
    # --- experiment specs and command lines
    ("spec-synthetic-S", lambda t: XS.spec_for("ci", S_grid=(0.0, 1.0)), ValueError, r"every S must be a number in \[0, 1\), got 1.0"),
    ("spec-synthetic-seed", lambda t: XS.spec_for("ci", seeds=(-1,)), ValueError, r"every seed must be an integer >= 0, got -1"),
    ("spec-synthetic-steps", lambda t: XS.spec_for("ci", steps=0), ValueError, r"steps must be an integer >= 1, got 0"),
    ("spec-synthetic-method", lambda t: XS.spec_for("ci", methods=("L1",)), ValueError, r"methods must be among"),
    ("spec-theory-config", lambda t: XT.spec_for("ci", configs=("hexagon",)), ValueError, r"configs must be a non-empty selection of .*got \['hexagon'\]"),
    ("spec-theory-ratio", lambda t: XT.spec_for("ci", latent_ratios=(0,)), ValueError, r"latent_ratios must be integers >= 1, got \[0\]"),
    ("spec-lm-k", lambda t: XL.spec_for("ci", k=0), ValueError, r"k must be an integer >= 1, got 0"),
    ("spec-lm-layers", lambda t: XL.spec_for("ci", layers=(-1,)), ValueError, r"layers must be block indices >= 0, got \[-1\]"),
    ("spec-lm-lr", lambda t: XL.spec_for("ci", lr=NAN), ValueError, r"lr must be a finite number > 0, got nan"),
    ("spec-lm-device", lambda t: XL.spec_for("ci", device="tpu"), ValueError, r"device must be 'cpu', 'cuda' or 'cuda:N', got 'tpu'"),
    ("run-tasks-workers", lambda t: __import__("wsae_core.experiments", fromlist=["run_tasks"]).run_tasks(abs, [1], workers=0), ValueError, r"workers must be None or an integer >= 1, got 0"),
]

CLI_CASES = [
    ("cli-workers0", ["synthetic", "--profile", "ci", "--workers", "0"], r"--workers: expected an integer >= 1, got 0"),
    ("cli-workers-str", ["theory", "--workers", "two"], r"--workers: expected an integer >= 1, got 'two'"),
    ("cli-out-folder-missing", ["synthetic", "--out", "/no/such/folder/r.json"], r"--out: folder '/no/such/folder' of '/no/such/folder/r.json' does not exist"),
    ("cli-out-is-folder", ["theory", "--out", "/"], r"--out: '/' is a folder; expected a file path"),
    ("cli-profile", ["synthetic", "--profile", "huge"], r"--profile: invalid choice: 'huge'"),
    ("cli-experiment", ["vision"], r"invalid choice: 'vision'"),
    ("cli-lm-layers", ["lm", "--profile", "ci", "--layers", "-1"], r"--layers: expected a block index \(integer >= 0\), got -1"),
    ("cli-lm-device", ["lm", "--profile", "ci", "--device", "tpu"], r"device must be 'cpu', 'cuda' or 'cuda:N', got 'tpu'"),
    ("cli-lm-out", ["lm", "--profile", "ci", "--out", "/no/such/dir/x.json"], r"--out: folder '/no/such/dir' .* does not exist"),
]
if not torch.cuda.is_available():
    CASES.append(("trainer-cuda", lambda t: train.Trainer(_sae(), data.SparseSource(W_P, 0.5), train.TrainConfig(device="cuda")), ValueError, r"device 'cuda' requested but CUDA is not available"))
    CASES.append(("lm-cuda", lambda t: L.load_lm(str(t), device="cuda"), ValueError, r"device 'cuda' requested but CUDA is not available"))
    CLI_CASES.append(("cli-lm-cuda", ["lm", "--profile", "ci", "--device", "cuda"], r"--device cuda: CUDA is not available"))


@pytest.mark.bad_input
@pytest.mark.parametrize("call, exc, match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_refused_with_a_message(call, exc, match, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(exc, match=match):
        call(tmp_path)


@pytest.mark.bad_input
@pytest.mark.parametrize("argv, match", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_bad_command_line_is_refused_before_work(argv, match, capsys, monkeypatch):
    monkeypatch.setenv("WSAE_CACHE_DIR", "/nonexistent-cache-never-written")
    with pytest.raises(SystemExit) as exit_info:
        _cli(argv)
    assert exit_info.value.code == 2
    assert __import__("re").search(match, capsys.readouterr().err), capsys.readouterr


def test_case_ids_are_unique():
    ids = [c[0] for c in CASES + CLI_CASES]
    assert len(ids) == len(set(ids))


# ---------------------------------------------------------------------------- converted, not refused


@pytest.mark.parametrize("kind", ["theory", "relu", "topk"])
def test_numpy_float64_and_lists_are_converted(kind):
    sae = _sae(kind)
    x32 = torch.rand(5, 4, generator=torch.Generator().manual_seed(0))
    ref = sae(x32)
    for x in (x32.double(), x32.numpy(), x32.double().numpy(), x32.tolist()):
        out = sae(x)
        assert out.reconstruction.dtype == torch.float32
        torch.testing.assert_close(out.reconstruction, ref.reconstruction)
        torch.testing.assert_close(sae.encode(x), sae.encode(x32))
    out = sae(x32, np.ones(4))  # gamma as numpy
    torch.testing.assert_close(out.loss, ref.loss)


def test_integer_ground_truth_is_superposed_in_floats():
    x = np.array([[1, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 1]])
    np.testing.assert_allclose(data.superpose(x, W_P).numpy(), x @ W_P.T, atol=1e-6)


def test_metrics_accept_torch_and_numpy_alike():
    x = np.random.default_rng(0).random((6, 3))
    assert metrics.fvu(torch.from_numpy(x).float(), np.zeros((6, 3))) == pytest.approx(metrics.fvu(x, np.zeros((6, 3))), rel=1e-6)


# ---------------------------------------------------------------------------- WSAE save / load


def test_wsae_saves_and_reloads_with_its_gamma_and_rule(tmp_path):
    sae = _sae("topk")
    x_p = torch.rand(64, 4, generator=torch.Generator().manual_seed(1)) * torch.tensor([1.0, 2.0, 0.5, 1.0])
    gamma = weights.variance_gamma(x_p, 1.0)
    train.save_sae(sae, tmp_path / "wsae", gamma=gamma, gamma_rule="variance", alpha=1.0)
    train.save_sae(sae, tmp_path / "sae")
    w, s = train.load_sae(tmp_path / "wsae"), train.load_sae(tmp_path / "sae")
    assert torch.equal(w.gamma, gamma) and w.gamma_rule == {"rule": "variance", "alpha": 1.0}
    assert s.gamma is None and s.gamma_rule is None
    assert torch.equal(w(x_p, w.gamma).loss, sae(x_p, gamma).loss)
    # A trainer checkpoint of a WSAE keeps Γ too.
    cfg = train.TrainConfig(steps=3, batch_size=8, warmup_steps=1, progress=False, checkpoint_every=3,
                            checkpoint_dir=str(tmp_path / "ck"))
    train.Trainer(_sae("topk"), data.TensorSource(x_p), cfg, gamma=gamma).fit()
    back = train.Trainer.from_checkpoint(tmp_path / "ck", data.TensorSource(x_p))
    assert torch.equal(back.gamma, gamma) and train.load_sae(tmp_path / "ck").gamma_rule == {"rule": "custom", "alpha": None}


def test_resaving_replaces_cleanly(tmp_path):
    a, b = _sae("topk"), models.build_sae(models.SAEConfig(n_p=4, n_m=8, kind="topk", k=2, seed=9))
    train.save_sae(a, tmp_path / "s", gamma=torch.ones(4))
    train.save_sae(b, tmp_path / "s")
    got = train.load_sae(tmp_path / "s")
    assert got.gamma is None and torch.equal(got.W_enc, b.W_enc)


# ---------------------------------------------------------------------------- NaN/Inf where they enter


class _Poisoned:
    """A data source that turns NaN at one step, row and column (a bad file or model upstream)."""

    n_p = 4

    def __init__(self, step, row, col, value=NAN):
        self.calls, self.step, self.row, self.col, self.value = 0, step, row, col, value

    def sample(self, batch, generator):
        x = data.SparseSource(W_P, 0.5).sample(batch, generator)
        if self.calls == self.step:
            x[self.row, self.col] = self.value
        self.calls += 1
        return x


@pytest.mark.parametrize("kind", ["theory", "relu", "topk"])
@pytest.mark.parametrize("value", [NAN, math.inf])
def test_training_stops_at_the_step_a_batch_turns_nonfinite(kind, value, tmp_path):
    cfg = train.TrainConfig(steps=20, batch_size=16, warmup_steps=2, progress=False, checkpoint_every=5,
                            checkpoint_dir=str(tmp_path / "ck"))
    t = train.Trainer(_sae(kind), _Poisoned(12, 3, 1, value), cfg)
    with pytest.raises(checks.NonFiniteError, match=rf"step 12: the batch from the data source \(_Poisoned\) has "
                       rf"{value} at row 3, column 1.*the last checkpoint \(step 10, in .*ck\) is intact"):
        t.fit()
    assert t.step == 12 and all(torch.isfinite(p).all() for p in t.model.parameters())
    back = train.Trainer.from_checkpoint(tmp_path / "ck", data.SparseSource(W_P, 0.5))
    assert back.step == 10 and all(torch.isfinite(p).all() for p in back.model.parameters())


def test_training_stops_when_a_gradient_turns_nonfinite():
    t = train.Trainer(_sae("theory"), data.SparseSource(W_P, 0.5),
                      train.TrainConfig(steps=10, batch_size=16, warmup_steps=1, progress=False))
    t.fit(until=3)
    t.model.W_m.register_hook(lambda g: torch.where(torch.arange(g.numel()).view_as(g) == 5, NAN, g))
    with pytest.raises(checks.NonFiniteError, match=r"step 3: the gradient of W_m has nan at \[1, 1\] \(the batch is finite"):
        t.fit()


@pytest.mark.parametrize("kind", ["theory", "relu", "topk"])
def test_a_diverging_run_is_stopped_with_a_message(kind):
    t = train.Trainer(_sae(kind), data.SparseSource(W_P, 0.5),
                      train.TrainConfig(steps=200, batch_size=64, lr=1e6, warmup_steps=0, progress=False))
    with pytest.raises(checks.NonFiniteError, match=r"step \d+: .*the run diverged or overflowed; lower lr, now 1e\+06"):
        t.fit()


def test_a_normal_run_is_not_flagged_as_diverging():
    # Started at the exact closed form (a near-zero loss): a yardstick of the loss alone would misfire.
    sae = _sae("theory", n_m=6)
    with torch.no_grad():
        sae.W_m.copy_(torch.as_tensor(W_P.T, dtype=torch.float32))
    train.Trainer(sae, data.SparseSource(W_P, 0.99),
                  train.TrainConfig(steps=100, batch_size=32, warmup_steps=5, progress=False)).fit()


def test_nonfinite_location_agrees_for_torch_and_numpy():
    x = np.zeros((3, 4, 5), dtype=np.float32)
    x[2, 1, 3] = -np.inf
    assert checks.nonfinite_location(x) == ((2, 1, 3), -math.inf)
    assert checks.nonfinite_location(torch.from_numpy(x)) == ((2, 1, 3), -math.inf)
    assert checks.nonfinite_location(torch.from_numpy(x).half()) == ((2, 1, 3), -math.inf)
    big = np.full((4,), 6e4, dtype=np.float16)  # finite, but its float16 sum would overflow
    assert checks.nonfinite_location(big) is None and checks.nonfinite_location(torch.from_numpy(big)) is None


@pytest.mark.skipif(os.environ.get("HF_HUB_OFFLINE") is None, reason="checked where the hub is off")
def test_load_lm_unknown_id_fails_fast_offline(monkeypatch):
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE"):
        L.load_lm("EleutherAI/no-such-model-xyz")
    assert time.perf_counter() - t0 < 10


def test_argparse_types_directly():
    from wsae_core.experiments import output_file, positive_int

    assert positive_int("3") == 3
    with pytest.raises(argparse.ArgumentTypeError):
        positive_int("-2")
    assert output_file("results.json") == "results.json"
