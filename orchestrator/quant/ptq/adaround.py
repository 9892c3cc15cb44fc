"""AdaRound (Nagel et al. 2020, "Up or Down? Adaptive Rounding for Post-Training Quantization").

Each target layer (conv, linear; ``layers.py``) in the order the model runs them: every weight
is rounded down or up on its quantizer's grid (``w = s * (floor(w/s) + h + o')``) where ``h``
in ``[0, 1]`` is the rectified sigmoid ``clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)`` of a
learned ``V`` (started at the weight's fractional part). ``V`` is trained by Adam to minimise

    sum over output channels of (f(W_soft x_q) - f(W x))^2, averaged over the rest
    + reg * sum(1 - |2h - 1|^beta)

where ``x_q`` is the layer's input in the simulation as it is (earlier layers already rounded,
activations quantized), ``W x`` the float model's output on float inputs and ``f`` the ReLU
that follows the layer, if one does. The regulariser pushes ``h`` to 0 or 1; ``beta`` decays
linearly from ``beta[0]`` to ``beta[1]`` after the first ``warm_start`` fraction of iterations
(no regulariser before). Finally ``h = V >= 0``: the weight becomes an ordinary tensor on the
grid, and its quantizer is pinned to that grid (``grid.pin_encoding``), so QAT continues from
it with encodings that follow the weights or are learned.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..encoding import qmax_of
from .grid import check_integer_grid, current_encoding, pin_encoding, scale_offset
from .layers import Layer, Run, collect, quantization_off, target_layers

ZETA, GAMMA = 1.1, -0.1  # stretch of the rectified sigmoid (the paper's values)


@dataclass(frozen=True)
class AdaRoundParams:
    """``iterations`` Adam steps per layer at ``lr``, each on ``batch_size`` samples drawn from
    the first ``num_batches`` calibration batches (all when None); regulariser weight ``reg``.
    ``quantized_inputs``: each layer learns from its inputs in the simulation (earlier layers
    rounded, activations quantized: the paper's asymmetric reconstruction); False (the default):
    from the float model's inputs (the layer alone). Chosen by measurement (benchmarks/RESULTS.md,
    "PTQ steps before QAT"): on MNIST-1D at A4 float inputs gave +0.5 / +2.5 points of PTQ accuracy
    (min-max / sqnr activations), at A16 the two were within noise; with 512 calibration samples,
    learning on 4-bit activations fits their noise."""

    iterations: int = 1000
    num_batches: int | None = None
    batch_size: int = 64
    reg: float = 0.01
    lr: float = 1e-2  # AIMET: 1e-3 over 10000 iterations; at 1000, 1e-2 measured better (benchmarks/ptq_init.py)
    beta: tuple[float, float] = (20.0, 2.0)
    warm_start: float = 0.2
    seed: int = 0
    quantized_inputs: bool = False


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def _beta(it: int, p: AdaRoundParams) -> float | None:
    start = int(p.warm_start * p.iterations)
    if it < start:
        return None
    t = (it - start) / max(p.iterations - start, 1)
    return p.beta[1] + (p.beta[0] - p.beta[1]) * max(0.0, 1.0 - t)


def reconstruction_error(layer: Layer, x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error summed over the output channels, averaged over the rest (samples, positions)."""
    return (layer.compute(x, weight) - target).square().sum(dim=layer.out_channel_dim).mean()


def round_layer(layer: Layer, x: torch.Tensor, target: torch.Tensor, p: AdaRoundParams) -> torch.Tensor:
    """Learn the rounding of ``layer``'s weight from inputs ``x`` to targets ``target`` (dim 0:
    samples); set the rounded weight and pin its quantizer. Returns the rounded weight."""
    entry = layer.entry
    weight = entry.param
    enc = current_encoding(entry)
    w = weight.detach()
    s, o = scale_offset(enc, w)
    qmax = qmax_of(enc.bitwidth)
    floor = torch.floor(w / s)
    frac = (w / s - floor).clamp(0.0, 1.0)
    v = torch.logit(((frac - GAMMA) / (ZETA - GAMMA)).clamp(1e-6, 1 - 1e-6)).requires_grad_(True)
    opt = torch.optim.Adam([v], lr=p.lr)
    g = torch.Generator().manual_seed(p.seed)
    n = x.shape[0]
    for it in range(p.iterations):
        idx = torch.randint(0, n, (min(p.batch_size, n),), generator=g).to(x.device)
        h = rectified_sigmoid(v)
        w_soft = s * (torch.clamp(floor + h - o, 0, qmax) + o)
        loss = reconstruction_error(layer, x[idx], w_soft, target[idx])
        beta = _beta(it, p)
        if beta is not None:
            loss = loss + p.reg * (1 - (2 * h - 1).abs().pow(beta)).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        rounded = s * (torch.clamp(floor + (v >= 0).to(w.dtype) - o, 0, qmax) + o)
        weight.copy_(rounded)
        pin_encoding(entry, enc.scale, enc.offset)
    return rounded


def adaround(sim, run: Run, batches: list, params: AdaRoundParams | None = None,
             layers: list[str] | None = None) -> list[str]:
    """AdaRound every target layer of ``sim`` (or those named in ``layers``), in model order.

    ``run(sim.model, batch)`` runs the model on one of ``batches`` (the calibration data);
    ``sim`` must be calibrated (activation encodings set). Returns the names of the rounded
    layers. Their weights are changed in place; nothing else is.
    """
    p = params or AdaRoundParams()
    data = batches if p.num_batches is None else batches[:p.num_batches]
    todo = target_layers(sim, layers)
    check_integer_grid({l.name: l.entry for l in todo}, "adaround")
    with quantization_off(sim):
        targets = collect(sim, todo, run, data, inputs=False, outputs=True)
    if not p.quantized_inputs:
        with quantization_off(sim):
            float_inputs = collect(sim, todo, run, data)
    for layer in todo:
        x = (collect(sim, [layer], run, data) if p.quantized_inputs else float_inputs)[layer.name]["input"]
        round_layer(layer, x, layer.activate(targets[layer.name]["output"]), p)
    return [l.name for l in todo]
