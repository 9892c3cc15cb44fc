"""Built-in Hugging Face ``transformers`` models, built from small configs with random weights
(nothing downloaded). ``transformers`` is imported when one is built (``pip install transformers``)."""

from __future__ import annotations

from typing import Any

from torch import nn


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise ImportError("this model needs the transformers package: pip install 'qat-orchestrator[hf]'") from None
    transformers.logging.set_verbosity_error()
    return transformers


def bert_tiny(num_classes: int = 2, vocab_size: int = 64, max_length: int = 64, hidden_size: int = 64,
              layers: int = 2, heads: int = 2) -> nn.Module:
    """``BertForSequenceClassification``: ``model(input_ids=[N, L], attention_mask=[N, L]).logits``
    is ``[N, num_classes]``; 2 layers of width 64 by default (~0.1 M parameters)."""
    tf = _transformers()
    cfg = tf.BertConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=4 * hidden_size,
                        max_position_embeddings=max_length, num_labels=num_classes, pad_token_id=0)
    return tf.BertForSequenceClassification(cfg)


def gpt2_tiny(vocab_size: int = 64, max_length: int = 64, hidden_size: int = 64, layers: int = 2,
              heads: int = 2) -> nn.Module:
    """``GPT2LMHeadModel`` (tied embedding and head): ``model(input_ids=[N, L]).logits`` is
    ``[N, L, vocab_size]``."""
    tf = _transformers()
    cfg = tf.GPT2Config(vocab_size=vocab_size, n_positions=max_length, n_embd=hidden_size, n_layer=layers,
                        n_head=heads, bos_token_id=0, eos_token_id=0)
    return tf.GPT2LMHeadModel(cfg)


def llama_tiny(vocab_size: int = 256, max_length: int = 128, hidden_size: int = 128, layers: int = 4,
               heads: int = 4, kv_heads: int = 2, intermediate_size: int = 384) -> nn.Module:
    """``LlamaForCausalLM`` (RMSNorm, rotary positions, SwiGLU MLP, grouped-query attention with
    ``kv_heads`` key/value heads, untied embedding and head): ``model(input_ids=[N, L]).logits`` is
    ``[N, L, vocab_size]``. The defaults (4 layers of width 128, ~0.85 M parameters) train to a
    byte-level perplexity of about 4 on ``data=python_text`` in a few minutes on one CPU core."""
    tf = _transformers()
    cfg = tf.LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=max_length, tie_word_embeddings=False, bos_token_id=None,
                         eos_token_id=None, pad_token_id=None)
    return tf.LlamaForCausalLM(cfg)
