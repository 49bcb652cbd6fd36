"""A standing mutation check: plant bugs that matter in this field, one at a time, and see the tests catch them.

    python tests/mutants.py                  # every mutant, then the table (also written to tests/mutants.md)
    python tests/mutants.py --list           # the mutants, their files and test selections
    python tests/mutants.py --only NAME ...  # some of them (a name, or several; the table is printed, not written)

Each ``Mutant`` names a file, an exact piece of its text and what replaces it (a bug someone could plausibly write),
the tests that guard that code, and why the bug matters. The repository's ``linrope/``, ``tests/`` and
``experiments/`` are copied once to a temporary snapshot (edits made in the working tree meanwhile do not leak
into the run); for each mutant the snapshot is copied again, the text replaced there (it must occur exactly once:
a mutant whose text has been edited away fails loudly, before anything runs, instead of silently testing
nothing), and pytest runs the named tests there with ``PYTHONPATH`` at the copy, stopping at the first failure.
A small plugin records which ``linrope`` and ``lab`` were imported, so a run that picked up the editable install
of the working tree instead of the copy is an error, not a survivor; it also has hypothesis generate its examples
derandomized and not shrink a failing one (a mutant needs one failure, not the smallest). Outcomes: **caught** (a test failed), **survived** (every test passed: a missing test), **error**
(pytest could not run the selection, or imported the wrong package), **timeout**. The tests that caught a mutant
are then run once on an unmutated copy: a test that fails there too proves nothing, and its mutants are
reported **unverified**. A mutant known to change nothing observable carries ``equivalent``, the reason, and
is not run.

Lab mutants name their file as ``lab/X.py``: ``experiments/lab/X.py``, or ``linrope/lab/X.py`` where the
harness has not moved. A mutant may name several files where code moves between them: its text must then occur
once in all of them together.

Why a hand list and not mutmut / cosmic-ray: those generate thousands of syntactic mutants (operator swaps,
constant tweaks) and run the whole suite against each; most are trivially caught or equivalent, and the ones
this field cares about (a normalizer rotated, a causal mask off by one at a chunk border, a stabiliser that
reads a later key, a unit of bits per byte) are not syntactic one-token changes. A short list of named,
explained bugs, each with a small test selection, runs in minutes (57 mutants in about 9 minutes on 2 cores)
and reads as a specification of what the tests guard. Not part of the default pytest run (no ``test_`` prefix).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COPIED = ("linrope", "tests", "experiments")  # directories copied for each mutant
COPIED_FILES = ("pyproject.toml", "README.md", "BENCHMARKS.md", "ARCHITECTURE.md")
TIMEOUT_S = 420
MARKDOWN = ROOT / "tests" / "mutants.md"

CHUNKED = "linrope/_engine/chunked.py"
SOURCES = "linrope/_engine/feature_sources.py"
FUNCTIONAL = "linrope/functional.py"
ATTENTION = "linrope/attention.py"


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str | tuple[str, ...]  # relative to the repository root ("lab/X.py": experiments/lab/X.py, else
    # linrope/lab/X.py); several: the text is in one of them (code that moves between files)
    old: str  # exact text, found exactly once in the file
    new: str
    tests: tuple[str, ...]  # pytest arguments: test files or node ids
    why: str
    k: str | None = None  # pytest -k expression
    equivalent: str | None = None  # why the mutant cannot change behaviour (then it is not run)


MUTANTS = [
    # ------------------------------------------------------------------------------------ eq. 19's normalizer
    Mutant("rotated-normalizer", CHUNKED,
           "    if rope:\n        den, z_end, D = _normalizer(ws, fq, k0, z, sub)",
           "    if rope:\n        den, z_end, D = _normalizer(ws, qr, kr, z, sub)",
           ("tests/test_functional.py",), k="eq19_matches or favor_attention_matches",
           why="eq. 19 keeps the normalizer unrotated; rotated, it can vanish or turn negative (causal path)"),
    Mutant("rotated-normalizer-bidirectional", CHUNKED,
           "    z.add_(k0.sum(1))",
           "    z.add_((k0 if kr is None else kr).sum(1))",
           ("tests/test_functional.py",), k="eq19_matches or favor_attention_matches",
           why="the same in the bidirectional key sweep: the key sum must hold unrotated features"),
    Mutant("rotate-normalizer-ablation-numerator-twice", "lab/models.py",
           "return linear_attention(qf, kf, v, rotary=None,", "return linear_attention(qf, kf, v, rotary=rotary,",
           ("tests/test_models.py", "tests/test_independent.py"), k="rotate_normalizer or rotated_normalizer",
           why="the ablation behind the README's rotated-normalizer result: features rotated once, for numerator "
               "and normalizer alike; left rotary set, the engine rotates the numerator a second time"),
    # ------------------------------------------------------------------------------------ causal masks
    Mutant("causal-mask-sees-next-key", CHUNKED,
           "torch.ones(C, C, dtype=like.dtype, device=like.device).tril()",
           "torch.ones(C, C, dtype=like.dtype, device=like.device).tril(1)",
           ("tests/test_functional.py",), k="eq19_matches",
           why="the intra-chunk mask off by one: every row sees the key after it (a leak of the future)"),
    Mutant("chunk-border-off-by-one", CHUNKED,
           "torch.add(os[c - 1], xs[c - 1], out=os[c])",
           "torch.add(os[c - 1], xs[c], out=os[c])",
           ("tests/test_functional.py",), k="eq19_matches",
           why="the state entering chunk c holds chunk c's own keys instead of chunk c-1's (CPU scan)"),
    Mutant("chunk-border-off-by-one-cumsum", CHUNKED,
           "torch.cumsum(X[:, :-1], 1, out=out[:, 1:])",
           "torch.cumsum(X[:, 1:], 1, out=out[:, 1:])",
           ("tests/test_functional.py",), k="scans_as_cumsum",
           why="the same off-by-one in the GPU form of the scan (one torch.cumsum), tested on the CPU by forcing it"),
    Mutant("group-border-drops-last-chunk", CHUNKED,
           "    return os[-1] + xs[-1] if end else None",
           "    return os[-1] if end else None",
           ("tests/test_functional.py",), k="eq19_matches",
           why="the state leaving a group misses its last chunk: the next group never sees those keys"),
    Mutant("group-border-backward-rebuild", CHUNKED,
           "            z0 = prev.z0 + pk0.sum(1)",
           "            z0 = prev.z0",
           ("tests/test_functional.py", "tests/test_exact.py"),
           k="favor_attention_matches or recurrent_reference_outputs",
           why="the backward rebuilds a group's entering key sum without the previous group's keys: outputs "
               "right, gradients wrong"),
    Mutant("softmax-causal-mask-off-by-one", "linrope/functional.py",
           "keep = keep & torch.ones(Nq, Nk, dtype=torch.bool, device=q.device).tril(Nk - Nq)",
           "keep = keep & torch.ones(Nq, Nk, dtype=torch.bool, device=q.device).tril(Nk - Nq + 1)",
           ("tests/test_functional.py",), k="key_padding_mask",
           why="the softmax baseline's causal mask once it is explicit (padding, or a cache): one key too many"),
    Mutant("triton-missing-diagonal", "linrope/_engine/triton_kernels.py",
           "            A = tl.where(first >= second, A, 0.0)",
           "            A = tl.where(first > second, A, 0.0)",
           ("tests/test_triton_kernels.py",), k="test_matches_reference",
           why="the fused kernel's lower mask without its diagonal (no RoPE): each row loses its own key"),
    # ------------------------------------------------------------------------------------ distance 0
    Mutant("missing-distance-0", CHUNKED,
           "        A.diagonal(0, 1, 2).copy_(_distance0(D, pq, k0).view(BH * nc, C))",
           "        A.diagonal(0, 1, 2).zero_()",
           ("tests/test_functional.py",), k="eq19_matches",
           why="the term of a row's own key dropped (the diagonal zeroed instead of set to fq_t . k0_t)"),
    Mutant("distance-0-read-rotated", CHUNKED,
           "        A.diagonal(0, 1, 2).copy_(_distance0(D, pq, k0).view(BH * nc, C))\n", "",
           ("tests/test_exact.py",), k="distance_zero or any_scale",
           why="the own key's term left as R_t fq . R_t k0: equal in exact arithmetic, rounded to eps |fq| |k0| in "
               "float32, all of a row's digits at large activations"),
    Mutant("learned-phase-distance-0-gradient", CHUNKED,
           "        dK.addcmul_(pq, ddiag.unsqueeze(-1))\n", "",
           ("tests/test_learned_rotary.py",), k="quadratic_reference",
           why="with learned phases the key gradient of the distance-0 term (R_phase fq_t) . k0_t is dropped"),
    # ------------------------------------------------------------------------------------ the stabiliser
    Mutant("stabiliser-leaks-future-key", CHUNKED,
           "    P = torch.maximum(M, logscale[:, 0])",
           "    P = torch.maximum(M, logscale.amax(-1))",
           ("tests/test_independent.py",), k="float32",
           why="a group's log-scale reference taken from a later key: rows before it are scaled by a key they "
               "cannot see, and underflow to 0 in float32"),
    Mutant("padded-key-sets-the-reference", SOURCES,
           "        logscale = u.amax(-1).to(LOG_DTYPE).sub_(self.half_sq[:, a:b])\n"
           "        if self.mask is not None:\n            logscale.masked_fill_(~self.mask[:, a:b], NEG)\n",
           "        logscale = u.amax(-1).to(LOG_DTYPE).sub_(self.half_sq[:, a:b])\n",
           ("tests/test_exact.py",), k="padding or any_scale",
           why="a padded key's log-scale still counts for the reference: a large padded key scales the real "
               "ones to 0"),
    Mutant("key-jump-not-split", CHUNKED,
           "        jumps = ((logscale - P[:, None]) > JUMP_LIMIT).any(0)",
           "        jumps = ((logscale - P[:, None]) > 1e9).any(0)",
           ("tests/test_independent.py",), k="float32",
           why="a key far above its group's reference is not given a group of its own: exp overflows float32"),
    Mutant("state-not-rescaled-at-group-start", CHUNKED,
           "            S, z = _rescale(S, z, group.rescale_in, owned)\n", "",
           ("tests/test_functional.py", "tests/test_decay.py"), k="jumps or eq19_matches or decay",
           why="the carried state stays at the old reference when a group's keys raise it (decay: not decayed "
               "across groups)"),
    Mutant("query-features-without-row-max", SOURCES,
           "    return u.sub_(u.amax(-1, keepdim=True)).exp_()",
           "    return u.exp_()",
           ("tests/test_independent.py",), k="float32",
           why="FAVOR+ query features exponentiated without their row max: equal after division, inf at large "
               "activations"),
    # ------------------------------------------------------------------------------------ padding
    Mutant("padded-key-not-masked", SOURCES,
           "            u.masked_fill_(~self.mask[:, a:b, None], -math.inf)", "            pass",
           ("tests/test_functional.py",), k="key_padding_mask",
           why="FAVOR+ keys at padded positions still enter numerator and normalizer"),
    Mutant("padded-given-features-not-zeroed", SOURCES,
           "            fk.masked_fill_(~self.mask[:, a:b, None], 0)", "            pass",
           ("tests/test_independent.py",), k="padded",
           why="given key features at padded positions are only weighted by exp(NEG - P) = 0: inf or NaN "
               "features there (garbage in padding) turn into NaN everywhere"),
    Mutant("padded-value-not-masked", FUNCTIONAL,
           "        v = v.masked_fill(~mask[:, None, :, None], 0)\n    if not causal and",
           "        pass\n    if not causal and",
           ("tests/test_independent.py",), k="padded",
           why="a padded value is multiplied by a zero weight: NaN or inf there (an uninitialised buffer) makes "
               "0 * nan = nan in every row that sums it"),
    Mutant("softmax-padded-garbage", FUNCTIONAL,
           "        k, v = (x.masked_fill(~mask[:, None, :, None], 0) for x in (k, v))", "        pass",
           ("tests/test_independent.py",), k="padded",
           why="the softmax baseline: a NaN padded key gives NaN scores, masked or not"),
    # ------------------------------------------------------------------------------------ rotations
    Mutant("backward-rotates-instead-of-unrotating", SOURCES,
           "            self._factors[key] = torch.complex(cos, -sin if inverse else sin)",
           "            self._factors[key] = torch.complex(cos, sin)",
           ("tests/test_functional.py",), k="favor_attention_matches",
           why="feature gradients turned by R instead of R^T"),
    Mutant("half-split-pairs-as-interleaved", SOURCES,
           "    return torch.stack((torch.arange(r // 2, device=device), torch.arange(r // 2, r, device=device)), "
           "1).flatten()",
           "    return torch.arange(r, device=device)",
           ("tests/test_functional.py",), k="eq19_matches",
           why="the GPT-NeoX pairing (i, i + r/2) treated as RoFormer's (2i, 2i+1)"),
    Mutant("learned-phase-sign", SOURCES,
           "            ang = ang + self.phase\n", "            ang = ang - self.phase\n",
           ("tests/test_learned_rotary.py",), k="quadratic_reference",
           why="queries turned by theta m - phase instead of theta m + phase (consecutive positions)"),
    Mutant("learned-theta-gradient-far-from-0", SOURCES,
           "            self.dtheta += p0 * per.sum(0) + torch.matmul(rel, dang).sum(0)",
           "            self.dtheta += torch.matmul(rel, dang).sum(0)",
           ("tests/test_learned_rotary.py",), k="quadratic_reference",
           why="d theta loses p0 sum d angle: right in the first group only"),
    Mutant("yarn-ramp-inverted", "linrope/rotary.py",
           "            theta = theta / s * (1 - keep) + theta * keep",
           "            theta = theta * (1 - keep) + theta / s * keep",
           ("tests/test_rotary.py",), k="yarn",
           why="YaRN interpolates the high frequencies and keeps the low ones: the reverse of the paper"),
    Mutant("yarn-attention-factor", "linrope/rotary.py",
           "0.1 * math.log(self.scale) + 1.0 if", "math.sqrt(0.1 * math.log(self.scale) + 1.0) if",
           ("tests/test_rotary.py", "tests/test_attention.py", "tests/test_independent.py"), k="yarn",
           why="YaRN's factor 0.1 ln s + 1 on q and k taken as its square root (as if meant for q.k)"),
    Mutant("yarn-factor-on-queries-only", ATTENTION,
           "return (q, k) if f == 1.0 else (q * f, k * f)", "return (q, k) if f == 1.0 else (q * f, k)",
           ("tests/test_attention.py", "tests/test_independent.py"), k="yarn",
           why="YaRN scales q.k by the factor's square: applied to q alone it scales by the factor"),
    Mutant("ntk-base-not-raised", "linrope/rotary.py",
           "(self.base * s ** (self.dim / (self.dim - 2)))", "(self.base * s)",
           ("tests/test_rotary.py",), k="ntk",
           why="NTK-aware scaling raises the base by s^(d/(d-2)), so the lowest frequency is divided by s exactly"),
    # ------------------------------------------------------------------------------------ decay
    Mutant("decay-off-by-one-head", FUNCTIONAL,
           "key_bias = (decay_rates[:, None] * pos[..., None, :]).expand(B, H, N).reshape(B * H, N)",
           "key_bias = (decay_rates.roll(1)[:, None] * pos[..., None, :]).expand(B, H, N).reshape(B * H, N)",
           ("tests/test_decay.py",),
           why="head h decays at head h-1's rate"),
    Mutant("multiscale-decays-2h", (ATTENTION, FUNCTIONAL),
           "2.0 ** (-5 - h) for h in range(heads)", "2.0 ** (-5 - 2 * h) for h in range(heads)",
           ("tests/test_independent.py", "tests/test_decay.py"), k="multiscale",
           why="RetNet's gamma_h = 1 - 2^(-5-h); with -5-2h every head past the first forgets far too slowly"),
    Mutant("multiscale-decays-off-by-one-head", (ATTENTION, FUNCTIONAL),
           "2.0 ** (-5 - h) for h in range(heads)", "2.0 ** (-5 - h) for h in range(1, heads + 1)",
           ("tests/test_independent.py", "tests/test_decay.py"), k="multiscale",
           why="the multiscale rates shifted by one head (head 0 at 1 - 2^-6)"),
    Mutant("state-not-decayed-when-carried", FUNCTIONAL,
           "        M0 = M0 + decay_rates * (offset - 1)", "        M0 = M0 + decay_rates * offset",
           ("tests/test_decay.py",), k="streaming or decodes",
           why="a state handed to the next call is not decayed by the step from its last position to the next"),
    Mutant("decay-reference-not-relative", FUNCTIONAL,
           "M if lam is None else M - lam * (offset - 1), offset", "M, offset",
           ("tests/test_decay.py",), k="streaming or decodes",
           why="a returned state's log_ref left in the engine's frame (keys weighted by e^(lam n)): the next call "
               "weighs it as if it were lam (offset - 1) nats larger"),
    Mutant("cross-attention-keys-at-default-positions", FUNCTIONAL,
           "out[\"key_cos\"], out[\"key_sin\"] = rotary.cos_sin(key_positions, N, device, dtype, batch=B)",
           "out[\"key_cos\"], out[\"key_sin\"] = rotary.cos_sin(None, N, device, dtype, batch=B)",
           ("tests/test_exact.py",), k="cross_attention",
           why="cross-attention keys rotated at 0..M-1 whatever key_positions says"),
    Mutant("positions-offset-ignored", "linrope/rotary.py",
           "        return torch.arange(positions, positions + n, device=device)",
           "        return torch.arange(n, device=device)",
           ("tests/test_decay.py", "tests/test_learned_rotary.py"), k="streaming or consecutive",
           why="an int offset (decoding, streaming) ignored where positions are resolved (decays, learned angles): "
               "every piece restarts at position 0 while the state holds keys at their true positions"),
    # ------------------------------------------------------------------------------------ heads, features
    Mutant("gqa-swapped-heads", ATTENTION,
           "return t if g == 1 else t.repeat_interleave(g, dim=1)",
           "return t if g == 1 else t.repeat(1, g, *[1] * (t.dim() - 2))",
           ("tests/test_attention.py",), k="grouped_query",
           why="query head h reads kv head h mod kv_heads instead of h // (heads / kv_heads)"),
    Mutant("gqa-state-merged-across-decays", ATTENTION,
           "if self.decay is not None and any(len(set(self.decay[i:i + g])) > 1 for i in range(0, self.heads, g)):",
           "if False:",
           ("tests/test_attention.py",), k="grouped_query",
           why="grouped kv heads whose query heads decay at different rates share one decoding state (a bug once "
               "found by fuzzing, 80130ee): streamed outputs drift from the full pass"),
    Mutant("redraw-off-by-one-step", "linrope/features.py",
           "step % m.redraw_interval == 0", "(step + 1) % m.redraw_interval == 0",
           ("tests/test_features.py",), k="redraw",
           why="projections redrawn one optimizer step early: micro-batches and replicas disagree on the draw"),
    Mutant("feature-seed-ignored", "linrope/features.py",
           "self._draw(nb_projections, torch.Generator().manual_seed(seed))",
           "self._draw(nb_projections, torch.Generator())",
           ("tests/test_features.py",), k="seed",
           why="the seed never reaches the random projection: every layer and every run draws the same W"),
    Mutant("parallel-rank-reads-its-own-keys", CHUNKED,
           "    use = ranks < par.lay.rank if cfg.causal else ranks != par.lay.rank",
           "    use = ranks <= par.lay.rank if cfg.causal else ranks != par.lay.rank",
           ("tests/test_parallel.py",), k="functions_match",
           why="sequence parallelism: a causal rank starts from the earlier ranks' keys and its own (counted twice)"),
    # ------------------------------------------------------------------------------------ the lab
    Mutant("bpb-in-nats", "lab/train.py",
           '"bpb": loss / count / math.log(2)', '"bpb": loss / count',
           ("tests/test_lab_values.py",),
           why="bits per byte reported as nats per byte (loss / count instead of loss / count / ln 2): every "
               "reported bpb 1.44x too small"),
    Mutant("lab-feature-seed-ignored", "lab/models.py",
           "seed=config.feature_seed * 1000 + layer", "seed=layer",
           ("tests/test_models.py",), k="feature_seed",
           why="the run's feature_seed never reaches the layers' projections: seeds of a sweep share one draw"),
    Mutant("label-leak-in-training-windows", "lab/data.py",
           "    w = data[starts[:, None] + torch.arange(length + 1)].long()  # (B, N + 1)\n"
           "    return w[:, :-1], w[:, 1:]",
           "    w = data[starts[:, None] + torch.arange(length + 1)].long()  # (B, N + 1)\n"
           "    return w[:, 1:], w[:, 1:]",
           ("tests/test_data.py",),
           why="the inputs already hold the byte to predict: a model learns to copy, any bpb is meaningless"),
    Mutant("label-leak-in-validation-windows", "lab/data.py",
           "    w = data[starts[:, None] + torch.arange(length + 1)].long()\n    return w[:, :-1], w[:, 1:]",
           "    w = data[starts[:, None] + torch.arange(length + 1)].long()\n    return w[:, 1:], w[:, 1:]",
           ("tests/test_data.py",),
           why="the same in the fixed validation windows behind every reported bpb"),
    Mutant("evaluate-counts-ignored-targets", "lab/train.py",
           "        sums[2] += keep.sum()", "        sums[2] += yb.numel()",
           ("tests/test_lab_values.py",),
           why="synthetic tasks score only some positions: counting the ignored ones dilutes loss and accuracy"),
    Mutant("position-losses-count-ignored-targets", "lab/train.py",
           "            count += (yb != IGNORE).double().sum(0).cpu()", "            count += yb.shape[0]",
           ("tests/test_lab_values.py",),
           why="the per-position losses behind the extrapolation plots averaged over rows that score nothing there"),
    Mutant("gate-weighs-the-wrong-way", FUNCTIONAL,
           "    ks = -G if k_logscale is None else k_logscale.to(LOG_DTYPE) - G",
           "    ks = G if k_logscale is None else k_logscale.to(LOG_DTYPE) + G",
           ("tests/test_gates.py",), k="written_out",
           why="a forget gate multiplies the past by prod g <= 1: the keys get -G, not +G"),
    Mutant("gate-state-not-referred-to-its-end", FUNCTIONAL,
           "st.log_ref + end.to(st.log_ref.dtype)", "st.log_ref",
           ("tests/test_gates.py",), k="streaming",
           why="a returned gated state must carry the product of the gates so far, or decoding forgets nothing"),
    Mutant("hedgehog-one-half", "linrope/features.py",
           "torch.cat((u.softmax(-1), (-u).softmax(-1)), dim=-1)", "torch.cat((u.softmax(-1), u.softmax(-1)), dim=-1)",
           ("tests/test_hedgehog.py",), k="softmaxes",
           why="Hedgehog's second half is the softmax of -W x (the antithetic pair), not a copy of the first"),
    Mutant("hf-rope-inputs-rotates-the-wrong-half", "linrope/hf.py",
           "cos, sin = cos[..., : rot // 2], sin[..., : rot // 2]", "cos, sin = cos[..., rot // 4:], sin[..., rot // 4:]",
           ("tests/test_hf.py",), k="conversion_equals",
           why="HF's cos/sin repeat each half: a linearized model must rotate q, k exactly as the teacher did"),
    Mutant("cpp-step-state-not-carried-to-the-key", "linrope/_engine/step_cpu.cpp",
           "s1[j] = s0[j] * e + c * v[j];", "s1[j] = s0[j] + c * v[j];",
           ("tests/test_step.py",), k="cpp and reference_and_the_engine",
           why="the compiled step must move the state to the new key's reference (e < 1 when the key raises the "
               "running max), or old keys keep their weight against it"),
    Mutant("cpp-pass-normalizer-before-the-own-key", "linrope/_engine/causal_cpu.cpp",
           """            axpy(1.f, k0 + (int64_t)t * r, zb, r);
            const float dn = dot(fq + (int64_t)t * r, zb, r);""",
           """            const float dn = dot(fq + (int64_t)t * r, zb, r);
            axpy(1.f, k0 + (int64_t)t * r, zb, r);""",
           ("tests/test_exact.py",), k="cpp and sees_only_itself",
           why="the compiled pass's running key sum must hold a row's own key before the row reads it: the "
               "normalizer is sum_{n<=m}, and a row that sees only itself would divide by 0"),
    Mutant("cpp-pass-rotated-distance-zero", "linrope/_engine/causal_cpu.cpp",
           "if (sh.rope) row[t] = dot(fq + (int64_t)t * r, k0 + (int64_t)t * r, r);",
           "(void)fq, (void)k0;",
           ("tests/test_exact.py",), k="cpp and (sees_only_itself or large_activations)",
           why="at distance 0 the rotations cancel: R fq . R k0 in float32 carries eps |fq| |k0|, all of a row's "
               "digits at large activations; the compiled pass must take fq . k0 unrotated as the engine does"),
    Mutant("cpp-pass-state-not-rescaled-at-a-new-reference", "linrope/_engine/causal_cpu.cpp",
           """          const float ein = (float)std::exp(Mb - sb.P);
          scale_state(ein, Sb, zb, r, dv);""",
           """          const float ein = 1.f;
          scale_state(ein, Sb, zb, r, dv);""",
           ("tests/test_exact.py",), k="cpp and (far_above or exact_at_any_scale)",
           why="keys of a chunk are exp(. - P): the state of earlier keys must move to P (by exp(M - P)) or its "
               "keys weigh e^(P - M) times too much against the new ones"),
    Mutant("favor-gate-gradient-dropped", SOURCES,
           "_store(self.dks, a, b, total.squeeze(-1), self.add_keys)",
           "_store(self.dks, a, b, 0 * total.squeeze(-1), self.add_keys)",
           ("tests/test_gates.py",), k="favor_gates_match",
           why="a gated FAVOR+ layer learns its gate through the keys' log-biases: their gradient must reach it"),
]


GUARD = '''
import json, os, sys
try:  # a failing example is enough: no shrinking (minutes per mutant), the same examples every run
    from hypothesis import Phase, settings
    settings.register_profile("mutants", phases=[Phase.explicit, Phase.reuse, Phase.generate], derandomize=True,
                              database=None)
    settings.load_profile("mutants")
except ImportError:
    pass
FAILED = []
def pytest_runtest_logreport(report):
    if report.failed and report.nodeid not in FAILED:
        FAILED.append(report.nodeid)
def pytest_collectreport(report):
    if report.failed:
        FAILED.append("collection: " + str(report.nodeid))
def pytest_sessionfinish(session, exitstatus):
    mods = {n: getattr(sys.modules.get(n), "__file__", None) for n in ("linrope", "lab")}
    with open(os.environ["LINROPE_MUTANT_GUARD"], "w") as f:
        json.dump({"modules": mods, "failed": FAILED}, f)
'''


def resolve(root: Path, file: str) -> Path:
    """A mutant's file inside ``root``: lab files in experiments/lab/, else linrope/lab/ (before the move)."""
    if file.startswith("lab/"):
        for base in ("experiments", "linrope"):
            if (root / base / file).exists():
                return root / base / file
        raise SystemExit(f"mutant file {file}: neither experiments/{file} nor linrope/{file} exists")
    return root / file


