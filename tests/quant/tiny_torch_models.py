"""Small plain-PyTorch models of the architectures users bring (written here: torchvision and timm
are not installed beside this torch): torchvision-style ResNet blocks, LSTM/GRU classifiers,
``nn.MultiheadAttention``, Conv1d/Conv3d/ConvTranspose, a tied-embedding language model, and the
placement test models. Random weights; each ``make_*`` returns ``(model, batch_fn)`` where
``batch_fn(n, seed)`` gives a batch of ``n`` samples in the form the model is called with."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def varied(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Noise whose mean and scale vary per sample and channel (dim 1), like images or sequences of
    different brightness/colour/level. Pure white noise would give random-init models almost the
    same pooled features (and logits) for every input, making output SQNR a measure of a constant."""
    g = _gen(seed)
    stats = (shape[0], shape[1]) + (1,) * (len(shape) - 2)
    scale = torch.rand(stats, generator=g) + 0.5
    return torch.randn(shape, generator=g) * scale + torch.randn(stats, generator=g)


def randomize_batchnorms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine parameters (fresh BNs fold to nearly nothing)."""
    g = _gen(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) * 0.4 - 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 1.5 + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                    m.bias.copy_(torch.rand(m.bias.shape, generator=g) * 0.4 - 0.2)
    return model


@torch.no_grad()
def batchnorm_stats_from_data(model: nn.Module, batch_fn, batches: int = 4) -> nn.Module:
    """BN running statistics set by train-mode forwards on ``batch_fn`` data (cumulative average),
    as after training: BN outputs are then centred on the data, as in a trained network."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    for seed in range(batches):
        batch = batch_fn(16, 10_000 + seed)
        model(*batch) if isinstance(batch, tuple) else model(batch)
    return model.eval()


# ---------------------------------------------------------------------------- torchvision-style CNN
def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """torchvision's ``BasicBlock``, as written there: ``out += identity``, ``ReLU(inplace=True)``."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class DepthwiseSeparable(nn.Module):
    """MobileNet-style: depthwise conv-BN-ReLU6, pointwise conv-BN."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.dw = nn.Sequential(nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False), nn.BatchNorm2d(cin),
                                nn.ReLU6(inplace=True))
        self.pw = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw(self.dw(x))


