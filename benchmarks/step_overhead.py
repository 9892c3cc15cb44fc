"""QAT training-step cost vs FP32, in one process.

    python benchmarks/step_overhead.py [--models resnet_cifar bert vit] [--compile] [--rounds 5]

One step = forward + cross-entropy + backward + SGD update on random data. Models: the
built-in ``digits_cnn`` and ``resnet_cifar``, ``residual_nobn`` (a residual CNN without BatchNorm:
nothing to fold, the fairest CPU comparison with torch.ao); ``transformers`` BERT and ViT built from small
configs (every block quantized: projections, attention matmuls, softmax, norms, GELU, adds);
on a GPU with torchvision also ResNet-18/50, MobileNetV2 and ViT-B/16. Variants: FP32 as given
(what a user trains), FP32 with BN folded (the sim's graph without quantizers: the baseline of
pure quantization overhead), the floor (that graph plus one elementwise pass per quantizer:
what any fake quantization must pay), our sim at W8A8 static and with range learning, and
torch.ao eager QAT for the CNNs, and the ``w4g128`` / ``fp8`` presets static where the model's layers
take them (a block of 128 needs input dimensions that are multiples of 128). ``--compile`` compiles every variant (``torch.compile``,
compile time excluded): compiled vs compiled. Variants are timed in turns and ratios taken
within each turn (a shared machine's speed drifts). Memory: on CUDA the step's peak
allocation; on CPU the bytes saved for backward in the forward pass.
"""

from __future__ import annotations

import argparse
import copy
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import host_memory, interleaved_ms, machine, saved_for_backward_bytes, table  # noqa: E402

from orchestrator.quant import QuantConfig, QuantizationSimModel, kernels  # noqa: E402
from orchestrator.zoo.models import DigitsCNN, ResNetCifar  # noqa: E402


@dataclass
class Case:
    """A model to time: ``build()`` gives the float model, ``inputs(n)`` a batch (tensor or kwargs)."""

    build: Callable[[], nn.Module]
    inputs: Callable[[int, torch.device], Any]
    batch: int
    classes: int
    torch_ao: bool = False
    gpu_only: bool = False


def _bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=8000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                     intermediate_size=1024, max_position_embeddings=128, num_labels=10,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg)


def _vit() -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(image_size=64, patch_size=8, num_channels=3, hidden_size=256, num_hidden_layers=4,
                    num_attention_heads=4, intermediate_size=1024, num_labels=10, hidden_dropout_prob=0.0,
                    attention_probs_dropout_prob=0.0)
    return ViTForImageClassification(cfg)


