"""Unmodified Hugging Face ``transformers`` models from tiny configs, random weights (no hub
download). Each ``make_*`` returns ``(model, batch_fn)``: ``batch_fn(n, seed)`` gives the dict of
keyword tensors the model is called with (``model(**batch)``)."""

from __future__ import annotations

import torch
import transformers as tf
from torch import nn

from tiny_torch_models import varied

SEQ = 16
VOCAB = 100


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _tokens(n: int, seed: int, padded: bool = True) -> dict[str, torch.Tensor]:
    g = _gen(seed)
    ids = torch.randint(1, VOCAB, (n, SEQ), generator=g)
    mask = torch.ones(n, SEQ, dtype=torch.long)
    if padded:  # right padding of varying length: the attention mask path is exercised
        lengths = torch.randint(SEQ // 2, SEQ + 1, (n,), generator=g)
        mask = (torch.arange(SEQ)[None, :] < lengths[:, None]).long()
    return {"input_ids": ids, "attention_mask": mask}


def make_bert():
    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, num_labels=5)
    return tf.BertForSequenceClassification(cfg).eval(), _tokens


def make_gpt2():
    torch.manual_seed(0)
    cfg = tf.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    return tf.GPT2LMHeadModel(cfg).eval(), lambda n, seed: _tokens(n, seed, padded=False)


def _pixels(channels: int, size: int):
    """Images whose brightness and colour vary per sample (see ``tiny_torch_models.varied``)."""
    return lambda n, seed: {"pixel_values": varied((n, channels, size, size), seed)}


def make_vit():
    """``initializer_range=0.1`` (5x the default, as trained weights are larger): at 0.02 the logits
    of a random ViT hardly depend on the image (4% of their power). The CLS token stays ~7x smaller
    than the patch tokens on the residual stream either way (both scale with the init)."""
    torch.manual_seed(0)
    cfg = tf.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=64, num_labels=5, initializer_range=0.1)
    return tf.ViTForImageClassification(cfg).eval(), _pixels(3, 16)


def make_convnext():
    torch.manual_seed(0)
    cfg = tf.ConvNextConfig(num_channels=3, patch_size=2, num_stages=2, hidden_sizes=[16, 32], depths=[1, 1],
                            image_size=16, num_labels=5)
    return tf.ConvNextForImageClassification(cfg).eval(), _pixels(3, 16)


def make_mobilenet_v2():
    """Random-init HF MobileNetV2 produces ~1e-25 logits (its init is tiny and every BN has unit
    statistics), so its conv/linear weights are re-initialised (Kaiming) and the BN statistics set
    by a few train-mode forwards before the sim is built."""
    torch.manual_seed(0)
    cfg = tf.MobileNetV2Config(num_channels=3, image_size=32, depth_multiplier=0.35, num_labels=5,
                               classifier_dropout_prob=0.0)
    model = tf.MobileNetV2ForImageClassification(cfg)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                m.momentum = None  # cumulative average over the forwards below
        model.train()
        batches = _pixels(3, 32)
        for seed in range(4):
            model(**batches(16, 1000 + seed))
    return model.eval(), _pixels(3, 32)