def snapshot(dst: Path) -> None:
    """The working tree's ``COPIED`` directories and files copied to ``dst``, once per run: every mutant and the
    baseline start from this copy, whatever is edited in the working tree meanwhile."""
    ignore = shutil.ignore_patterns("__pycache__", ".hypothesis", "*.pyc", ".pytest_cache")
    for d in COPIED:
        if (ROOT / d).exists():
            shutil.copytree(ROOT / d, dst / d, ignore=ignore)
    for f in COPIED_FILES:
        if (ROOT / f).exists():
            shutil.copy2(ROOT / f, dst / f)
    (dst / "_mutant_guard.py").write_text(GUARD)


def files(m: Mutant) -> tuple[str, ...]:
    return (m.file,) if isinstance(m.file, str) else m.file


def located(root: Path, m: Mutant) -> tuple[Path, str]:
    """The mutant's file in ``root`` and its text, checked to hold the mutant's text exactly once (over all its
    candidate files)."""
    found = []
    for f in files(m):
        path = resolve(root, f)
        text = path.read_text() if path.exists() else ""
        found += [(path, text)] * (text.count(m.old) if m.old else 0)
    if len(found) != 1:
        raise SystemExit(f"mutant {m.name}: its text occurs {len(found)} times in {' and '.join(files(m))} "
                         f"(expected once); the code changed, update the mutant:\n{m.old}")
    return found[0]


