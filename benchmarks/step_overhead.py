"""QAT training-step cost vs FP32, in one process.

    python benchmarks/step_overhead.py [--iters 30] [--models resnet_cifar digits_cnn]

One step = forward + cross-entropy + backward + SGD update, batch 64, random data. Variants:
FP32 as given (with BatchNorm: what a user trains), FP32 with BN folded (the sim's graph without
quantizers: the baseline for pure quantization overhead), the floor (folded + one elementwise
pass per activation quantizer), our sim at W8A8 static / W8A8 range learning / W4A4, and
torch.ao eager QAT (``prepare_qat``, x86 default qconfig) for reference. Variants are timed in
turns and ratios taken within each turn (a shared VM's speed drifts). Memory: on CUDA the
step's peak allocation; on CPU the bytes saved for backward in the forward pass (activations and
masks: what QAT adds), measured with autograd saved-tensor hooks.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import host_memory, interleaved_ms, machine, table  # noqa: E402

from orchestrator.quant import QuantConfig, QuantizationSimModel  # noqa: E402
from orchestrator.zoo.models import DigitsCNN, ResNetCifar  # noqa: E402

MODELS = {"resnet_cifar": (ResNetCifar, (3, 32, 32)), "digits_cnn": (DigitsCNN, (1, 8, 8))}
BATCH = 64


def folded_fp32(model: nn.Module, example: torch.Tensor) -> nn.Module:
    sim = QuantizationSimModel(model, example, QuantConfig())
    sim.set_quantization_enabled(False)
    return sim.model


def sim_model(model: nn.Module, example: torch.Tensor, **cfg) -> nn.Module:
    sim = QuantizationSimModel(model, example, QuantConfig(**cfg))
    sim.compute_encodings(lambda m, xs: [m(x) for x in xs], [torch.randn_like(example) for _ in range(2)])
    return sim.model


def torch_ao_qat(model: nn.Module, example: torch.Tensor) -> nn.Module:
    from torch.ao.quantization import get_default_qat_qconfig, prepare_qat

    m = copy.deepcopy(model).train()
    m.qconfig = get_default_qat_qconfig("x86")
    return prepare_qat(m)


def saved_bytes(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    total = 0

    def pack(t: torch.Tensor):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    return total


def peak_cuda_bytes(step) -> int:
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def extra_pass_floor(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """The folded graph with one extra elementwise pass (``x * 1``, with its backward) at every
    activation-quantizer site: the cost floor of any fake-quant implementation."""
    sim = QuantizationSimModel(model, example, QuantConfig())
    sim.set_quantization_enabled(False)
    for q in sim.activation_quantizers().values():
        q.forward = lambda x: x * 1.0
    return sim.model


def bench_model(name: str, device: torch.device, rounds: int, per_round: int, warmup: int) -> list[tuple]:
    cls, shape = MODELS[name]
    torch.manual_seed(0)
    base = cls(num_classes=10).to(device).eval()
    x = torch.randn(BATCH, *shape, device=device)
    y = torch.randint(0, 10, (BATCH,), device=device)
    example = x[:2]
    variants = {
        "FP32 (as given)": lambda: copy.deepcopy(base),
        "FP32, BN folded": lambda: folded_fp32(base, example),
        "floor: folded + 1 pass/quantizer": lambda: extra_pass_floor(base, example),
        "sim W8A8 static": lambda: sim_model(base, example),
        "sim W8A8 range learning": lambda: sim_model(base, example, range_learning=True),
        "sim W4A4 static": lambda: sim_model(base, example, param_bw=4, output_bw=4),
        "torch.ao eager QAT W8A8": lambda: torch_ao_qat(base, example),
    }
    steps, mems = {}, {}
    for label, make in variants.items():
        model = make().to(device).train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

        def step(model=model, opt=opt):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()

        steps[label] = step
        mems[label] = peak_cuda_bytes(step) if device.type == "cuda" else saved_bytes(model, x, y)
    given = interleaved_ms(steps, device, warmup, rounds, per_round, "FP32 (as given)")
    folded = interleaved_ms(steps, device, 0, rounds, per_round, "FP32, BN folded")
    ref_mem, fold_mem = mems["FP32 (as given)"], mems["FP32, BN folded"]
    return [(name, label, f"{given[label][0]:.2f}", f"{given[label][1]:.3f}", f"{folded[label][1]:.3f}",
             f"{mems[label] / 2**20:.1f}", f"{mems[label] / ref_mem:.2f}", f"{mems[label] / fold_mem:.2f}")
            for label in variants]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5, help="turns over all variants (ratios: median over rounds)")
    p.add_argument("--per-round", type=int, default=5, help="steps per variant per round")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--malloc-defaults", action="store_true",
                   help="leave glibc's malloc thresholds alone (default: keep_freed_host_memory, as trials do)")
    args = p.parse_args()
    memory_setting = host_memory(not args.malloc_defaults)
    device = torch.device(args.device)
    print(f"step_overhead: batch {BATCH}; variants interleaved, {args.rounds} rounds x {args.per_round} steps; "
          f"{machine()}; {memory_setting}")
    mem = "peak MiB" if device.type == "cuda" else "saved MiB"
    rows = [r for m in args.models for r in bench_model(m, device, args.rounds, args.per_round, args.warmup)]
    print(table(("model", "variant", "ms/step", "x FP32", "x FP32 folded", mem, "mem x FP32", "mem x folded"), rows))


if __name__ == "__main__":
    main()
