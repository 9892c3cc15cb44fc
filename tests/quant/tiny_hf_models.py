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