def apply(root: Path, m: Mutant) -> None:
    path, text = located(root, m)
    path.write_text(text.replace(m.old, m.new))


def run_pytest(root: Path, args: list[str], timeout: int, stop_first: bool = True) -> dict:
    """pytest in ``root`` on ``args``; returns rc, seconds, failed node ids, the imported modules, the output tail."""
    guard = root / "_guard.json"
    env = dict(os.environ, PYTHONPATH=str(root), LINROPE_MUTANT_GUARD=str(guard), PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "_mutant_guard",
           "--rootdir", str(root), *(["-x"] if stop_first else []), *args]
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
        rc, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, out = None, (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
    info = json.loads(guard.read_text()) if guard.exists() else {"modules": {}, "failed": []}
    return {"rc": rc, "seconds": time.time() - t0, "failed": info["failed"], "modules": info["modules"],
            "tail": out[-3000:]}


def selection(m: Mutant) -> list[str]:
    return [*m.tests, *(["-k", m.k] if m.k else [])]


def wrong_package(root: Path, modules: dict, needed: str | None = None) -> str | None:
    """Which imported package did not come from the copy, or ``needed`` if it was not imported (None: fine)."""
    for name, path in modules.items():
        if path is not None and not Path(path).resolve().is_relative_to(root.resolve()):
            return f"{name} imported from {path}, not from the copy"
    if needed and modules.get(needed) is None:
        return f"{needed} (the mutated package) was never imported"
    return None


def run_mutant(m: Mutant, snap: Path) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"mutant-{m.name}-") as tmp:
        root = Path(tmp) / "repo"
        shutil.copytree(snap, root)
        apply(root, m)
        res = run_pytest(root, selection(m), TIMEOUT_S)
        bad = wrong_package(root, res["modules"], "lab" if files(m)[0].startswith("lab/") else "linrope")
    if bad:
        status = "error"
        res["tail"] = bad + "\n" + res["tail"]
    elif res["rc"] is None:
        status = "timeout"
    elif res["rc"] == 1 and res["failed"] and not any(f.startswith("collection") for f in res["failed"]):
        status = "caught"
    elif res["rc"] == 0:
        status = "survived"
    else:
        status = "error"
    return {**res, "status": status}


