"""Mutation check: inject small, plausible mistakes into ``helpers`` one at a time and make
sure the test suite notices each of them.

    python tests/mutants.py                 every mutant, two at a time
    python tests/mutants.py --jobs 1 rmsnorm-eps-outside-sqrt   the ones named

Each mutant replaces one snippet of one file (the snippet must occur exactly once, which
``tests/test_mutants.py`` checks in the ordinary suite) in a scratch copy of the course, then
runs the tests it names there (test files, or single tests as ``file::name``: the fewest
that notice it, so that the whole check stays a few minutes), without Hugging Face
(``transformers`` is hidden), so that the course's own tests, not only the external oracles,
catch it. A mutant that passes every test it names is a hole in the suite: the run fails and
names it. First the unmutated course must pass all the tests named (a test that fails anyway
would seem to notice its mutants). The last line says how many mutants were injected and
noticed, the time and the load.
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
    """One injected mistake: in ``path`` replace ``old`` by ``new``; ``tests`` (files, or
    ``file::test`` for one test of a file) should fail."""

    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTANTS = [
    Mutant("rmsnorm-eps-outside-sqrt", "helpers/transformer.py",
           "normed = wide * torch.rsqrt(wide.pow(2).mean(dim=-1, keepdim=True) + self.eps)",
           "normed = wide / (torch.sqrt(wide.pow(2).mean(dim=-1, keepdim=True)) + self.eps)",
           ("tests/test_model_probes.py::test_rmsnorm_is_the_formula_where_eps_matters",)),
    Mutant("attention-no-float32-upcast", "helpers/attention.py",
           "compute = torch.float32 if q.dtype in _LOW_PRECISION else q.dtype",
           "compute = q.dtype",
           ("tests/test_model_probes.py::test_half_precision_attention_is_exactly_rounded",)),
    Mutant("top-k-threshold-from-the-max", "helpers/transformer.py",
           "kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]",
           "kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, :1]",
           ("tests/test_model_probes.py::test_top_k_keeps_exactly_the_k_largest_and_renormalises",)),
    Mutant("t5-bucket-direction-includes-zero", "helpers/transformer.py",
           "bucket = bucket + (relative_position > 0).long() * num_buckets",
           "bucket = bucket + (relative_position >= 0).long() * num_buckets",
           ("tests/test_model_probes.py::test_t5_buckets_match_the_definition_worked_by_hand",)),
    Mutant("t5-bucket-rounds-instead-of-truncating", "helpers/transformer.py",
           "large = max_exact + (log_ratio * (num_buckets - max_exact)).long()",
           "large = max_exact + (log_ratio * (num_buckets - max_exact)).round().long()",
           ("tests/test_model_probes.py::test_t5_buckets_match_the_definition_worked_by_hand",)),
    Mutant("gpt-padding-mask-dropped", "helpers/transformer.py",
           "mask = real[:, None, None, :]  # (B, 1, 1, S)",
           "mask = None",
           ("tests/test_model_probes.py::test_gpt_padding_hides_the_padded_keys",)),
    Mutant("gpt-padding-mask-on-queries", "helpers/transformer.py",
           "mask = real[:, None, None, :]  # (B, 1, 1, S)",
           "mask = real[:, None, :, None]",
           ("tests/test_model_probes.py::test_gpt_padding_hides_the_padded_keys",)),
    Mutant("gpt-cache-sees-padding", "helpers/transformer.py",
           "positions = torch.where(real[:, -L:], position_ids.expand(B, L), -1)  # (B, L)",
           "positions = position_ids.expand(B, L)",
           ("tests/test_kv_cache.py::test_batched_prompts_of_different_lengths_equal_one_by_one",)),
    Mutant("causal-mask-top-left", "helpers/attention.py",
           "return torch.ones(L, S, dtype=torch.bool, device=device).tril(S - L)",
           "return torch.ones(L, S, dtype=torch.bool, device=device).tril()",
           ("tests/test_attention.py::test_causal_mask_bottom_right",)),
    Mutant("attention-scale-forgotten", "helpers/attention.py",
           "scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale",
           "scale = 1.0 if scale is None else scale",
           ("tests/test_attention.py::test_sdpa_matches_torch",)),
    Mutant("kv-cache-overwrites-the-last-token", "helpers/kv_cache.py",
           "self.data[:, :, self.length:end] = x",
           "self.data[:, :, max(self.length - 1, 0):end - 1 if self.length else end] = x",
           ("tests/test_kv_cache.py::test_update_returns_everything_in_order_across_growth",)),
    Mutant("kv-cache-growth-loses-the-past", "helpers/kv_cache.py",
           "grown[:, :, :self.length] = self.data[:, :, :self.length]",
           "grown[:, :, :self.length] = 0",
           ("tests/test_kv_cache.py::test_update_returns_everything_in_order_across_growth",)),
    Mutant("quantize-floors", "helpers/kv_cache.py",
           "codes = ((x32 - low) / safe).round().clamp(0, levels).to(torch.uint8)",
           "codes = ((x32 - low) / safe).floor().clamp(0, levels).to(torch.uint8)",
           ("tests/test_kv_cache.py::test_quantization_error_is_at_most_half_a_step",)),
    Mutant("kivi-keys-per-token", "helpers/kv_cache.py",
           "codes, scale, zero = quantize(groups, dim=-2, bits=self.bits)  # one scale per channel",
           "codes, scale, zero = quantize(groups, dim=-1, bits=self.bits)",
           ("tests/test_kv_cache.py::test_kivi_stores_what_the_paper_says",)),
    Mutant("sink-cache-forgets-the-sinks", "helpers/kv_cache.py",
           "wanted = (positions >= 0) & ((positions < n_sinks) | (positions > newest - window))",
           "wanted = (positions >= 0) & (positions > newest - window)",
           ("tests/test_kv_cache.py::test_sink_cache_keeps_exactly_the_sinks_and_the_window",)),
    Mutant("heavy-hitters-forget-the-recent", "helpers/kv_cache.py",
           "priority = torch.where(positions > newest - n_recent, float(\"inf\"), scores.float())",
           "priority = scores.float()",
           ("tests/test_kv_cache.py::test_heavy_hitter_cache_keeps_the_recent_and_the_most_attended",)),
    Mutant("heavy-hitters-ignore-the-group", "helpers/kv_cache.py",
           "received = received.reshape(B, H_kv, -1, S).sum(dim=2)  # (B, H_kv, S): over the group",
           "received = received.reshape(B, H_kv, -1, S)[:, :, 0]",
           ("tests/test_kv_cache.py::test_heavy_hitter_cache_keeps_the_recent_and_the_most_attended",)),
    Mutant("kv-cache-copies-the-past-every-step", "helpers/kv_cache.py",
           "if self.data is None or self.data.shape[2] < end:", "if True:",
           ("tests/test_kv_cache.py::test_appending_one_token_does_not_copy_the_past",)),
    Mutant("kv-cache-grows-one-slot-at-a-time", "helpers/kv_cache.py",
           "capacity *= 2", "capacity += 1",
           ("tests/test_kv_cache.py::test_update_returns_everything_in_order_across_growth",)),
    Mutant("quantize-scale-over-2-to-the-bits", "helpers/kv_cache.py",
           "scale = (high - low) / levels", "scale = (high - low) / (levels + 1)",
           ("tests/test_kv_cache.py::test_quantization_error_is_at_most_half_a_step",)),
    Mutant("int4-nibbles-swapped", "helpers/kv_cache.py",
           "return codes[..., 0::2] | (codes[..., 1::2] << 4)",
           "return (codes[..., 0::2] << 4) | codes[..., 1::2]",
           ("tests/test_kv_cache.py::test_int4_packing_puts_two_codes_in_a_byte",)),
    Mutant("kivi-values-per-channel", "helpers/kv_cache.py",
           "codes, scale, zero = quantize(v_recent[:, :, :old], dim=-1, bits=self.bits)",
           "codes, scale, zero = quantize(v_recent[:, :, :old], dim=-2, bits=self.bits)",
           ("tests/test_kv_cache.py::test_kivi_stores_what_the_paper_says",)),
    Mutant("kivi-recent-values-one-too-few", "helpers/kv_cache.py",
           "old = max(0, v_recent.shape[2] - self.residual)",
           "old = max(0, v_recent.shape[2] - self.residual + 1)",
           ("tests/test_kv_cache.py::test_kivi_stores_what_the_paper_says",)),
    Mutant("sink-cache-one-sink-too-many", "helpers/kv_cache.py",
           "(positions < n_sinks) | (positions > newest - window)",
           "(positions <= n_sinks) | (positions > newest - window)",
           ("tests/test_kv_cache.py::test_sink_cache_keeps_exactly_the_sinks_and_the_window",)),
    Mutant("sink-cache-window-one-too-long", "helpers/kv_cache.py",
           "(positions < n_sinks) | (positions > newest - window)",
           "(positions < n_sinks) | (positions >= newest - window)",
           ("tests/test_kv_cache.py::test_sink_cache_keeps_exactly_the_sinks_and_the_window",)),
    Mutant("heavy-hitters-recent-window-one-too-long", "helpers/kv_cache.py",
           "torch.where(positions > newest - n_recent,",
           "torch.where(positions >= newest - n_recent,",
           ("tests/test_kv_cache.py::test_heavy_hitter_cache_keeps_the_recent_and_the_most_attended",)),
    Mutant("heavy-hitters-scores-not-accumulated", "helpers/kv_cache.py",
           "            received[:, :, :old.shape[2]] += old\n", "",
           ("tests/test_kv_cache.py::test_heavy_hitter_cache_keeps_the_recent_and_the_most_attended",)),
    Mutant("heavy-hitters-scores-not-evicted-with-their-tokens", "helpers/kv_cache.py",
           "self._scores[layer] = received.gather(2, keep)",
           "self._scores[layer] = received[:, :, :keep.shape[-1]]",
           ("tests/test_kv_cache.py::test_heavy_hitter_cache_keeps_the_recent_and_the_most_attended",)),
    Mutant("heavy-hitters-keep-padding", "helpers/kv_cache.py",
           "priority = torch.where(positions < 0, float(\"-inf\"), priority)",
           "priority = priority",
           ("tests/test_kv_cache.py::test_padding_is_evicted_first_whatever_its_position_or_score",)),
    Mutant("cache-masks-position-zero-as-padding", "helpers/transformer.py",
           "return (keys >= 0)[:, :, None, :]", "return (keys > 0)[:, :, None, :]",
           ("tests/test_kv_cache.py::test_batched_prompts_of_different_lengths_equal_one_by_one",)),
    Mutant("gpt-generate-positions-count-the-padding", "helpers/transformer.py",
           "position_ids = (real.long().cumsum(dim=1) - 1).clamp(min=0)",
           "position_ids = torch.arange(total, device=idx.device).expand(B, total)",
           ("tests/test_kv_cache.py::test_batched_prompts_of_different_lengths_equal_one_by_one",)),
    Mutant("gpt-h2o-prefill-not-causal", "helpers/transformer.py",
           "    if is_causal:\n        mask = causal_mask(q.shape[2], k.shape[2], device=q.device)\n",
           "",
           ("tests/test_kv_cache.py::test_caches_with_room_for_everything_generate_like_the_full_cache",)),
    Mutant("llama-h2o-ignores-the-window", "helpers/transformer.py",
           "allowed = (causal_mask(L, S, device=q.device) if window is None",
           "allowed = (causal_mask(L, S, device=q.device) if True",
           ("tests/test_llama_probes.py::test_every_cache_with_room_for_everything_generates_like_no_cache",)),
    Mutant("ring-gradients-not-passed-on", "helpers/ring.py",
           "dk, dv = dk + dk_dv[0], dv + dk_dv[1]",
           "dk, dv = dk, dv",
           ("tests/test_ring.py::test_real_ring_equals_full_attention_and_its_gradients",)),
    Mutant("ring-causal-mask-of-the-wrong-block", "helpers/ring.py",
           "k_pos[(ring.rank - step) % ring.size]",
           "k_pos[(ring.rank + step) % ring.size]",
           ("tests/test_ring.py::test_real_ring_equals_full_attention_and_its_gradients",)),
    Mutant("linear-chunks-count-their-own-keys-twice", "helpers/linear_attention.py",
           "state_before = chunk_state.cumsum(dim=-3) - chunk_state",
           "state_before = chunk_state.cumsum(dim=-3)",
           ("tests/test_linear_attention.py::test_every_form_equals_softmax_attention_on_log_similarities",)),
    Mutant("linear-parallel-not-causal", "helpers/linear_attention.py",
           "similarity = similarity * causal_mask(L, S, device=phi_q.device)",
           "similarity = similarity * causal_mask(S, L, device=phi_q.device).T",
           ("tests/test_linear_attention.py::test_every_form_equals_softmax_attention_on_log_similarities",)),
    Mutant("rope-rotates-the-wrong-way", "helpers/rope.py",
           "return torch.cat([-x2, x1], dim=-1)",
           "return torch.cat([x2, -x1], dim=-1)",
           ("tests/test_rope.py::test_rotate_half_pairs_the_two_halves",)),
    Mutant("rope-frequencies-twice-too-slow", "helpers/rope.py",
           ".float() / head_dim", ".float() / (2 * head_dim)",
           ("tests/test_rope.py::test_rotate_half_pairs_the_two_halves",)),
    Mutant("llama-keys-not-rotated", "helpers/transformer.py",
           "k = apply_rope(split_heads(attn.k_proj(x), attn.n_kv_heads), cos, sin)",
           "k = split_heads(attn.k_proj(x), attn.n_kv_heads)",
           ("tests/test_llama_probes.py::test_logits_do_not_depend_on_where_the_sequence_starts",)),
    Mutant("llama-positions-restart-after-the-cache", "helpers/transformer.py",
           "start = cache.seq_len if cache is not None else 0\n"
           "        positions = torch.arange(start, start + idx.shape[1], device=idx.device)",
           "start = 0\n"
           "        positions = torch.arange(start, start + idx.shape[1], device=idx.device)",
           ("tests/test_llama_probes.py::test_cached_generation_equals_rerunning_the_sequence",)),
    Mutant("llama-window-ignored-in-prefill", "helpers/transformer.py",
           "mask = sliding_window_mask(L, window, device=q.device, S=S)  # (L, S)",
           "mask = causal_mask(L, S, device=q.device)  # (L, S)",
           ("tests/test_llama_probes.py::test_cached_generation_equals_rerunning_the_sequence",)),
    Mutant("sliding-window-one-key-too-many", "helpers/attention.py",
           "return (j <= i) & ((j > i - window) | (j < n_global))",
           "return (j <= i) & ((j >= i - window) | (j < n_global))",
           ("tests/test_sliding_window.py::test_mask_against_loop",)),
    Mutant("banded-padding-keys-visible", "helpers/sliding_window.py",
           "mask = band & real", "mask = band",
           ("tests/test_sliding_window.py::test_banded_equals_sdpa_with_the_mask",)),
    Mutant("repeat-kv-interleaved", "helpers/attention.py",
           "return x[:, :, None].expand(B, H_kv, n_rep, S, D).reshape(B, H_kv * n_rep, S, D)",
           "return x[:, None].expand(B, n_rep, H_kv, S, D).reshape(B, H_kv * n_rep, S, D)",
           ("tests/test_gqa.py::test_repeat_kv_is_blocked_like_repeat_interleave",)),
    Mutant("mean-pool-interleaved", "helpers/attention.py",
           "grouped = weight.reshape(n_kv_heads, n_heads // n_kv_heads, head_dim, *weight.shape[1:])\n"
           "    return grouped.mean(dim=1)",
           "grouped = weight.reshape(n_heads // n_kv_heads, n_kv_heads, head_dim, *weight.shape[1:])\n"
           "    return grouped.mean(dim=0)",
           ("tests/test_gqa.py::test_mean_pool_heads_averages_each_block_of_heads",)),
    # --- state space models (lesson 10) ---
    Mutant("ssm-zoh-b-bar-is-euler", "helpers/ssm.py",
           "B_bar = delta * B if simplified else _expm1_over_x(dA) * delta * B",
           "B_bar = delta * B",
           ("tests/test_ssm.py::test_zoh_equals_the_matrix_exponential",)),
    Mutant("ssm-scan-combines-in-the-wrong-order", "helpers/ssm.py",
           "h_odd = _odd_even_scan(a_even * a_odd, torch.addcmul(b_odd, a_odd, b_even))",
           "h_odd = _odd_even_scan(a_even * a_odd, torch.addcmul(b_even, a_even, b_odd))",
           ("tests/test_ssm.py::test_scans_solve_the_recurrence",)),
    Mutant("ssm-chunk-state-enters-undecayed", "helpers/ssm.py",
           "Bu[:, 0] += A_bar[:, 0] * h", "Bu[:, 0] += h",
           ("tests/test_ssm.py::test_parallel_selective_scan_equals_sequential_with_gradients",)),
    Mutant("ssm-d-skip-dropped", "helpers/ssm.py",
           "y = y + D.to(work) * u_t", "y = y",
           ("tests/test_ssm.py::test_selective_scan_equals_the_paper_written_out",)),
    Mutant("ssm-decoding-step-d-skip-dropped", "helpers/ssm.py",
           "    if D is not None:\n        y = y + D.to(work) * u\n    return y.to(dtype), state",
           "    return y.to(dtype), state",
           ("tests/test_ssm.py::test_selective_scan_continues_from_a_state",)),
    Mutant("ssm-conv-state-keeps-the-oldest-inputs", "helpers/ssm.py",
           "state.conv = padded[..., padded.shape[-1] - (self.d_conv - 1):]",
           "state.conv = padded[..., :self.d_conv - 1]",
           ("tests/test_ssm.py::test_state_continuation_equals_one_pass",)),
    Mutant("ssm-segment-sum-includes-the-start", "helpers/ssm.py",
           "below = torch.ones(L, L, dtype=torch.bool, device=x.device).tril(-1)",
           "below = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()",
           ("tests/test_ssm.py::test_segment_sum_equals_differences_of_prefix_sums",)),
    Mutant("ssm-from-hf-final-norm-of-the-first-layer", "helpers/ssm.py",
           '"norm.weight": hf["backbone.norm_f.weight"]',
           '"norm.weight": hf["backbone.layers.0.norm.weight"]',
           ("tests/test_ssm.py::test_from_hf_puts_every_hugging_face_weight_in_its_place",)),
    Mutant("ssm-from-hf-always-tied", "helpers/ssm.py",
           "tie_embeddings=c.tie_word_embeddings)", "tie_embeddings=True)",
           ("tests/test_ssm.py::test_from_hf_puts_every_hugging_face_weight_in_its_place",)),
    # --- FlashAttention (lesson 06) ---
    Mutant("flash-merge-forgets-to-rescale", "helpers/flash.py",
           "return out_a * share_a + out_b * share_b, lse",
           "return out_a + out_b * share_b, lse",
           ("tests/test_flash_blocks.py",)),
    Mutant("flash-running-sum-not-rescaled", "helpers/flash.py",
           "l.mul_(alpha).add_(p.sum(dim=-1, keepdim=True))",
           "l.add_(p.sum(dim=-1, keepdim=True))",
           ("tests/test_flash.py::test_forward_matches_sdpa",)),
    Mutant("flash-causal-forward-skips-the-diagonal-key", "helpers/flash.py",
           "return S if not causal else min(S, max(0, S - L + q_end))",
           "return S if not causal else min(S, max(0, S - L + q_end - 1))",
           ("tests/test_flash.py::test_forward_matches_sdpa",)),
    Mutant("flash-causal-backward-skips-the-diagonal-block", "helpers/flash.py",
           "first = max(0, k_start - (S - L)) // block_q * block_q if causal else 0",
           "first = (max(0, k_start - (S - L)) // block_q + 1) * block_q if causal else 0",
           ("tests/test_flash.py::test_backward_matches_autograd_through_sdpa",)),
    Mutant("flash-backward-delta-without-the-output", "helpers/flash.py",
           "delta = (dout * out).sum(dim=-1)", "delta = dout.sum(dim=-1)",
           ("tests/test_flash.py::test_backward_matches_autograd_through_sdpa",)),
    Mutant("flash-block-backward-forgets-delta", "helpers/flash.py",
           "ds = p * (dout @ v.transpose(-2, -1) - delta[..., None])",
           "ds = p * (dout @ v.transpose(-2, -1))",
           ("tests/test_flash_blocks.py",)),
    # --- linear attention (lesson 08) ---
    Mutant("linear-feature-map-relu", "helpers/linear_attention.py",
           "return F.elu(x) + 1", "return F.relu(x) + 1",
           ("tests/test_linear_attention.py::test_not_causal_is_the_plain_formula",)),
    Mutant("linear-parallel-not-normalised", "helpers/linear_attention.py",
           "return _normalise(similarity @ v, similarity.sum(-1))", "return similarity @ v",
           ("tests/test_linear_attention.py::test_causal_is_the_masked_plain_formula",)),
    Mutant("linear-chunked-normaliser-forgets-earlier-chunks", "helpers/linear_attention.py",
           "normaliser = within.sum(-1) + (q_c * z_before[..., None, :]).sum(-1)",
           "normaliser = within.sum(-1)",
           ("tests/test_linear_attention.py::test_chunked_form_any_chunk_size_with_a_ragged_last_chunk",)),
    Mutant("linear-chunked-queries-aligned-top-left", "helpers/linear_attention.py",
           "phi_q = F.pad(phi_q, (0, 0, S - L, 0))", "phi_q = F.pad(phi_q, (0, 0, 0, S - L))",
           ("tests/test_linear_attention.py::test_every_form_equals_softmax_attention_on_log_similarities",)),
    # --- ring attention (lesson 08) ---
    Mutant("ring-zigzag-late-chunks-in-rank-order", "helpers/ring.py",
           "return torch.cat([chunks[:world_size], chunks.flip(0)[:world_size]], dim=1)",
           "return torch.cat([chunks[:world_size], chunks[world_size:]], dim=1)",
           ("tests/test_ring.py::test_layouts_hold_the_tokens_their_papers_say",)),
    # --- BERT, GPT, T5 (lesson 05) and Llama (lesson 07) ---
    Mutant("block-post-ln-normalises-the-branch-only", "helpers/transformer.py",
           "return norm(x + self.dropout(branch(x)))",
           "return x + self.dropout(norm(branch(x)))",
           ("tests/test_transformer.py::test_block_matches_torch_encoder_layer_with_padding",)),
    Mutant("bert-blocks-pre-ln", "helpers/transformer.py",
           "TransformerBlock(d_model, n_heads, d_ff, dropout=dropout, norm_first=False,",
           "TransformerBlock(d_model, n_heads, d_ff, dropout=dropout, norm_first=True,",
           ("tests/test_model_probes.py::test_bert_encoder_is_embeddings_then_torch_post_ln_encoder_layers",)),
    Mutant("t5-tied-output-not-scaled", "helpers/transformer.py",
           "h = h * self.d_model ** -0.5", "h = h",
           ("tests/test_model_probes.py::test_t5_scales_the_decoder_output_only_when_the_head_is_tied",)),
    Mutant("gpt-head-not-tied", "helpers/transformer.py",
           "        self.lm_head.weight = self.token_embedding.weight  # tied\n", "",
           ("tests/test_transformer.py::test_gpt_shapes_and_tied_head",)),
    Mutant("swiglu-gate-and-up-swapped", "helpers/transformer.py",
           "return self.down(self.activation(self.gate(x)) * self.up(x))",
           "return self.down(self.gate(x) * self.activation(self.up(x)))",
           ("tests/test_model_probes.py::test_swiglu_gates_with_the_gate_projection",)),
    Mutant("llama-rope-head-dim-from-d-model", "helpers/transformer.py",
           "self.head_dim = self.blocks[0].attn.head_dim", "self.head_dim = d_model // n_heads",
           ("tests/test_llama_probes.py::test_llama_equals_llama_written_out_by_hand",)),
    Mutant("llama-head-dim-not-passed-to-the-blocks", "helpers/transformer.py",
           "LlamaBlock(d_model, n_heads, n_kv_heads, d_ff, head_dim, window=window,",
           "LlamaBlock(d_model, n_heads, n_kv_heads, d_ff, None, window=window,",
           ("tests/test_llama_probes.py::test_llama_equals_llama_written_out_by_hand",)),
    # --- the RNN of lesson 01 ---
    Mutant("rnn-recurrent-weight-not-transposed", "helpers/rnn.py",
           "return torch.tanh(x_t @ W_x.T + h_prev @ W_h.T + b)",
           "return torch.tanh(x_t @ W_x.T + h_prev @ W_h + b)",
           ("tests/test_rnn.py::test_rnn_cell_matches_torch_rnn_cell",)),
    Mutant("rnn-gradient-norms-forget-the-tanh-derivative", "helpers/rnn.py",
           "to_state = to_preactivation @ W_h", "to_state = to_state @ W_h",
           ("tests/test_rnn.py::test_gradient_norms_match_autograd_jacobian",)),
    Mutant("rnn-recall-accuracy-scores-every-position", "helpers/rnn.py",
           "return float((predictions == targets)[scored].float().mean())",
           "return float((predictions == targets).float().mean())",
           ("tests/test_rnn.py::test_recall_accuracy_scores_only_the_positions_with_an_answer",)),
    # --- the synthetic tasks ---
    Mutant("tasks-recall-looks-ahead", "helpers/tasks.py",
           "targets = tokens.roll(distance, dims=1)", "targets = tokens.roll(-distance, dims=1)",
           ("tests/test_tasks.py::test_recall_targets_are_the_token_seen_distance_steps_ago",)),
    Mutant("tasks-previous-token-is-the-next", "helpers/tasks.py",
           "torch.full((batch, 1), IGNORE_INDEX), tokens[:, :-1]]",
           "torch.full((batch, 1), IGNORE_INDEX), tokens[:, 1:]]",
           ("tests/test_tasks.py::test_previous_and_first_token_targets",)),
    Mutant("tasks-translation-last-odd-word-swapped-with-padding", "helpers/tasks.py",
           "alignment = torch.where(partner[None, :] < lengths[:, None], partner, positions)",
           "alignment = torch.where(partner[None, :] <= lengths[:, None], partner, positions)",
           ("tests/test_tasks.py::test_translation_layout_padding_and_alignment",)),
    Mutant("tasks-translation-dictionary-drawn-per-call", "helpers/tasks.py",
           "2 + torch.randperm(n_words, generator=fixed)",
           "2 + torch.randperm(n_words, generator=generator)",
           ("tests/test_tasks.py::test_translation_is_one_fixed_dictionary_for_every_call",)),
    Mutant("tasks-palindrome-not-mirrored", "helpers/tasks.py",
           "tokens = torch.cat([cls, first, first.flip(1), sep], dim=1)",
           "tokens = torch.cat([cls, first, first, sep], dim=1)",
           ("tests/test_tasks.py::test_palindromes_are_cls_word_mirror_sep",)),
    Mutant("tasks-copy-targets-not-shifted", "helpers/tasks.py",
           "return sequence[:, :-1].to(device), sequence[:, 1:].to(device)",
           "return sequence[:, :-1].to(device), sequence[:, :-1].to(device)",
           ("tests/test_tasks.py::test_copy_sequences_are_word_sep_word_read_one_step_ahead",)),
    Mutant("tasks-reverse-the-whole-padded-row", "helpers/tasks.py",
           "source = (lengths[:, None] - 1 - positions).clamp(min=0)",
           "source = (words.shape[1] - 1 - positions).expand(len(lengths), -1)",
           ("tests/test_tasks.py::test_text_to_text_inputs_and_labels",)),
    Mutant("tasks-shift-right-keeps-ignore", "helpers/tasks.py",
           "return shifted.masked_fill(shifted == IGNORE_INDEX, pad_id)", "return shifted",
           ("tests/test_tasks.py::test_shift_right_edge_cases",)),
    Mutant("tasks-mlm-masks-specials", "helpers/tasks.py",
           "chosen &= ~torch.isin(tokens, specials)", "chosen &= True",
           ("tests/test_tasks.py::test_mask_tokens_p_one_chooses_every_content_token_and_no_special",)),
    Mutant("tasks-mlm-labels-only-where-masked", "helpers/tasks.py",
           "labels = torch.where(chosen, tokens.long(), IGNORE_INDEX)",
           "labels = torch.where(chosen & (action < 0.8), tokens.long(), IGNORE_INDEX)",
           ("tests/test_tasks.py::test_mask_tokens_p_one_chooses_every_content_token_and_no_special",)),
    # --- grading ---
    Mutant("grading-failed-reads-as-graded", "helpers/course/autograde.py",
           'submission.flag("failed", f"nbgrader could not grade it',
           'submission.flag("graded", f"nbgrader could not grade it',
           ("tests/test_grading_units.py::test_a_notebook_nbgrader_could_not_grade_is_failed_with_its_log_kept",)),
    Mutant("grading-failed-not-graded-again", "helpers/course/autograde.py",
           '                and "failed" not in before.status.split("+") \\\n', "",
           ("tests/test_grading_units.py::test_a_rerun_grades_again_what_failed_or_lost_its_feedback_and_nothing_else",)),
    Mutant("grading-zip-paths-not-checked", "helpers/course/submissions.py",
           "if not (target / member.filename).resolve().is_relative_to(root):", "if False:",
           ("tests/test_grading_units.py::test_a_zip_with_a_path_out_of_its_folder_is_skipped_whole",)),
    Mutant("grading-summary-hides-missing-lessons", "helpers/course/autograde.py",
           'if part != "graded"})', 'if part not in ("graded", "missing")})',
           ("tests/test_grading_units.py::test_summary_table_has_a_line_per_student_a_column_per_lesson_and_the_total",)),
    Mutant("grading-cli-prints-every-warning", "helpers/course/cli.py",
           "for line in skipped[:20]:", "for line in skipped:",
           ("tests/test_grading_units.py::test_the_cli_shows_twenty_warnings_counts_the_rest_and_fails_when_nobody_was_graded",)),
    Mutant("hybrid-layer-slots-shared-across-kinds", "helpers/hybrid.py",
           "        plan.append((kind, seen[kind]))\n        seen[kind] += 1",
           "        plan.append((kind, sum(seen.values())))\n        seen[kind] += 1",
           ("tests/test_hybrid.py::test_layer_plan_gives_each_layer_its_slot_among_its_kind",)),
    Mutant("hybrid-cache-position-not-advanced", "helpers/hybrid.py",
           "            cache.seq_len += idx.shape[1]",
           "            cache.seq_len += 0",
           ("tests/test_hybrid.py::test_forward_in_pieces_on_one_cache_equals_one_pass",)),
    Mutant("hybrid-linear-state-normaliser-forgets-the-past", "helpers/hybrid.py",
           "normaliser = within.sum(-1) + (phi_q * state.k_sum[..., None, :]).sum(-1)",
           "normaliser = within.sum(-1) + 0 * (phi_q * state.k_sum[..., None, :]).sum(-1)",
           ("tests/test_hybrid.py::test_forward_in_pieces_on_one_cache_equals_one_pass",)),
    Mutant("hybrid-linear-memory-without-the-normaliser", "helpers/hybrid.py",
           "(c.head_dim ** 2 + c.head_dim) * bytes_per_elem",
           "(c.head_dim ** 2) * bytes_per_elem",
           ("tests/test_hybrid.py::test_decode_memory_formula_equals_what_a_real_cache_holds",)),
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
            file, _, function = test.partition("::")
            if not (root / file).is_file():
                problems.append(f"{mutant.name}: no test file {file}")
                continue
            source = (root / file).read_text(encoding="utf-8")
            if function and f"def {function.split('[')[0]}(" not in source:
                problems.append(f"{mutant.name}: no test {function} in {file}")
            if "import transformers" in source or "from transformers" in source:
                problems.append(f"{mutant.name}: {file} needs Hugging Face, which the check "
                                "hides: it would fail and seem to notice any mutant")
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


def _run(mutant: Mutant, timeout_s: float) -> tuple[int | None, list[str]]:
    """Apply ``mutant`` in a scratch copy and run its tests there: pytest's exit code (None
    when it ran past ``timeout_s``) and its output lines."""
    with tempfile.TemporaryDirectory(prefix=f"mutant-{mutant.name}-") as scratch:
        target = Path(scratch)
        _scratch_copy(target)
        path = target / mutant.path
        path.write_text(path.read_text(encoding="utf-8").replace(mutant.old, mutant.new, 1),
                        encoding="utf-8")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(target / "no-transformers"),
                                                            str(target)]),
                   OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONDONTWRITEBYTECODE="1")
        try:
            result = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-rf",
                                     "-p", "no:xdist", "-p", "no:cacheprovider", *mutant.tests],
                                    cwd=target, env=env, capture_output=True, text=True,
                                    timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None, []
    return result.returncode, (result.stdout + result.stderr).strip().splitlines() or [""]


def run_mutant(mutant: Mutant, timeout_s: float = 600) -> tuple[Mutant, bool, float, str]:
    """Apply ``mutant`` in a scratch copy and run its tests: (mutant, noticed, seconds, what
    happened: the test that failed first, or why nothing could)."""
    started = time.monotonic()
    code, lines = _run(mutant, timeout_s)
    seconds = time.monotonic() - started
    if code is None:
        return mutant, False, seconds, f"its tests ran past {timeout_s:.0f} s: name tests that fail fast"
    if code not in (0, 1):  # 1: tests failed; 0: all passed; other: could not run
        return mutant, False, seconds, f"pytest exited {code}: {lines[-1]}"
    failed = [line.split()[1] for line in lines if line.startswith("FAILED ")]
    return mutant, code == 1, seconds, f"by {failed[0]}" if code == 1 and failed else lines[-1]


def unmutated(mutants: list[Mutant], timeout_s: float = 1200) -> str | None:
    """Why the course as it is fails the tests the ``mutants`` name (None if it passes them):
    such a test would seem to notice every mutant that names it."""
    tests = tuple(dict.fromkeys(test for mutant in mutants for test in mutant.tests))
    code, lines = _run(Mutant("unmutated", "helpers/__init__.py", "", "", tests), timeout_s)
    if code == 0:
        return None
    if code is None:
        return f"they ran past {timeout_s:.0f} s"
    failed = [line for line in lines if line.startswith(("FAILED ", "ERROR "))]
    return (failed or lines)[0] if code == 1 else f"pytest exited {code}: {lines[-1]}"


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
    problem = unmutated(chosen)
    if problem:
        print(f"the course as it is fails a test that the mutants name ({problem}): fix that first")
        return 2
    missed = []
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for mutant, noticed, seconds, tail in pool.map(run_mutant, chosen):
            print(f"{'noticed' if noticed else 'MISSED '}  {mutant.name:<52} {seconds:5.1f} s  {tail}",
                  flush=True)
            if not noticed:
                missed.append(mutant.name)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    print(f"\n{len(chosen)} mutants injected, {len(chosen) - len(missed)} noticed, "
          f"{len(missed)} missed, {time.monotonic() - started:.0f} s on {args.jobs} jobs "
          f"(load average {load}, {os.cpu_count()} cores)")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
