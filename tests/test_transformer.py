"""helpers.transformer: blocks against PyTorch's own transformer layers, causality by
gradients, padding, generation (greedy, sampled, cached) and the error messages."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers.attention import MultiHeadAttention
from helpers.kv_cache import KVCache
from helpers.transformer import GPT, T5, BertEncoder, TransformerBlock, attention

D, H, V = 32, 4, 50
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def copy_attention(ours, theirs: nn.MultiheadAttention) -> None:
    """nn.MultiheadAttention's stacked in_proj (3d, d) into q_proj, k_proj, v_proj."""
    with torch.no_grad():
        for proj, w, b in zip((ours.q_proj, ours.k_proj, ours.v_proj),
                              theirs.in_proj_weight.chunk(3), theirs.in_proj_bias.chunk(3)):
            proj.weight.copy_(w)
            proj.bias.copy_(b)
        ours.out_proj.load_state_dict(theirs.out_proj.state_dict())


def torch_encoder_layer(norm_first: bool) -> tuple[TransformerBlock, nn.TransformerEncoderLayer]:
    """A random nn.TransformerEncoderLayer and our block holding the same weights."""
    torch.manual_seed(0)
    theirs = nn.TransformerEncoderLayer(D, H, dim_feedforward=48, dropout=0.0,
                                        activation="gelu", batch_first=True,
                                        norm_first=norm_first)
    with torch.no_grad():  # norms are ones and zeros when fresh: make a swap visible
        for p in theirs.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ours = TransformerBlock(D, H, d_ff=48, norm_first=norm_first)
    copy_attention(ours.attn, theirs.self_attn)
    for mine, other in ((ours.norm1, theirs.norm1), (ours.norm2, theirs.norm2),
                        (ours.mlp[0], theirs.linear1), (ours.mlp[2], theirs.linear2)):
        mine.load_state_dict(other.state_dict())
    return ours, theirs.train()  # train mode with dropout 0: PyTorch's exact slow path


@pytest.mark.parametrize("norm_first", [True, False])
def test_block_matches_torch_encoder_layer_with_padding(norm_first):
    ours, theirs = torch_encoder_layer(norm_first)
    x = torch.randn(3, 7, D)
    lengths = torch.tensor([7, 4, 2])
    real = torch.arange(7) < lengths[:, None]  # (B, L)
    got = ours(x, mask=real[:, None, None, :])
    expected = theirs(x, src_key_padding_mask=~real)
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)


def test_causal_block_matches_torch_encoder_layer_with_causal_mask():
    ours, theirs = torch_encoder_layer(norm_first=True)
    ours.causal = True
    x = torch.randn(2, 6, D)
    expected = theirs(x, src_mask=nn.Transformer.generate_square_subsequent_mask(6),
                      is_causal=True)
    torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=1e-5)


def test_cross_attention_block_matches_torch_decoder_layer():
    torch.manual_seed(1)
    theirs = nn.TransformerDecoderLayer(D, H, dim_feedforward=48, dropout=0.0,
                                        activation="gelu", batch_first=True, norm_first=True)
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ours = TransformerBlock(D, H, d_ff=48, causal=True, cross_attention=True)
    copy_attention(ours.attn, theirs.self_attn)
    copy_attention(ours.cross_attn, theirs.multihead_attn)
    for mine, other in ((ours.norm1, theirs.norm1), (ours.norm_cross, theirs.norm2),
                        (ours.norm2, theirs.norm3), (ours.mlp[0], theirs.linear1),
                        (ours.mlp[2], theirs.linear2)):
        mine.load_state_dict(other.state_dict())
    x, memory = torch.randn(2, 5, D), torch.randn(2, 8, D)
    memory_real = torch.arange(8) < torch.tensor([8, 3])[:, None]  # (B, S)
    expected = theirs.train()(x, memory, tgt_mask=nn.Transformer.generate_square_subsequent_mask(5),
                              tgt_is_causal=True, memory_key_padding_mask=~memory_real)
    got = ours(x, context=memory, context_mask=memory_real[:, None, None, :])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_block_defaults_and_errors():
    block = TransformerBlock(D, H)
    assert block.mlp[0].out_features == 4 * D and isinstance(block.mlp[1], nn.GELU)
    assert isinstance(block.norm1, nn.LayerNorm) and not hasattr(block, "cross_attn")
    assert block(torch.randn(2, 5, D)).shape == (2, 5, D)
    with pytest.raises(ValueError, match="context"):
        TransformerBlock(D, H, cross_attention=True)(torch.randn(2, 5, D))
    with pytest.raises(ValueError, match="activation"):
        TransformerBlock(D, H, activation="swish")