def verify(results: dict[str, dict], snap: Path) -> None:
    """Run the tests that caught mutants on the unmutated snapshot: a test that fails there proves nothing."""
    nodes = sorted({n for r in results.values() if r["status"] == "caught" for n in r["failed"]})
    if not nodes:
        return
    base = run_pytest(snap, nodes, TIMEOUT_S, stop_first=False)
    bad = wrong_package(snap, base["modules"])
    if bad or base["rc"] not in (0, 1):
        raise SystemExit(f"baseline run failed ({bad or base['rc']}):\n{base['tail']}")
    for r in results.values():
        if r["status"] == "caught" and set(r["failed"]) & set(base["failed"]):
            r["status"] = "unverified"
            r["tail"] = "fails without the mutant too: " + ", ".join(set(r["failed"]) & set(base["failed"]))
    print(f"baseline: {len(nodes)} catching tests on the unmutated copy, {len(base['failed'])} failed "
          f"({base['seconds']:.0f} s)", flush=True)


def table(results: dict[str, dict], total_s: float) -> str:
    lines = ["| mutant | file | outcome | caught by / reason | why it matters |", "|---|---|---|---|---|"]
    for m in MUTANTS:
        if m.name not in results:
            continue
        r = results[m.name]
        if r["status"] == "equivalent":
            by = m.equivalent
        elif r["status"] in ("caught", "unverified"):
            by = "`" + r["failed"][0].replace("|", "\\|") + "`"
        else:
            by = f"`{' '.join(selection(m))}`"
        where = " or ".join(f"`{f}`" for f in files(m))
        lines.append(f"| {m.name} | {where} | {r['status']} | {by} | {m.why} |")
    counts = {s: sum(r["status"] == s for r in results.values()) for s in
              ("caught", "equivalent", "survived", "unverified", "timeout", "error")}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    return "\n".join(lines) + f"\n\n{len(results)} mutants: {summary}; {total_s / 60:.1f} min.\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", metavar="NAME", help="run these mutants only (the table is not written)")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    args = ap.parse_args()
    names = [m.name for m in MUTANTS]
    assert len(set(names)) == len(names), "mutant names must be unique"
    if args.list:
        for m in MUTANTS:
            tag = " (equivalent)" if m.equivalent else ""
            print(f"{m.name}{tag}\n    {' or '.join(files(m))}: {' '.join(selection(m))}\n    {m.why}")
        return 0
    chosen = MUTANTS
    if args.only:
        unknown = set(args.only) - set(names)
        if unknown:
            raise SystemExit(f"--only: unknown mutants {sorted(unknown)}; see --list")
        chosen = [m for m in MUTANTS if m.name in args.only]
    t0 = time.time()
    results = {}
    with tempfile.TemporaryDirectory(prefix="mutants-snapshot-") as tmp:
        snap = Path(tmp)
        snapshot(snap)
        for m in chosen:  # every text must be there before anything runs
            located(snap, m)
        for m in chosen:
            if m.equivalent and not args.only:
                results[m.name] = {"status": "equivalent"}
                continue
            r = results[m.name] = run_mutant(m, snap)
            shown = r["failed"][0] if r["failed"] and r["status"] == "caught" else ""
            print(f"{r['status']:>9}  {m.name}  ({r['seconds']:.0f} s) {shown}", flush=True)
            if r["status"] in ("error", "timeout"):
                print(r["tail"], flush=True)
        verify(results, snap)
    out = table(results, time.time() - t0)
    print("\n" + out)
    if not args.only:
        MARKDOWN.write_text("# Mutation check\n\nWritten by `python tests/mutants.py` (see its docstring): each row a "
                            "bug planted in a copy of the package and the tests named for it run there.\n\n" + out)
        print(f"written to {MARKDOWN.relative_to(ROOT)}")
    return 0 if all(r["status"] in ("caught", "equivalent") for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
