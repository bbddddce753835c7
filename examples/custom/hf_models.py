"""Tiny Hugging Face transformers built from config objects with random weights (no download): what
`model.name: "hf_models:tiny_bert"` and `"hf_models:tiny_gpt2"` name (extra ``oialr-tune[hf]``).

oialr-tune calls a builder as ``builder(in_shape, num_outputs, **model.args)``; for dict examples
`in_shape` is the first example's ``input_ids`` shape, which a transformer does not need. The models
return a ``ModelOutput``; oialr-tune takes its ``.logits``. OIALR factorizes BERT's ``nn.Linear``
projections and GPT-2's ``Conv1D`` ones (``c_attn``, ``c_proj``, ``c_fc``); the classifier head stays
dense (``keep_last_layer``), and so do the embeddings (not a Linear).
"""

from __future__ import annotations

from torch import nn


def tiny_bert(in_shape: tuple[int, ...], num_outputs: int, vocab_size: int = 32, hidden: int = 64,
              layers: int = 2, heads: int = 2, intermediate: int = 128, max_positions: int = 64,
              dropout: float = 0.1) -> nn.Module:
    """A BERT sequence classifier (CLS pooling) of `layers` blocks of width `hidden`."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=intermediate,
                        max_position_embeddings=max_positions, hidden_dropout_prob=dropout,
                        attention_probs_dropout_prob=dropout, num_labels=num_outputs, pad_token_id=0)
    return BertForSequenceClassification(config)


def tiny_gpt2(in_shape: tuple[int, ...], num_outputs: int, vocab_size: int = 32, hidden: int = 64,
              layers: int = 2, heads: int = 2, max_positions: int = 64, dropout: float = 0.1) -> nn.Module:
    """A GPT-2 sequence classifier (scores its last non-padding token) of `layers` blocks of width `hidden`."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    config = GPT2Config(vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=heads,
                        n_positions=max_positions, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                        num_labels=num_outputs, pad_token_id=0, bos_token_id=1, eos_token_id=1)
    return GPT2ForSequenceClassification(config)