def test_attention_equals_multi_head_attention_and_scales():
    torch.manual_seed(10)
    mha = MultiHeadAttention(D, H)
    x, context = torch.randn(2, 5, D), torch.randn(2, 8, D)
    keep = torch.arange(8) < torch.tensor([8, 3])[:, None, None, None]  # (B, 1, 1, S)
    torch.testing.assert_close(attention(mha, x, context, mask=keep),
                               mha(x, context=context, mask=keep), atol=1e-6, rtol=1e-5)
    head_dim = D // H  # scale 1 on q equals the default scale on q * sqrt(head_dim)
    sharper = MultiHeadAttention(D, H)
    sharper.load_state_dict(mha.state_dict())
    with torch.no_grad():
        sharper.q_proj.weight.mul_(head_dim ** 0.5)
        sharper.q_proj.bias.mul_(head_dim ** 0.5)
    torch.testing.assert_close(attention(mha, x, context, scale=1.0), sharper(x, context=context),
                               atol=1e-5, rtol=1e-5)


def input_gradient_pattern(f, x: torch.Tensor) -> torch.Tensor:
    """(L, L) boolean: entry (i, j) says output position i depends on input position j."""
    L = x.shape[1]
    rows = []
    for i in range(L):
        x = x.detach().requires_grad_(True)
        f(x)[:, i].sum().backward()
        rows.append(x.grad.abs().sum(dim=(0, 2)) > 0)  # (L,)
    return torch.stack(rows)


@pytest.mark.parametrize("causal", [True, False])
def test_causality_by_gradients_block(causal):
    torch.manual_seed(2)
    block = TransformerBlock(D, H, causal=causal)
    pattern = input_gradient_pattern(block, torch.randn(2, 6, D))
    expected = torch.ones(6, 6, dtype=torch.bool)
    assert torch.equal(pattern, expected.tril() if causal else expected)


def test_causality_by_gradients_gpt():
    torch.manual_seed(3)
    model = GPT(V, D, n_layers=2, n_heads=H, max_len=16)
    embedded = []

    def keep_grad(module, inputs, output):  # the embeddings the blocks see, (B, L, d)
        output.retain_grad()
        embedded.append(output)

    model.token_embedding.register_forward_hook(keep_grad)
    idx = torch.randint(0, V, (2, 7))
    rows = []
    for i in range(7):
        model(idx)[:, i].sum().backward()
        rows.append(embedded.pop().grad.abs().sum(dim=(0, 2)) > 0)  # (L,)
    assert torch.equal(torch.stack(rows), torch.ones(7, 7, dtype=torch.bool).tril())


def test_t5_decoder_is_causal_and_encoder_padding_is_ignored():
    torch.manual_seed(4)
    model = T5(V, D, n_layers=2, n_heads=H, d_ff=48).eval()
    src, tgt = torch.randint(0, V, (2, 6)), torch.randint(0, V, (2, 5))
    real = torch.arange(6) < torch.tensor([6, 3])[:, None]  # (B, S)
    logits = model(src, tgt, attention_mask=real)
    changed_tgt = tgt.clone()
    changed_tgt[:, 3:] = (changed_tgt[:, 3:] + 1) % V
    changed_src = torch.where(real, src, (src + 1) % V)  # other tokens under the padding
    torch.testing.assert_close(model(src, changed_tgt, attention_mask=real)[:, :3], logits[:, :3])
    torch.testing.assert_close(model(changed_src, tgt, attention_mask=real), logits)
    assert not torch.allclose(model(changed_src, tgt)[1], model(src, tgt)[1])


def test_bert_padding_equals_shorter_sequence():
    torch.manual_seed(5)
    model = BertEncoder(V, D, n_layers=2, n_heads=H, max_len=16).eval()
    idx = torch.randint(0, V, (2, 9))
    real = torch.arange(9) < torch.tensor([9, 5])[:, None]
    hidden = model(idx, attention_mask=real)
    torch.testing.assert_close(hidden[1, :5], model(idx[1:, :5])[0], atol=1e-5, rtol=1e-5)
    unmasked = model(idx)
    assert not torch.allclose(unmasked[1, :5], hidden[1, :5], atol=1e-4)
    assert model.mlm_logits(hidden).shape == (2, 9, V)


@pytest.mark.parametrize("device", DEVICES)
def test_gpt_shapes_and_tied_head(device):
    model = GPT(V, D, n_layers=2, n_heads=H, max_len=16).to(device)
    assert model(torch.randint(0, V, (3, 10), device=device)).shape == (3, 10, V)
    assert model.lm_head.weight is model.token_embedding.weight
    with pytest.raises(ValueError, match=r"\(B, L\)"):
        model(torch.randint(0, V, (10,), device=device))
    with pytest.raises(ValueError, match="max_len"):
        model.generate(torch.zeros(1, 10, dtype=torch.long, device=device), 7)


