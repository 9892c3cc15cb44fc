"""BatchNorm re-estimation after QAT, then folding (AIMET's flow for models trained with BN kept).

With ``fold_batchnorm=False`` the BatchNorms train with the quantized model, but their running
statistics are averages over weights that kept changing. ``reestimate`` resets them and
recomputes them (a cumulative average, ``momentum=None``) on training batches run through the
quantized ``sim.model``, nothing else changing. ``fold`` then folds each BatchNorm that directly
follows a conv/linear layer into that layer's weight and bias (``batchnorm_fold``'s one rule):
the weight quantizer's encoding follows the folded weight (static QAT) or its learned scale is
multiplied by ``|gamma / sqrt(var + eps)|`` per channel; the BatchNorm stays in place as an
identity (statistics 0/1, affine 1/0), keeping its output quantizer, so ``sim.model``, the
exported graph and ``float_state_dict`` compute what they computed before.
"""

from __future__ import annotations

import torch
from torch import nn

from ..batchnorm_fold import _fold_into, identity_batchnorm_state
from .layers import Run, captured_graph

BatchNorm = nn.modules.batchnorm._BatchNorm


@torch.no_grad()
def reestimate(sim, run: Run, batches: list) -> list[str]:
    """Recompute the running statistics of every BatchNorm of ``sim.model`` on ``batches``
    (``run(sim.model, batch)``; the rest of the model in eval mode). Returns their names."""
    model = sim.model
    bns = [(name, m) for name, m in model.named_modules() if isinstance(m, BatchNorm) and m.track_running_stats]
    momenta = {name: m.momentum for name, m in bns}
    was_training = model.training
    model.eval()
    for _, m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        for batch in batches:
            run(model, batch)
    finally:
        for name, m in bns:
            m.momentum = momenta[name]
        model.train(was_training)
    return [name for name, _ in bns]


def foldable_pairs(sim) -> list[tuple[str, str]]:
    """``(layer, batchnorm)``: each BatchNorm whose only input is a conv/linear layer whose only
    consumer it is (the pairs ``fold_batchnorm=True`` would have folded)."""
    graph = captured_graph(sim)
    pairs = []
    for node in graph.nodes:
        if node.kind != "module" or not isinstance(node.module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            continue
        if len(node.consumers) != 1 or len(node.consumers[0]) != 1 or node.consumers[0][0] < 0:
            continue
        nxt = graph.nodes[node.consumers[0][0]]
        if nxt.kind == "module" and isinstance(nxt.module, BatchNorm) and nxt.module.track_running_stats:
            pairs.append((node.owner, nxt.owner))
    return pairs


@torch.no_grad()
def fold(sim) -> list[tuple[str, str]]:
    """Fold every foldable BatchNorm of ``sim.model`` into its layer (see the module docstring);
    returns the folded ``(layer, batchnorm)`` pairs."""
    model = sim.model
    by_param = {n: e for e in sim.quantized_params().values() for n in e.names}
    done = []
    for layer_name, bn_name in foldable_pairs(sim):
        layer, bn = model.get_submodule(layer_name), model.get_submodule(bn_name)
        factor = (bn.weight if bn.affine else torch.ones_like(bn.running_var)) * torch.rsqrt(bn.running_var + bn.eps)
        entry = by_param.get(f"{layer_name}.weight")
        _fold_into(layer, bn)
        if entry is not None and entry.quantizer.learnable:
            enc = entry.quantizer.encoding()
            entry.quantizer.set_encoding(enc.scale * factor.abs().cpu().reshape(enc.scale.shape), enc.offset)
        state = {k: v for k, v in bn.state_dict().items() if not k.startswith(("output_quantizers", "param_quantizers"))}
        beta = torch.zeros_like(bn.running_mean)
        for key, value in identity_batchnorm_state(state, bn.eps, beta).items():
            getattr(bn, key).copy_(value)
        done.append((layer_name, bn_name))
    return done