def _torchvision(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return getattr(torchvision.models, name)(num_classes=10)

    return build


class ResidualNoBN(nn.Module):
    """Issue 18's fairest CPU case: a residual CNN without BatchNorm (nothing to fold), 3x3 convs of
    32-64 channels on 32x32 inputs: stem 3->32, two residual blocks at 32, a strided 32->64 conv,
    two residual blocks at 64, pooled linear head. Input ``[N, 3, 32, 32]``, logits ``[N, 10]``."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        conv = lambda i, o, stride=1: nn.Conv2d(i, o, 3, stride=stride, padding=1)  # noqa: E731
        self.stem = conv(3, 32)
        self.blocks32 = nn.ModuleList(nn.ModuleList([conv(32, 32), conv(32, 32)]) for _ in range(2))
        self.down = conv(32, 64, stride=2)
        self.blocks64 = nn.ModuleList(nn.ModuleList([conv(64, 64), conv(64, 64)]) for _ in range(2))
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        for blocks in (self.blocks32, None, self.blocks64):
            if blocks is None:
                x = F.relu(self.down(x))
                continue
            for a, b in blocks:
                x = F.relu(x + b(F.relu(a(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _images(shape: tuple[int, ...]):
    return lambda n, device: torch.randn(n, *shape, device=device)


CASES = {
    "digits_cnn": Case(lambda: DigitsCNN(num_classes=10), _images((1, 8, 8)), 64, 10, torch_ao=True),
    "resnet_cifar": Case(lambda: ResNetCifar(num_classes=10), _images((3, 32, 32)), 64, 10, torch_ao=True),
    "residual_nobn": Case(ResidualNoBN, _images((3, 32, 32)), 64, 10, torch_ao=True),
    "bert": Case(_bert, lambda n, d: {"input_ids": torch.randint(0, 8000, (n, 128), device=d),
                                      "attention_mask": torch.ones(n, 128, dtype=torch.long, device=d)}, 16, 10),
    "vit": Case(_vit, lambda n, d: {"pixel_values": torch.randn(n, 3, 64, 64, device=d)}, 32, 10),
    "resnet18": Case(_torchvision("resnet18"), _images((3, 224, 224)), 128, 10, torch_ao=True, gpu_only=True),
    "resnet50": Case(_torchvision("resnet50"), _images((3, 224, 224)), 64, 10, torch_ao=True, gpu_only=True),
    "mobilenet_v2": Case(_torchvision("mobilenet_v2"), _images((3, 224, 224)), 128, 10, torch_ao=True,
                         gpu_only=True),
    "vit_b_16": Case(_torchvision("vit_b_16"), _images((3, 224, 224)), 64, 10, gpu_only=True),
}


# conf/quant presets timed beside W8A8 (their QuantConfig fields; they run on the reference op)
FORMAT_VARIANTS = {
    "w4g128": dict(param_bw=4, param_block_size=128, quantize_activations=False),
    "fp8": dict(param_format="float8_e4m3fn", output_format="float8_e4m3fn", quant_scheme="min_max"),
}


def call(model: nn.Module, inputs: Any) -> torch.Tensor:
    out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


def make_sim(model: nn.Module, example: Any, calib: list, **cfg) -> QuantizationSimModel:
    sim = QuantizationSimModel(model, example, QuantConfig(**cfg))
    sim.compute_encodings(lambda m, xs: [call(m, x) for x in xs], calib)
    return sim


def folded_fp32(model: nn.Module, example: Any) -> nn.Module:
    sim = QuantizationSimModel(model, example, QuantConfig())
    sim.set_quantization_enabled(False)
    return sim.model


def extra_pass_floor(model: nn.Module, example: Any) -> nn.Module:
    """The sim's graph with every quantizer replaced by one elementwise pass (``x * 1``, with its
    backward): the cost floor of any fake-quant implementation."""
    sim = QuantizationSimModel(model, example, QuantConfig())
    for q in list(sim.activation_quantizers().values()) + list(sim.param_quantizers().values()):
        q.forward = lambda x: x * 1.0
    return sim.model


def torch_ao_qat(model: nn.Module) -> nn.Module:
    from torch.ao.quantization import get_default_qat_qconfig, prepare_qat

    m = copy.deepcopy(model).train()
    m.qconfig = get_default_qat_qconfig("x86")
    return prepare_qat(m)


def peak_cuda_bytes(step) -> int:
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def bench_model(name: str, device: torch.device, args: argparse.Namespace) -> list[tuple]:
    case = CASES[name]
    torch.manual_seed(0)
    base = case.build().to(device).eval()
    inputs = case.inputs(case.batch, device)
    y = torch.randint(0, case.classes, (case.batch,), device=device)
    example = case.inputs(2, device)
    calib = [case.inputs(min(case.batch, 16), device) for _ in range(2)]
    variants: dict[str, Callable[[], nn.Module]] = {
        "FP32 (as given)": lambda: copy.deepcopy(base),
        "FP32, BN folded": lambda: folded_fp32(base, example),
        "floor: folded + 1 pass/quantizer": lambda: extra_pass_floor(base, example),
        "sim W8A8 static": lambda: make_sim(base, example, calib).model,
        "sim W8A8 range learning": lambda: make_sim(base, example, calib, range_learning=True).model,
    }
    if case.torch_ao and not args.compile:
        variants["torch.ao eager QAT W8A8"] = lambda: torch_ao_qat(base)
    for preset, cfg in FORMAT_VARIANTS.items():  # the new formats, where the model's layers take them
        try:
            make_sim(base, example, calib[:1], **cfg)
        except Exception as exc:  # e.g. a block size that does not divide a layer's input dimension
            print(f"  {name}: sim {preset} skipped: {str(exc).splitlines()[0]}", file=sys.stderr)
            continue
        variants[f"sim {preset} static"] = lambda cfg=cfg: make_sim(base, example, calib, **cfg).model
    steps, mems = {}, {}
    for label, make in variants.items():
        model = make().to(device).train()
        runner = torch.compile(model) if args.compile else model
        opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

        def step(runner=runner, opt=opt):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(call(runner, inputs), y).backward()
            opt.step()

        steps[label] = step
        mems[label] = peak_cuda_bytes(step) if device.type == "cuda" else saved_for_backward_bytes(lambda: F.cross_entropy(call(runner, inputs), y))
    given = interleaved_ms(steps, device, args.warmup, args.rounds, args.per_round, "FP32 (as given)")
    folded = interleaved_ms(steps, device, 0, args.rounds, args.per_round, "FP32, BN folded")
    ref_mem, fold_mem = mems["FP32 (as given)"], mems["FP32, BN folded"]
    return [(name, label, f"{given[label][0]:.2f}", f"{given[label][1]:.3f}", f"{folded[label][1]:.3f}",
             f"{mems[label] / 2**20:.1f}", f"{mems[label] / ref_mem:.2f}", f"{mems[label] / fold_mem:.2f}")
            for label in variants]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5, help="turns over all variants (ratios: median over rounds)")
    p.add_argument("--per-round", type=int, default=5, help="steps per variant per round")
    p.add_argument("--warmup", type=int, default=3, help="steps before timing (compilation happens here)")
    p.add_argument("--models", nargs="+", default=None, choices=list(CASES),
                   help="default: every model this machine can run")
    p.add_argument("--compile", action="store_true", help="torch.compile every variant (compiled vs compiled)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--malloc-defaults", action="store_true",
                   help="leave glibc's malloc thresholds alone (default: keep_freed_host_memory, as trials do)")
    args = p.parse_args()
    device = torch.device(args.device)
    models = args.models or [m for m, c in CASES.items() if not c.gpu_only or device.type == "cuda"]
    memory_setting = host_memory(not args.malloc_defaults)
    warnings.filterwarnings("ignore")
    print(f"step_overhead: {'compiled' if args.compile else 'eager'}; variants interleaved, {args.rounds} rounds x "
          f"{args.per_round} steps; fake-quant kernel {kernels.backend()}; {machine()}; {memory_setting}")
    mem = "peak MiB" if device.type == "cuda" else "saved MiB"
    rows = [r for m in models for r in bench_model(m, device, args)]
    print(table(("model", "variant", "ms/step", "x FP32", "x FP32 folded", mem, "mem x FP32", "mem x folded"), rows))


if __name__ == "__main__":
    main()