def argmax_loop(forward, idx: torch.Tensor, steps: int) -> torch.Tensor:
    """The plainest greedy decoding: rerun the model, append the argmax of the last row."""
    for _ in range(steps):
        idx = torch.cat([idx, forward(idx)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("use_cache", [True, False])
def test_gpt_greedy_equals_argmax_loop(device, use_cache):
    torch.manual_seed(6)
    model = GPT(V, D, n_layers=2, n_heads=H, max_len=32).to(device).eval()
    idx = torch.randint(0, V, (3, 4), device=device)
    with torch.no_grad():
        expected = argmax_loop(model, idx, 12)
    assert torch.equal(model.generate(idx, 12, use_cache=use_cache), expected)


def test_gpt_cached_logits_equal_full_forward():
    torch.manual_seed(7)
    model = GPT(V, D, n_layers=2, n_heads=H, max_len=32).eval()
    idx = torch.randint(0, V, (2, 10))
    cache = KVCache(len(model.blocks), capacity=3)  # grows twice along the way
    with torch.no_grad():
        steps = [model(idx[:, :4], cache=cache)] + [
            model(idx[:, t:t + 1], cache=cache) for t in range(4, 10)]
        torch.testing.assert_close(torch.cat(steps, dim=1), model(idx), atol=1e-5, rtol=1e-5)
    assert cache.seq_len == cache.held(1) == 10


def test_gpt_sampling_is_reproducible_and_top_k_one_is_greedy():
    torch.manual_seed(8)
    model = GPT(V, D, n_layers=1, n_heads=H, max_len=32).eval()
    idx = torch.randint(0, V, (2, 3))

    def sample(seed: int, **kw) -> torch.Tensor:
        return model.generate(idx, 20, do_sample=True, temperature=2.0,
                              generator=torch.Generator().manual_seed(seed), **kw)

    assert torch.equal(sample(0), sample(0))
    assert not torch.equal(sample(0), sample(1))
    assert torch.equal(sample(0, use_cache=False), sample(0))
    assert torch.equal(sample(1, top_k=1), model.generate(idx, 20))


def test_t5_greedy_equals_argmax_loop():
    torch.manual_seed(9)
    model = T5(V, D, n_layers=2, n_heads=H, d_ff=48).eval()
    src = torch.randint(0, V, (2, 6))
    start = torch.zeros(2, 1, dtype=torch.long)
    with torch.no_grad():
        expected = argmax_loop(lambda tgt: model(src, tgt), start, 8)
    assert torch.equal(model.generate(src, 8), expected)


def test_t5_untied_head_is_separate():
    model = T5(V, D, n_layers=1, n_heads=H, d_ff=48, tie_word_embeddings=False)
    assert model.lm_head.weight is not model.shared.weight
    tied = T5(V, D, n_layers=1, n_heads=H, d_ff=48)
    assert tied.lm_head.weight is tied.shared.weight


def test_gpt_weights_are_stored_input_major_for_fast_decoding():
    """A decode step multiplies one row by each weight; (in, out) storage reads faster on CPU.
    The layout survives a dtype change and a state-dict round trip, and the values are those
    of an ordinary nn.Linear."""
    torch.manual_seed(10)
    model = GPT(V, D, n_layers=1, n_heads=H, max_len=16).double()
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    assert all(w.t().is_contiguous() for w in weights)
    assert model.lm_head.weight is model.token_embedding.weight
    copy = GPT(V, D, n_layers=1, n_heads=H, max_len=16).double()
    copy.load_state_dict(model.state_dict())
    assert all(m.weight.t().is_contiguous() for m in copy.modules() if isinstance(m, nn.Linear))
    x = torch.randn(2, D, dtype=torch.float64)
    fc = model.blocks[0].mlp[0]
    torch.testing.assert_close(fc(x), x @ fc.weight.detach().contiguous().t() + fc.bias)


def test_local_pretrained_never_downloads(tmp_path, monkeypatch, capsys):
    """Without a local copy it says so and returns None, offline, instead of fetching."""
    pytest.importorskip("transformers")
    from helpers.pretrained import local_pretrained

    monkeypatch.delenv("NBGRADER_EXECUTION", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert local_pretrained("GPT2LMHeadModel", str(tmp_path / "nowhere")) is None
    assert capsys.readouterr().out.startswith("skipped: no local copy of the ")


def test_local_pretrained_loads_a_saved_checkpoint(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    from helpers.pretrained import local_pretrained

    monkeypatch.delenv("NBGRADER_EXECUTION", raising=False)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "keys", "are"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    transformers.BertTokenizer(str(tmp_path / "vocab.txt")).save_pretrained(tmp_path)
    config = transformers.BertConfig(vocab_size=len(words), hidden_size=8, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=16)
    transformers.BertModel(config).save_pretrained(tmp_path)
    tokenizer, model = local_pretrained("BertModel", str(tmp_path), attn_implementation="eager")
    assert tokenizer.convert_ids_to_tokens(tokenizer("keys are").input_ids) == ["[CLS]", "keys", "are", "[SEP]"]
    assert isinstance(model, transformers.BertModel) and model.config.hidden_size == 8


def test_local_pretrained_skips_while_autograding(monkeypatch, capsys):
    from helpers.pretrained import local_pretrained

    monkeypatch.setenv("NBGRADER_EXECUTION", "autograde")
    assert local_pretrained("GPT2LMHeadModel", "gpt2") is None
    assert capsys.readouterr().out == "skipped: not while autograding\n"