class TinyResNet(nn.Module):
    """Stem conv-BN-ReLU-maxpool, two BasicBlocks (one downsampling), a depthwise separable block,
    adaptive average pooling, ``torch.flatten``, fc: torchvision's ``ResNet.forward`` shape."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(2)
        self.layer1 = BasicBlock(8, 8)
        self.layer2 = BasicBlock(8, 16, stride=2)
        self.sep = DepthwiseSeparable(16, 16)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        x = self.sep(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def make_resnet():
    """Random affine BN parameters, BN statistics from data, a zero fc bias (else the logits are
    mostly a constant that does not depend on the input)."""
    torch.manual_seed(0)
    model = randomize_batchnorms(TinyResNet())
    nn.init.zeros_(model.fc.bias)
    batch_fn = lambda n, seed: varied((n, 3, 16, 16), seed)  # noqa: E731
    return batchnorm_stats_from_data(model, batch_fn), batch_fn


# ---------------------------------------------------------------------------- recurrent
class RecurrentClassifier(nn.Module):
    """A 2-layer ``nn.LSTM``/``nn.GRU`` over feature sequences ``[B, T, F]``, a linear head on the
    last step's output."""

    def __init__(self, cell: type, bidirectional: bool = False, num_classes: int = 5) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 16)
        self.rnn = cell(16, 16, num_layers=2, batch_first=True, bidirectional=bidirectional)
        self.head = nn.Linear(32 if bidirectional else 16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq, _ = self.rnn(torch.tanh(self.inp(x)))
        return self.head(seq[:, -1])


@torch.no_grad()
def sharpen(model: nn.Module, gain: float) -> nn.Module:
    """Weights of 2+ dims (but the head's) times ``gain`` and a zero head bias: PyTorch's default
    recurrent init (U(+-1/sqrt(H))) leaves the last hidden state nearly the same for every input;
    trained recurrent weights are larger."""
    for name, p in model.named_parameters():
        if p.dim() >= 2 and not name.startswith("head."):
            p.mul_(gain)
    nn.init.zeros_(model.head.bias)
    return model


def _sequences(n: int, seed: int) -> torch.Tensor:
    return varied((n, 6, 12), seed).transpose(1, 2)  # [B, T=12, F=6], level varying per feature


def make_lstm():
    torch.manual_seed(0)
    return sharpen(RecurrentClassifier(nn.LSTM), 3.0).eval(), _sequences


def make_gru():
    torch.manual_seed(0)
    return sharpen(RecurrentClassifier(nn.GRU, bidirectional=True), 2.0).eval(), _sequences


# ---------------------------------------------------------------------------- nn.MultiheadAttention
class MhaClassifier(nn.Module):
    """Self-attention with ``nn.MultiheadAttention`` (batch first, key padding mask), residual,
    LayerNorm, masked mean pooling, head. Called as ``model(x, padding)``."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 32)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.norm = nn.LayerNorm(32)
        self.head = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        a, _ = self.attn(h, h, h, key_padding_mask=padding, need_weights=False)
        h = self.norm(h + a)
        keep = (~padding).unsqueeze(-1).to(h.dtype)
        return self.head((h * keep).sum(1) / keep.sum(1))


def _mha_batch(n: int, seed: int):
    g = _gen(seed)
    x = torch.randn(n, 10, 8, generator=g)
    lengths = torch.randint(6, 11, (n,), generator=g)
    padding = torch.arange(10)[None, :] >= lengths[:, None]
    return (x, padding)


def make_mha():
    torch.manual_seed(0)
    return sharpen(MhaClassifier(), 1.0).eval(), _mha_batch


# ---------------------------------------------------------------------------- Conv1d / Conv3d / ConvTranspose
class ConvZoo(nn.Module):
    """Conv3d on a volume, ConvTranspose2d upsampling, Conv1d and ConvTranspose1d on the flattened
    plane, a linear head on every position. Input ``[B, 2, 4, 8, 8]``."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.conv3d = nn.Conv3d(2, 4, 3, padding=1)
        self.up2d = nn.ConvTranspose2d(4, 6, 2, stride=2)
        self.conv1d = nn.Conv1d(6, 8, 5, stride=4, padding=2)
        self.up1d = nn.ConvTranspose1d(8, 4, 4, stride=2, padding=1, groups=2)
        self.head = nn.Linear(4 * 32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = F.relu(self.conv3d(x))
        plane = v.mean(dim=2)  # [B, 4, 8, 8]
        up = F.gelu(self.up2d(plane))  # [B, 6, 16, 16]
        seq = self.conv1d(up.flatten(2))  # [B, 8, 64]
        seq = torch.tanh(self.up1d(seq))  # [B, 4, 128]
        return self.head(F.avg_pool1d(seq, 4).flatten(1))  # [B, 4 * 32]


def make_convs():
    """Kaiming-normal conv weights and zero biases: with PyTorch's default init the signal shrinks
    layer by layer until the biases alone decide the output."""
    torch.manual_seed(0)
    model = ConvZoo()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.conv._ConvNd):
                nn.init.kaiming_normal_(m.weight, mode="fan_out" if m.transposed else "fan_in")
            if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
                nn.init.zeros_(m.bias)
    return model.eval(), lambda n, seed: varied((n, 2, 4, 8, 8), seed)


# ---------------------------------------------------------------------------- tied-embedding LM
class TiedLM(nn.Module):
    """A one-block causal LM: token and position embeddings, attention through
    ``F.scaled_dot_product_attention``, an MLP, and an ``lm_head`` whose weight IS the token
    table (nanoGPT's ``self.tok.weight = self.lm_head.weight``). Called as ``model(ids)``."""

    def __init__(self, vocab: int = 64, dim: int = 32, heads: int = 2, seq: int = 16) -> None:
        super().__init__()
        self.heads = heads
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(seq, dim)
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, 4 * dim)
        self.out = nn.Linear(4 * dim, dim)
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.tok.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        b, t = ids.shape
        h = self.tok(ids) + self.pos(torch.arange(t, device=ids.device))
        q, k, v = self.qkv(self.ln1(h)).split(h.shape[-1], dim=-1)
        q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.proj(a.transpose(1, 2).reshape(b, t, -1))
        h = h + self.out(F.gelu(self.fc(self.ln2(h))))
        return self.lm_head(self.ln_f(h))


def make_tied_lm():
    torch.manual_seed(0)
    model = TiedLM()
    with torch.no_grad():  # GPT-2-like init scale
        model.tok.weight.normal_(0, 0.5)
        model.pos.weight.normal_(0, 0.1)
    return model.eval(), lambda n, seed: torch.randint(0, 64, (n, 16), generator=_gen(seed))


# ---------------------------------------------------------------------------- placement models
class Mixed1d(nn.Module):
    """Conv1d, BN, ReLU6, functional relu, GELU, SiLU, cat, avg pooling, max pooling, Linear->ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv1d(2, 8, 3, padding=1)
        self.bn_a = nn.BatchNorm1d(8)
        self.act_a = nn.ReLU6()
        self.conv_b = nn.Conv1d(8, 8, 3, padding=1)
        self.conv_c = nn.Conv1d(8, 8, 1)
        self.gelu = nn.GELU()
        self.silu = nn.SiLU()
        self.pool = nn.AvgPool1d(2)
        self.maxpool = nn.MaxPool1d(2)
        self.fc1 = nn.Linear(16 * 4, 32)
        self.act_fc = nn.ReLU()
        self.drop = nn.Dropout(0.1)
        self.fc2 = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.act_a(self.bn_a(self.conv_a(x)))
        b = F.relu(self.conv_b(a))
        c = self.silu(self.gelu(self.conv_c(a)))
        y = torch.cat([b, c], dim=1)
        y = self.maxpool(self.pool(y))
        y = y.flatten(1)
        y = self.drop(self.act_fc(self.fc1(y)))
        return self.fc2(y)


class Residual(nn.Module):
    """Functional relu, a residual add used twice, add -> relu, tensor methods, mean, scalar mul."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv1(x))
        y = self.bn2(self.conv2(h))
        s = h + y  # used twice below: its own quantizer
        r = (s + h).relu()  # add -> relu: one quantizer, after the relu
        m = r.mean(dim=(2, 3))
        return self.fc(m * 0.5 + s.mean(dim=(2, 3)))
