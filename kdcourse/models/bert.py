"""A BERT-style classifier built from a Hugging Face ``BertConfig``.

Nothing is downloaded (``HF_HUB_OFFLINE`` and ``TRANSFORMERS_OFFLINE`` are set
before ``transformers`` is imported); weights start random. BERT: Devlin et
al., NAACL 2019, arXiv:1810.04805.

:class:`TextTransformer` wraps ``BertForSequenceClassification`` (plus an
optional masked-LM head): ``model(input_ids)`` returns logits (B, C), so the
course's ``fit`` / ``evaluate`` work unchanged, and
``model.forward_all(input_ids)`` returns hidden states and attentions the
Hugging Face way (see :mod:`kdcourse.losses.transformer`).
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import logging  # noqa: E402
import warnings  # noqa: E402
from typing import NamedTuple  # noqa: E402

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from ..data.reviews import TextData  # noqa: E402
from ..profiles import BertSpec  # noqa: E402


class TransformerOutputs(NamedTuple):
    """What :meth:`TextTransformer.forward_all` returns (HF conventions)."""

    logits: torch.Tensor  # (B, C)
    hidden_states: tuple  # L + 1 tensors (B, S, D); [0] = embedding output
    attentions: tuple  # L tensors (B, H, S, S), post-softmax probabilities
    attention_mask: torch.Tensor  # (B, S) bool, True at real tokens
    mlm_logits: torch.Tensor | None = None  # (B, S, V) when asked for


def _transformers():
    """Import ``transformers`` (offline), silencing torch's import-time notes
    about pytree registrations, which are not about this course."""
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    import transformers

    return transformers


def bert_config(spec: BertSpec, vocab_size: int, num_labels: int, max_len: int):
    """A ``transformers.BertConfig`` for ``spec`` (eager attention, so that
    attention probabilities can be returned)."""
    BertConfig = _transformers().BertConfig

    return BertConfig(
        vocab_size=vocab_size, hidden_size=spec.hidden, num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads, intermediate_size=spec.intermediate,
        hidden_dropout_prob=spec.dropout, attention_probs_dropout_prob=spec.attention_dropout,
        max_position_embeddings=max(32, max_len), type_vocab_size=1, num_labels=num_labels,
        pad_token_id=0, attn_implementation="eager",
    )


class TextTransformer(nn.Module):
    """``BertForSequenceClassification`` built from a config (random weights,
    no download), optionally with a masked-LM head (its decoder tied to the
    word embeddings, as in BERT, unless ``tie_mlm=False``).

    ``model(input_ids)`` -> logits (B, C); the attention mask is
    ``input_ids != pad_id``.
    """

    def __init__(self, config, mlm_head: bool = False, tie_mlm: bool = True):
        super().__init__()
        from transformers import BertForSequenceClassification
        from transformers.models.bert.modeling_bert import BertOnlyMLMHead

        if getattr(config, "_attn_implementation", "eager") != "eager":
            config._attn_implementation = "eager"
        self.config = config
        self.pad_id = int(config.pad_token_id or 0)
        self.hf = BertForSequenceClassification(config)
        self.mlm = None
        if mlm_head:
            self.mlm = BertOnlyMLMHead(config)
            if tie_mlm:
                self.mlm.predictions.decoder.weight = self.hf.bert.embeddings.word_embeddings.weight

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def num_heads(self) -> int:
        return self.config.num_attention_heads

    def _check(self, input_ids):
        if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.dtype != torch.int64:
            raise ValueError("input_ids must be an int64 tensor of shape (B, S); got "
                             f"{getattr(input_ids, 'dtype', type(input_ids))} {tuple(getattr(input_ids, 'shape', ()))}")

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        self._check(input_ids)
        return self.hf(input_ids=input_ids, attention_mask=(input_ids != self.pad_id).long()).logits

    def forward_all(self, input_ids: torch.Tensor, hidden_states: bool = True, attentions: bool = True,
                    mlm: bool = False) -> TransformerOutputs:
        """Logits plus HF ``hidden_states`` (L + 1) and ``attentions`` (L), and
        masked-LM logits when ``mlm`` (needs ``mlm_head=True``)."""
        self._check(input_ids)
        if mlm and self.mlm is None:
            raise ValueError("mlm=True needs a model built with mlm_head=True")
        mask = input_ids != self.pad_id
        out = self.hf(input_ids=input_ids, attention_mask=mask.long(), output_hidden_states=hidden_states or mlm,
                      output_attentions=attentions)
        hs = tuple(out.hidden_states) if out.hidden_states is not None else ()
        att = tuple(out.attentions) if attentions else ()
        if attentions and len(att) != self.num_layers:
            raise RuntimeError("the model returned no attentions; it must use attn_implementation='eager'")
        mlm_logits = self.mlm(hs[-1]) if mlm else None
        return TransformerOutputs(out.logits, hs if hidden_states else (), att, mask, mlm_logits)


def build(spec: BertSpec, data: TextData, mlm_head: bool = False, tie_mlm: bool = True) -> TextTransformer:
    """A fresh model of shape ``spec`` for ``data``'s vocabulary and classes."""
    if not isinstance(spec, BertSpec):
        raise ValueError(f"spec must be a BertSpec, got {type(spec).__name__}")
    return TextTransformer(bert_config(spec, data.vocab_size, data.num_classes, data.max_len), mlm_head=mlm_head,
                           tie_mlm=tie_mlm)


def count_params(model: TextTransformer, embeddings: bool = True) -> int:
    """Parameters of the classifier (``model.hf``; an MLM head is not counted).
    ``embeddings=False`` leaves out the word, position and token-type tables."""
    hf = model.hf if isinstance(model, TextTransformer) else model
    total = sum(p.numel() for p in hf.parameters())
    if embeddings:
        return total
    emb = hf.bert.embeddings
    tables = (emb.word_embeddings, emb.position_embeddings, emb.token_type_embeddings)
    return total - sum(t.weight.numel() for t in tables)