def make_whisper():
    """The conv front-end gets Kaiming-normal weights: with the default init (std 0.02) the fixed
    sinusoidal position table dominates the encoder and the logits do not depend on the input at
    all. Features vary in level per mel bin and clip, as log-mel spectra do."""
    torch.manual_seed(0)
    cfg = tf.WhisperConfig(num_mel_bins=8, d_model=32, encoder_layers=2, encoder_attention_heads=2,
                           encoder_ffn_dim=64, decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=64,
                           max_source_positions=16, max_target_positions=16, classifier_proj_size=16, num_labels=5,
                           vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    model = tf.WhisperForAudioClassification(cfg).eval()
    with torch.no_grad():
        for conv in (model.encoder.conv1, model.encoder.conv2):
            nn.init.kaiming_normal_(conv.weight)
    frames = 2 * cfg.max_source_positions
    return model, lambda n, seed: {"input_features": varied((n, 8, frames), seed)}


# ---------------------------------------------------------------------------- issue 22: more families
# Decoder-only LMs: 1 layer (export time grows with depth; Gemma-2 keeps 2 for its sliding and
# global layers), hidden 32, 2 heads (grouped-query attention where the family has it: 1
# key/value head), called with right-padded ``attention_mask``.
_LM = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
           max_position_embeddings=32, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _lm(model_cls, config_cls, **overrides):
    def make():
        torch.manual_seed(0)
        cfg = config_cls(**{**_LM, **overrides})
        return model_cls(cfg).eval(), _tokens
    make.__name__ = f"make_{model_cls.__name__}"
    return make


make_llama = _lm(tf.LlamaForCausalLM, tf.LlamaConfig, num_key_value_heads=1)
make_qwen2 = _lm(tf.Qwen2ForCausalLM, tf.Qwen2Config, num_key_value_heads=1)
make_mistral = _lm(tf.MistralForCausalLM, tf.MistralConfig, num_key_value_heads=1, sliding_window=8)
make_phi3 = _lm(tf.Phi3ForCausalLM, tf.Phi3Config, num_key_value_heads=1)
make_gemma = _lm(tf.GemmaForCausalLM, tf.GemmaConfig, num_key_value_heads=1, head_dim=16)
make_gemma2 = _lm(tf.Gemma2ForCausalLM, tf.Gemma2Config, num_key_value_heads=1, head_dim=16, sliding_window=8,
                  query_pre_attn_scalar=16, num_hidden_layers=2)
make_opt = _lm(tf.OPTForCausalLM, tf.OPTConfig, ffn_dim=64, word_embed_proj_dim=32,
               intermediate_size=None, num_key_value_heads=None)
make_falcon = _lm(tf.FalconForCausalLM, tf.FalconConfig, num_kv_heads=1, new_decoder_architecture=False,
                  multi_query=True, intermediate_size=None)
make_gpt_neox = _lm(tf.GPTNeoXForCausalLM, tf.GPTNeoXConfig, rotary_pct=0.5)


def _seq2seq_tokens(n: int, seed: int) -> dict[str, torch.Tensor]:
    """Encoder tokens with right padding and decoder tokens (``decoder_input_ids``, half as long)."""
    batch = _tokens(n, seed)
    batch["decoder_input_ids"] = torch.randint(3, VOCAB, (n, SEQ // 2), generator=_gen(seed + 7919))
    return batch


def make_t5():
    torch.manual_seed(0)
    cfg = tf.T5Config(vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=64, num_layers=1, num_decoder_layers=1,
                      num_heads=2, relative_attention_num_buckets=8, relative_attention_max_distance=16,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return tf.T5ForConditionalGeneration(cfg).eval(), _seq2seq_tokens


def make_bart():
    torch.manual_seed(0)
    cfg = tf.BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=32,
                        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=2)
    return tf.BartForConditionalGeneration(cfg).eval(), _seq2seq_tokens


def make_whisper_seq2seq():
    """Whisper as speech-to-text: features and ``decoder_input_ids`` (the front-end as ``make_whisper``)."""
    torch.manual_seed(0)
    cfg = tf.WhisperConfig(num_mel_bins=8, d_model=32, encoder_layers=2, encoder_attention_heads=2,
                           encoder_ffn_dim=64, decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=64,
                           max_source_positions=16, max_target_positions=16, vocab_size=VOCAB, pad_token_id=0,
                           bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    model = tf.WhisperForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for conv in (model.model.encoder.conv1, model.model.encoder.conv2):
            nn.init.kaiming_normal_(conv.weight)
    frames = 2 * cfg.max_source_positions

    def batch(n: int, seed: int) -> dict[str, torch.Tensor]:
        return {"input_features": varied((n, 8, frames), seed),
                "decoder_input_ids": torch.randint(3, VOCAB, (n, 6), generator=_gen(seed + 7919))}
    return model, batch


# Vision classifiers: 16x16 images, 5 classes, ``initializer_range=0.1`` where the family has it (see make_vit).
_VIT = dict(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, num_labels=5, initializer_range=0.1)


def make_deit():
    """Distilled DeiT: a CLS and a distillation token beside the patches; logits the mean of both
    heads. Its init leaves both tokens and the position embeddings at zero (a trained DeiT's are
    not, and zeros would hide them among the zero biases): they get ``N(0, 0.1)``, as ViT's init does."""
    torch.manual_seed(0)
    model = tf.DeiTForImageClassificationWithTeacher(tf.DeiTConfig(**_VIT)).eval()
    with torch.no_grad():
        emb = model.deit.embeddings
        for p in (emb.cls_token, emb.distillation_token, emb.position_embeddings):
            nn.init.trunc_normal_(p, std=_VIT["initializer_range"])
    return model, _pixels(3, 16)


def make_clip():
    torch.manual_seed(0)
    vision = {k: v for k, v in _VIT.items() if k != "num_labels"}
    text = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg = tf.CLIPConfig(vision_config=vision, text_config=text, num_labels=5)
    return tf.CLIPForImageClassification(cfg).eval(), _pixels(3, 16)


def make_siglip():
    torch.manual_seed(0)
    vision = {k: v for k, v in _VIT.items() if k not in ("num_labels", "initializer_range")}
    cfg = tf.SiglipConfig(vision_config=vision, text_config=dict(vocab_size=VOCAB, hidden_size=32,
                                                                 intermediate_size=64, num_hidden_layers=1,
                                                                 num_attention_heads=2), num_labels=5)
    return tf.SiglipForImageClassification(cfg).eval(), _pixels(3, 16)


def make_swin():
    torch.manual_seed(0)
    cfg = tf.SwinConfig(image_size=16, patch_size=2, num_channels=3, embed_dim=16, depths=[1, 1], num_heads=[2, 2],
                        window_size=4, mlp_ratio=2.0, num_labels=5, initializer_range=0.1)
    model = tf.SwinForImageClassification(cfg).eval()
    with torch.no_grad():  # zeros at init (trained tables are not): N(0, 0.1), as timm's init does at 0.02
        for name, p in model.named_parameters():
            if name.endswith("relative_position_bias_table"):
                nn.init.trunc_normal_(p, std=0.1)
    return model, _pixels(3, 16)


def make_convnextv2():
    torch.manual_seed(0)
    cfg = tf.ConvNextV2Config(num_channels=3, patch_size=2, num_stages=2, hidden_sizes=[16, 32], depths=[1, 1],
                              image_size=16, num_labels=5)
    return tf.ConvNextV2ForImageClassification(cfg).eval(), _pixels(3, 16)


def make_segformer():
    """SegFormer for semantic segmentation: per-pixel logits at 1/4 resolution."""
    torch.manual_seed(0)
    cfg = tf.SegformerConfig(num_channels=3, num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1],
                             hidden_sizes=[16, 32], patch_sizes=[3, 3], strides=[2, 2], num_attention_heads=[1, 2],
                             mlp_ratios=[2, 2], decoder_hidden_size=32, num_labels=5, image_size=32,
                             initializer_range=0.1)
    return tf.SegformerForSemanticSegmentation(cfg).eval(), _pixels(3, 32)
