"""The course's GPT, BERT and T5 against Hugging Face ``transformers``, an oracle nobody here
wrote: small random configs built offline, weights loaded with ``from_hf``, then logits,
hidden states and greedy tokens compared."""

from __future__ import annotations

import pytest
import torch

try:  # part of the test extra: CI must never silently lose its external references
    import transformers
except ImportError as error:
    raise ImportError("the oracle tests need Hugging Face transformers, part of the test extra: "
                      "pip install -e '.[test]'") from error

from helpers.transformer import GPT, T5, BertEncoder  # noqa: E402

VOCAB = 97
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def jitter(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Add noise to every parameter, so that a norm or a bias loaded into the wrong place
    (fresh norms are all ones, fresh biases all zeros) changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g).to(p))
    return model.eval()


def assert_matches(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """float32 agreement, relative to the size of the outputs."""
    scale = float(theirs.abs().max())
    torch.testing.assert_close(ours, theirs, atol=1e-5 * max(scale, 1.0), rtol=1e-5)


def tokens_and_mask(batch: int, length: int, seed: int, left: bool
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids (B, L) and a padding mask (B, L), True = token, each row a random length."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, VOCAB, (batch, length), generator=g)
    lengths = torch.randint(2, length + 1, (batch,), generator=g)
    lengths[0] = length
    positions = torch.arange(length)
    mask = positions >= length - lengths[:, None] if left else positions < lengths[:, None]
    return idx, mask


@pytest.fixture(scope="module")
def gpt2():
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=40, n_embd=32, n_layer=2,
                                     n_head=4, bos_token_id=None, eos_token_id=None,
                                     attn_implementation="eager")
    torch.manual_seed(0)
    return jitter(transformers.GPT2LMHeadModel(config), seed=1)


@pytest.fixture(scope="module")
def bert_mlm():
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=48,
                                     max_position_embeddings=24, attn_implementation="eager")
    torch.manual_seed(0)
    return jitter(transformers.BertForMaskedLM(config), seed=2)


def make_t5(tie: bool) -> torch.nn.Module:
    config = transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48,
                                   num_layers=2, num_decoder_layers=3, num_heads=4,
                                   relative_attention_num_buckets=8,
                                   relative_attention_max_distance=12, tie_word_embeddings=tie,
                                   eos_token_id=None, pad_token_id=0, decoder_start_token_id=0,
                                   attn_implementation="eager")
    torch.manual_seed(0)
    return jitter(transformers.T5ForConditionalGeneration(config), seed=3)


@pytest.mark.parametrize("padded", [False, True])
def test_gpt2_logits_match(gpt2, padded):
    ours = GPT.from_hf(gpt2)
    idx, mask = tokens_and_mask(3, 13, seed=4, left=True)
    with torch.no_grad():
        if padded:  # left padding: real tokens must ignore the pads before them
            theirs = gpt2(idx, attention_mask=mask.long()).logits
            got = ours(idx, attention_mask=mask)
            assert_matches(got[mask], theirs[mask])
        else:
            assert_matches(ours(idx), gpt2(idx).logits)


@pytest.mark.parametrize("use_cache", [True, False])
def test_gpt2_greedy_generation_matches_hf(gpt2, use_cache):
    ours = GPT.from_hf(gpt2)
    idx = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(5))
    theirs = gpt2.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=12,
                           do_sample=False)
    assert torch.equal(ours.generate(idx, 12, use_cache=use_cache), theirs)


def test_gpt2_left_padded_batch_generates_like_hf(gpt2):
    """Prompts of different lengths in one batch: Hugging Face gives each its own positions
    from the attention mask, as ours must, and both equal one-by-one generation."""
    ours = GPT.from_hf(gpt2)
    idx, mask = tokens_and_mask(4, 9, seed=11, left=True)
    theirs = gpt2.generate(idx, attention_mask=mask.long(), max_new_tokens=12, do_sample=False)
    assert torch.equal(ours.generate(idx, 12, attention_mask=mask), theirs)
    assert torch.equal(ours.generate(idx, 12, attention_mask=mask, use_cache=False), theirs)
    row = int(torch.argmin(mask.sum(dim=1)))  # the shortest prompt, alone
    alone = ours.generate(idx[row:row + 1, mask[row]], 12)
    assert torch.equal(alone[0], theirs[row, idx.shape[1] - int(mask[row].sum()):])


