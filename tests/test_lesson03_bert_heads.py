"""Lesson 03's optional BERT cell: it skips cleanly without a local checkpoint, and with one
(here a tiny random BERT saved to disk, offline) it reports the heads that attend most from
the verb to its subject, as Hugging Face's own attention weights say."""

from __future__ import annotations

import re

import pytest
import torch

from helpers.course.source import build_notebook

from conftest import lesson_named

try:  # part of the test extra: CI must never silently lose its external references
    import transformers
except ImportError as error:
    raise ImportError("the oracle tests need Hugging Face transformers, part of the test extra: "
                      "pip install -e '.[test]'") from error


@pytest.fixture
def bert_heads_cell(monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.delenv("NBGRADER_EXECUTION", raising=False)
    cells = {cell.id: cell.source for cell in build_notebook(lesson_named("03").script).cells}
    namespace: dict = {}
    exec(compile(cells["imports"], "imports", "exec"), namespace)
    exec(compile(cells["bert-heads"], "bert-heads", "exec"), namespace)  # runs it once
    return namespace["bert_agreement_heads"]


def test_skips_without_a_local_checkpoint(bert_heads_cell, tmp_path, capsys):
    capsys.readouterr()
    bert_heads_cell(name=str(tmp_path / "nowhere"))
    assert capsys.readouterr().out.startswith("skipped: no local copy")


def test_reports_the_heads_that_read_the_subject(bert_heads_cell, tmp_path, capsys):
    words = "the keys to cabinet are on table".split()
    (tmp_path / "vocab.txt").write_text("\n".join(
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words) + "\n")
    tokenizer = transformers.BertTokenizer(str(tmp_path / "vocab.txt"))
    tokenizer.save_pretrained(tmp_path)
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(words) + 5, hidden_size=16,
                                     num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=32)
    transformers.BertModel(config).save_pretrained(tmp_path)
    capsys.readouterr()
    bert_heads_cell(name=str(tmp_path))
    printed = capsys.readouterr().out
    reported = re.findall(r"layer (\d+), head (\d+): weight ([\d.]+)", printed)
    assert len(reported) == 3, printed

    bert = transformers.BertModel.from_pretrained(tmp_path, attn_implementation="eager")
    tokens = tokenizer("the keys to the cabinet are on the table", return_tensors="pt")
    names = tokenizer.convert_ids_to_tokens(tokens.input_ids[0])
    with torch.no_grad():
        attentions = torch.stack(bert(**tokens, output_attentions=True).attentions)[:, 0]
    weights = attentions[:, :, names.index("are"), names.index("keys")]  # (layers, heads)
    layer, head, weight = reported[0]
    assert float(weights[int(layer), int(head)]) == pytest.approx(float(weights.max()), abs=0.01)
    assert float(weight) == pytest.approx(float(weights.max()), abs=0.01)
