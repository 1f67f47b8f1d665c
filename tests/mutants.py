"""Mutation check: inject small, plausible mistakes into ``helpers`` one at a time and make
sure the test suite notices each of them.

    python tests/mutants.py                 every mutant, two at a time
    python tests/mutants.py --jobs 1 rmsnorm-eps-outside-sqrt   the ones named

Each mutant replaces one snippet of one file (the snippet must occur exactly once, which
``tests/test_mutants.py`` checks in the ordinary suite) in a scratch copy of the course, then
runs the test files it names there, without Hugging Face (``transformers`` is hidden), so
that the course's own tests, not only the external oracles, catch it. A mutant that passes
every test it names is a hole in the suite: the run fails and names it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    """One injected mistake: in ``path`` replace ``old`` by ``new``; ``tests`` should fail."""

    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTANTS = [
    Mutant("rmsnorm-eps-outside-sqrt", "helpers/transformer.py",
           "normed = wide * torch.rsqrt(wide.pow(2).mean(dim=-1, keepdim=True) + self.eps)",
           "normed = wide / (torch.sqrt(wide.pow(2).mean(dim=-1, keepdim=True)) + self.eps)",
           ("tests/test_model_probes.py",)),
    Mutant("attention-no-float32-upcast", "helpers/attention.py",
           "compute = torch.float32 if q.dtype in _LOW_PRECISION else q.dtype",
           "compute = q.dtype",
           ("tests/test_model_probes.py", "tests/test_attention.py")),
    Mutant("top-k-threshold-from-the-max", "helpers/transformer.py",
           "kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]",
           "kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, :1]",
           ("tests/test_model_probes.py", "tests/test_transformer.py")),
    Mutant("t5-bucket-direction-includes-zero", "helpers/transformer.py",
           "bucket = bucket + (relative_position > 0).long() * num_buckets",
           "bucket = bucket + (relative_position >= 0).long() * num_buckets",
           ("tests/test_model_probes.py", "tests/test_transformer.py")),
    Mutant("t5-bucket-rounds-instead-of-truncating", "helpers/transformer.py",
           "large = max_exact + (log_ratio * (num_buckets - max_exact)).long()",
           "large = max_exact + (log_ratio * (num_buckets - max_exact)).round().long()",
           ("tests/test_model_probes.py", "tests/test_transformer.py")),
    Mutant("gpt-padding-mask-dropped", "helpers/transformer.py",
           "mask = real[:, None, None, :]  # (B, 1, 1, S)",
           "mask = None",
           ("tests/test_model_probes.py", "tests/test_transformer.py")),
    Mutant("gpt-padding-mask-on-queries", "helpers/transformer.py",
           "mask = real[:, None, None, :]  # (B, 1, 1, S)",
           "mask = real[:, None, :, None]",
           ("tests/test_model_probes.py", "tests/test_transformer.py")),
    Mutant("gpt-cache-sees-padding", "helpers/transformer.py",
           "positions = torch.where(real[:, -L:], position_ids.expand(B, L), -1)  # (B, L)",
           "positions = position_ids.expand(B, L)",
           ("tests/test_kv_cache.py",)),
    Mutant("causal-mask-top-left", "helpers/attention.py",
           "return torch.ones(L, S, dtype=torch.bool, device=device).tril(S - L)",
           "return torch.ones(L, S, dtype=torch.bool, device=device).tril()",
           ("tests/test_attention.py", "tests/test_transformer.py")),
    Mutant("attention-scale-forgotten", "helpers/attention.py",
           "scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale",
           "scale = 1.0 if scale is None else scale",
           ("tests/test_attention.py",)),
    Mutant("kv-cache-overwrites-the-last-token", "helpers/kv_cache.py",
           "self.data[:, :, self.length:end] = x",
           "self.data[:, :, max(self.length - 1, 0):end - 1 if self.length else end] = x",
           ("tests/test_kv_cache.py", "tests/test_transformer.py")),
    Mutant("kv-cache-growth-loses-the-past", "helpers/kv_cache.py",
           "grown[:, :, :self.length] = self.data[:, :, :self.length]",
           "grown[:, :, :self.length] = 0",
           ("tests/test_kv_cache.py", "tests/test_transformer.py")),
    Mutant("quantize-floors", "helpers/kv_cache.py",
           "codes = ((x32 - low) / safe).round().clamp(0, levels).to(torch.uint8)",
           "codes = ((x32 - low) / safe).floor().clamp(0, levels).to(torch.uint8)",
           ("tests/test_kv_cache.py",)),
    Mutant("kivi-keys-per-token", "helpers/kv_cache.py",
           "codes, scale, zero = quantize(groups, dim=-2, bits=self.bits)  # one scale per channel",
           "codes, scale, zero = quantize(groups, dim=-1, bits=self.bits)",
           ("tests/test_kv_cache.py",)),
    Mutant("sink-cache-forgets-the-sinks", "helpers/kv_cache.py",
           "wanted = (positions >= 0) & ((positions < n_sinks) | (positions > newest - window))",
           "wanted = (positions >= 0) & (positions > newest - window)",
           ("tests/test_kv_cache.py",)),
    Mutant("heavy-hitters-forget-the-recent", "helpers/kv_cache.py",
           "priority = torch.where(positions > newest - n_recent, float(\"inf\"), scores.float())",
           "priority = scores.float()",
           ("tests/test_kv_cache.py",)),
    Mutant("heavy-hitters-ignore-the-group", "helpers/kv_cache.py",
           "received = received.reshape(B, H_kv, -1, S).sum(dim=2)  # (B, H_kv, S): over the group",
           "received = received.reshape(B, H_kv, -1, S)[:, :, 0]",
           ("tests/test_kv_cache.py",)),
    Mutant("ring-gradients-not-passed-on", "helpers/ring.py",
           "dk, dv = dk + dk_dv[0], dv + dk_dv[1]",
           "dk, dv = dk, dv",
           ("tests/test_ring.py",)),
    Mutant("ring-causal-mask-of-the-wrong-block", "helpers/ring.py",
           "k_pos[(ring.rank - step) % ring.size]",
           "k_pos[(ring.rank + step) % ring.size]",
           ("tests/test_ring.py",)),
    Mutant("linear-chunks-count-their-own-keys-twice", "helpers/linear_attention.py",
           "state_before = chunk_state.cumsum(dim=-3) - chunk_state",
           "state_before = chunk_state.cumsum(dim=-3)",
           ("tests/test_linear_attention.py",)),
    Mutant("linear-parallel-not-causal", "helpers/linear_attention.py",
           "similarity = similarity * causal_mask(L, S, device=phi_q.device)",
           "similarity = similarity * causal_mask(S, L, device=phi_q.device).T",
           ("tests/test_linear_attention.py",)),
    Mutant("rope-rotates-the-wrong-way", "helpers/rope.py",
           "return torch.cat([-x2, x1], dim=-1)",
           "return torch.cat([x2, -x1], dim=-1)",
           ("tests/test_rope.py",)),
    Mutant("rope-frequencies-twice-too-slow", "helpers/rope.py",
           ".float() / head_dim", ".float() / (2 * head_dim)",
           ("tests/test_rope.py",)),
    Mutant("llama-keys-not-rotated", "helpers/transformer.py",
           "k = apply_rope(split_heads(attn.k_proj(x), attn.n_kv_heads), cos, sin)",
           "k = split_heads(attn.k_proj(x), attn.n_kv_heads)",
           ("tests/test_llama_probes.py",)),
    Mutant("llama-positions-restart-after-the-cache", "helpers/transformer.py",
           "start = cache.seq_len if cache is not None else 0\n"
           "        positions = torch.arange(start, start + idx.shape[1], device=idx.device)",
           "start = 0\n"
           "        positions = torch.arange(start, start + idx.shape[1], device=idx.device)",
           ("tests/test_llama_probes.py",)),
    Mutant("llama-window-ignored-in-prefill", "helpers/transformer.py",
           "mask = sliding_window_mask(L, window, device=q.device, S=S)  # (L, S)",
           "mask = causal_mask(L, S, device=q.device)  # (L, S)",
           ("tests/test_llama_probes.py",)),
    Mutant("sliding-window-one-key-too-many", "helpers/attention.py",
           "return (j <= i) & ((j > i - window) | (j < n_global))",
           "return (j <= i) & ((j >= i - window) | (j < n_global))",
           ("tests/test_sliding_window.py", "tests/test_attention.py")),
    Mutant("banded-padding-keys-visible", "helpers/sliding_window.py",
           "mask = band & real", "mask = band",
           ("tests/test_sliding_window.py",)),
    Mutant("repeat-kv-interleaved", "helpers/attention.py",
           "return x[:, :, None].expand(B, H_kv, n_rep, S, D).reshape(B, H_kv * n_rep, S, D)",
           "return x[:, None].expand(B, n_rep, H_kv, S, D).reshape(B, H_kv * n_rep, S, D)",
           ("tests/test_gqa.py", "tests/test_attention.py")),
    Mutant("mean-pool-interleaved", "helpers/attention.py",
           "grouped = weight.reshape(n_kv_heads, n_heads // n_kv_heads, head_dim, *weight.shape[1:])\n"
           "    return grouped.mean(dim=1)",
           "grouped = weight.reshape(n_heads // n_kv_heads, n_kv_heads, head_dim, *weight.shape[1:])\n"
           "    return grouped.mean(dim=0)",
           ("tests/test_gqa.py",)),
]


def check_snippets(mutants: list[Mutant] = MUTANTS, root: Path = ROOT) -> list[str]:
    """Problems with the mutant list: unknown names twice, snippets not found exactly once."""
    problems, names = [], set()
    for mutant in mutants:
        if mutant.name in names:
            problems.append(f"{mutant.name}: the name is used twice")
        names.add(mutant.name)
        text = (root / mutant.path).read_text(encoding="utf-8")
        count = text.count(mutant.old)
        if count != 1:
            problems.append(f"{mutant.name}: its snippet occurs {count} times in {mutant.path}")
        for test in mutant.tests:
            if not (root / test).is_file():
                problems.append(f"{mutant.name}: no test file {test}")
    return problems


def _scratch_copy(target: Path) -> None:
    """The parts of the course a test run needs: the package, the tests, the lessons."""
    for name in ("helpers", "tests", "solutions", "notebooks"):
        shutil.copytree(ROOT / name, target / name,
                        ignore=shutil.ignore_patterns("__pycache__", "artifacts"))
    shutil.copy2(ROOT / "pyproject.toml", target / "pyproject.toml")
    hide = target / "no-transformers" / "transformers"  # import transformers fails in the run
    hide.mkdir(parents=True)
    (hide / "__init__.py").write_text("raise ImportError('hidden by the mutation check')\n")


def run_mutant(mutant: Mutant) -> tuple[Mutant, bool, float, str]:
    """Apply ``mutant`` in a scratch copy and run its tests: (mutant, noticed, seconds, tail)."""
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"mutant-{mutant.name}-") as scratch:
        target = Path(scratch)
        _scratch_copy(target)
        path = target / mutant.path
        path.write_text(path.read_text(encoding="utf-8").replace(mutant.old, mutant.new, 1),
                        encoding="utf-8")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(target / "no-transformers"),
                                                            str(target)]),
                   OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONDONTWRITEBYTECODE="1")
        result = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:xdist",
                                 "-p", "no:cacheprovider", *mutant.tests],
                                cwd=target, env=env, capture_output=True, text=True)
    tail = (result.stdout + result.stderr).strip().splitlines()[-1:] or [""]
    noticed = result.returncode == 1  # 1: tests failed; 0: all passed; other: could not run
    if result.returncode not in (0, 1):
        tail = [f"pytest exited {result.returncode}: " + tail[0]]
    return mutant, noticed, time.monotonic() - started, tail[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="mutants to run (default: all)")
    parser.add_argument("--jobs", type=int, default=2, help="mutants run at once (default 2)")
    args = parser.parse_args(argv)
    problems = check_snippets()
    if problems:
        print("\n".join(problems))
        return 2
    chosen = [m for m in MUTANTS if not args.names or m.name in args.names]
    unknown = set(args.names) - {m.name for m in MUTANTS}
    if unknown:
        print(f"unknown mutants: {', '.join(sorted(unknown))}")
        return 2
    started = time.monotonic()
    missed = []
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for mutant, noticed, seconds, tail in pool.map(run_mutant, chosen):
            print(f"{'noticed' if noticed else 'MISSED '}  {mutant.name:<42} {seconds:5.1f} s  {tail}",
                  flush=True)
            if not noticed:
                missed.append(mutant.name)
    print(f"\n{len(chosen)} mutants injected, {len(chosen) - len(missed)} noticed, "
          f"{len(missed)} missed, {time.monotonic() - started:.0f} s")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