def test_gpt2_from_hf_keeps_weights_tied(gpt2):
    ours = GPT.from_hf(gpt2)
    assert ours.lm_head.weight is ours.token_embedding.weight


@pytest.mark.parametrize("padded", [False, True])
def test_bert_hidden_states_and_mlm_logits_match(bert_mlm, padded):
    ours = BertEncoder.from_hf(bert_mlm)
    idx, mask = tokens_and_mask(3, 11, seed=6, left=False)
    types = (torch.arange(11) >= 5).long().expand(3, 11)  # segment A then B
    hf_mask = mask.long() if padded else None
    with torch.no_grad():
        hidden = ours(idx, attention_mask=mask if padded else None, token_type_ids=types)
        theirs = bert_mlm.bert(idx, attention_mask=hf_mask, token_type_ids=types)
        assert_matches(hidden, theirs.last_hidden_state)
        logits = bert_mlm(idx, attention_mask=hf_mask, token_type_ids=types).logits
        assert_matches(ours.mlm_logits(hidden), logits)


def test_bert_from_base_model_without_head(bert_mlm):
    base = bert_mlm.bert  # a BertModel
    ours = BertEncoder.from_hf(base)
    idx, mask = tokens_and_mask(2, 9, seed=7, left=False)
    with torch.no_grad():
        assert_matches(ours(idx, attention_mask=mask),
                       base(idx, attention_mask=mask.long()).last_hidden_state)


@pytest.mark.parametrize("tie", [True, False])
def test_t5_logits_match(tie):
    hf = make_t5(tie)
    ours = T5.from_hf(hf)
    idx, mask = tokens_and_mask(3, 10, seed=8, left=False)
    decoder_ids = torch.randint(0, VOCAB, (3, 15), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        theirs = hf(input_ids=idx, attention_mask=mask.long(), decoder_input_ids=decoder_ids)
        assert_matches(ours(idx, decoder_ids, attention_mask=mask), theirs.logits)
        unpadded = hf(input_ids=idx, decoder_input_ids=decoder_ids).logits
        assert_matches(ours(idx, decoder_ids), unpadded)


def test_t5_greedy_generation_matches_hf():
    hf = make_t5(tie=True)
    ours = T5.from_hf(hf)
    idx, mask = tokens_and_mask(3, 8, seed=10, left=False)
    theirs = torch.zeros(3, 1, dtype=torch.long)  # decoder start token 0
    with torch.no_grad():  # an argmax loop: HF's generate trips on unequal stack depths
        for _ in range(10):
            logits = hf(input_ids=idx, attention_mask=mask.long(), decoder_input_ids=theirs,
                        use_cache=False).logits
            theirs = torch.cat([theirs, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    mine = ours.generate(idx, 10, attention_mask=mask)
    assert len(set(mine.flatten().tolist())) > 2, "degenerate test: the model repeats one token"
    assert torch.equal(mine, theirs)


def test_t5_rejects_unsupported_configs():
    gated = transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=1,
                                  num_heads=4, feed_forward_proj="gated-gelu")
    with pytest.raises(ValueError, match="relu"):
        T5.from_hf(transformers.T5ForConditionalGeneration(gated))
    with pytest.raises(ValueError, match="d_kv"):
        T5(VOCAB, d_model=32, n_layers=1, n_heads=4, d_ff=48, d_kv=16)


@cuda
def test_gpt2_on_cuda_matches_hf(gpt2):
    hf = gpt2.to("cuda")
    try:
        ours = GPT.from_hf(hf)
        assert ours.lm_head.weight.device.type == "cuda"
        idx = torch.randint(0, VOCAB, (2, 9), device="cuda")
        with torch.no_grad():
            assert_matches(ours(idx), hf(idx).logits)
        assert torch.equal(ours.generate(idx, 8), ours.generate(idx, 8, use_cache=False))
    finally:
        gpt2.to("cpu")
