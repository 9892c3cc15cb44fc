"""Where quantizers go, decided on the captured graph (``capture.py``).

Rules (DESIGN.md, "Default placement"):
- every floating-point model input that is used gets a quantizer;
- every compute op's floating-point *activation* output that is used gets one: quantized
  layers (conv, linear, norms, activations, ...) and functional ops (``x + y``, ``torch.cat``,
  matmul, softmax, GELU, ...) alike, inside any module;
- none after data movement (views, reshapes, indexing, dropout, max pooling, ``nn.Embedding``
  rows): their output is on their input's grid;
- none on mask and constant paths: float tensors computed from integer inputs, buffers and
  constants only (attention masks, rotary tables) are not activations;
- none inside a supergroup: a conv/linear, BatchNorm or add whose only consumer is a
  ReLU/ReLU6/Hardtanh, a conv/linear whose only consumer is an unfolded BatchNorm, and a mask
  add/where whose only consumer is a softmax leave their output to the last op of the group;
  likewise a tensor used only as ``F.scaled_dot_product_attention``'s ``attn_mask`` (T5's
  position bias plus the padding mask): it joins the scores inside the attention's softmax;
- ``F.scaled_dot_product_attention`` is quantized as the ops it stands for: the scaled
  scores, the softmax probabilities and the attention output;
- weights: every parameter a quantized layer declares, and every parameter of 2+ dims that
  other code passes straight to an op (per channel where the op says which axis holds output
  channels, per tensor otherwise); biases and other 1-D parameters stay float.
- A BatchNorm whose only input is a conv/linear used nowhere else is folded into it.

``activation_sites="layer_inputs"`` keeps, of the activation quantizers above, only those whose
value reaches a weighted layer (conv/linear, ``F.linear``/``F.conv*``, ``addmm``, and the registered
layers with weights: ``nn.MultiheadAttention``, RNNs) as its input,
looking through data movement: the placement of torchao's 8da4w and ModelOpt's W4A4/NVFP4
(quantizers at the inputs of the matmuls with weights; norms, residual adds, softmax and the
attention's own matmuls stay float). A quantizer sits on the producer's output, so a value that
also feeds another op reaches it quantized too (a residual branch beside a conv); the others are
listed as float with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .granularity import LINEAR, MATMUL_B, TRANSPOSED
from .capture import MODEL_OUTPUT, CapturedGraph, Node
from .layers import QuantizedModule
from .layers.elementwise import BATCHNORMS, RELU_LIKE_MODULES
from .ops import MASK_OPS, RELU_LIKE, SOFTMAX

FOLDABLE_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
LAYER_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
                 nn.Linear)
LAYER_FUNCTIONS = frozenset({"linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
                             "conv_transpose3d", "addmm", "batch_norm"})
# (op, index among its tensor arguments) -> channel axis of a parameter passed there.
# The same ``WeightAxes`` declarations as the layer types (``layers/``): channel and block axes.
PARAM_AXIS = {("linear", 1): LINEAR, ("conv1d", 1): LINEAR, ("conv2d", 1): LINEAR, ("conv3d", 1): LINEAR,
              ("embedding", 1): LINEAR, ("conv_transpose1d", 1): TRANSPOSED, ("conv_transpose2d", 1): TRANSPOSED,
              ("conv_transpose3d", 1): TRANSPOSED, ("matmul", 1): MATMUL_B, ("mm", 1): MATMUL_B,
              ("bmm", 1): MATMUL_B, ("addmm", 2): MATMUL_B}
# Where a layer function takes its activation input (``addmm(bias, x, weight)``).
LAYER_INPUT_POSITION = {"linear": 0, "conv1d": 0, "conv2d": 0, "conv3d": 0, "conv_transpose1d": 0,
                        "conv_transpose2d": 0, "conv_transpose3d": 0, "addmm": 1}
ACTIVATION_SITES = ("outputs", "layer_inputs")
NOT_A_LAYER_INPUT = "not the input of a weighted layer (activation_sites='layer_inputs')"


@dataclass
class FunctionSite:
    """Quantizers of one functional op: output leaf indices, or the three parts of an SDPA."""

    key: str
    op: str
    outputs: list[int]
    sdpa: bool = False


@dataclass
class Plan:
    inputs: list[str] = field(default_factory=list)  # flattened model input names to quantize
    module_outputs: dict[str, list[int]] = field(default_factory=dict)  # layer -> output leaves
    functions: dict[str, dict[str, FunctionSite]] = field(default_factory=dict)  # owner -> key -> site
    free_params: dict[str, int | None] = field(default_factory=dict)  # param used by ops -> channel axis
    param_users: dict[str, set[str]] = field(default_factory=dict)  # param used by ops -> modules running them
    folds: list[tuple[str, str]] = field(default_factory=list)  # (layer, batchnorm)
    float_outputs: list[tuple[str, str]] = field(default_factory=list)  # (what, why) left float, for summaries
    pass_through_count: int = 0
    constant_path: list[str] = field(default_factory=list)


def node_name(node: Node) -> str:
    if node.kind == "function":
        return f"{node.owner}.{node.key or node.op}" if node.owner else (node.key or node.op)
    return node.owner or node.op


def _is_layer(node: Node) -> bool:
    if node.kind == "module":
        m = node.module
        return isinstance(m, LAYER_MODULES) or (isinstance(m, QuantizedModule) and "weight" in m.QUANTIZED_PARAMS
                                                and not m.PASS_THROUGH)
    return node.op in LAYER_FUNCTIONS


def _has_weights(node: Node) -> bool:
    """A module node whose layer multiplies its inputs by quantized weights: conv/linear, and the
    registered layers with weights (``nn.MultiheadAttention``, RNNs, GPT-2's Conv1D), not embeddings."""
    m = node.module
    return isinstance(m, LAYER_MODULES) or (isinstance(m, QuantizedModule) and not m.PASS_THROUGH
                                            and bool(m.quantized_param_names()))


def _is_batchnorm(node: Node) -> bool:
    return node.kind == "module" and isinstance(node.module, BATCHNORMS)


def _is_relu_like(node: Node) -> bool:
    if node.kind == "module":
        return isinstance(node.module, RELU_LIKE_MODULES)
    return node.op in RELU_LIKE


class _Rules:
    def __init__(self, graph: CapturedGraph) -> None:
        self.g = graph
        self.nodes = graph.nodes
        calls: dict[str, int] = {}
        for n in self.nodes:
            if n.kind == "module":
                calls[n.owner] = calls.get(n.owner, 0) + 1
        self.calls = calls
        self.folded: set[str] = set()

    def transparent(self, node: Node) -> bool:
        """Passes values through without computing: data movement or a folded BatchNorm."""
        return node.pass_through or (node.kind == "module" and node.owner in self.folded)

    def sole_consumer(self, node: Node, leaf: int) -> Node | None:
        """The op that alone consumes ``node``'s output ``leaf``, looking through data movement."""
        found = self._sole_use(node, leaf)
        return None if found is None else found[0]

    def _sole_use(self, node: Node, leaf: int) -> tuple[Node, list[int]] | None:
        """``(op, argument positions)``: the op that alone consumes ``node``'s output ``leaf``
        (looking through data movement) and where among its tensor arguments the value arrives."""
        users, src, out = node.consumers[leaf], node.index, leaf
        while len(users) == 1 and users[0] != MODEL_OUTPUT:
            user = self.nodes[users[0]]
            if not self.transparent(user):
                return user, [k for k, i in enumerate(user.inputs) if i.node == src and i.output == out]
            if len(user.outputs) != 1:
                return None
            users, src, out = user.consumers[0], user.index, 0
        return None

    def feeds_layer(self, node: Node, leaf: int) -> bool:
        """Some op consuming ``node``'s output ``leaf`` (looking through data movement) is a weighted
        layer taking it as its activation input (``LAYER_INPUT_POSITION``; a layer module's inputs)."""
        pending, seen = [(node.index, leaf)], set()
        while pending:
            src, out = pending.pop()
            for u in self.nodes[src].consumers[out] if src >= 0 else []:
                if u == MODEL_OUTPUT or (u, src, out) in seen:
                    continue
                seen.add((u, src, out))
                user = self.nodes[u]
                if self.transparent(user):
                    pending.extend((user.index, i) for i in range(len(user.outputs)))
                    continue
                positions = [k for k, i in enumerate(user.inputs) if i.node == src and i.output == out]
                if user.kind == "module" and _has_weights(user):
                    return True
                if user.kind == "function" and LAYER_INPUT_POSITION.get(user.op) in positions:
                    return True
        return False

    def is_attention_mask(self, node: Node, leaf: int) -> bool:
        """``node``'s output ``leaf`` is used only as the ``attn_mask`` of a scaled dot-product
        attention (its 4th tensor argument): it joins the scores inside the attention's softmax."""
        found = self._sole_use(node, leaf)
        return found is not None and found[0].op == "sdpa" and bool(found[1]) and min(found[1]) >= 3

    def fused_with(self, node: Node, leaf: int) -> str | None:
        """Why ``node``'s output stays float inside a supergroup, or None."""
        consumer = self.sole_consumer(node, leaf)
        if consumer is None:
            return None
        is_add = node.kind == "function" and node.op == "add"
        if _is_relu_like(consumer) and (_is_layer(node) or _is_batchnorm(node) or is_add):
            return f"supergroup with the ReLU-like {node_name(consumer)}"
        if _is_batchnorm(consumer) and consumer.owner not in self.folded and _is_layer(node):
            return f"supergroup with the BatchNorm {consumer.owner}"
        if node.kind == "function" and node.op in MASK_OPS and consumer.op in SOFTMAX and self._masks(node):
            return f"mask applied inside the softmax {node_name(consumer)}"
        if self.is_attention_mask(node, leaf):
            return f"attention mask/bias joining the scores inside the softmax of {node_name(consumer)}"
        return None

    @staticmethod
    def _masks(node: Node) -> bool:
        """An op combining an activation with a mask (a non-activation tensor)."""
        acts = [i.activation for i in node.inputs]
        return any(acts) and not all(acts)

    def find_folds(self) -> list[tuple[str, str]]:
        folds = []
        for bn in self.nodes:
            if not _is_batchnorm(bn) or self.calls.get(bn.owner) != 1 or len(bn.inputs) != 1:
                continue
            module = bn.module
            if module.running_mean is None or not module.track_running_stats:
                continue
            src = bn.inputs[0]
            if src.node < 0:
                continue
            layer = self.nodes[src.node]
            if (layer.kind != "module" or not isinstance(layer.module, FOLDABLE_LAYERS)
                    or self.calls.get(layer.owner) != 1 or len(layer.outputs) != 1 or layer.consumers[0] != [bn.index]):
                continue
            if isinstance(layer.module, nn.Linear) and not isinstance(module, nn.BatchNorm1d):
                continue
            if layer.module.bias is None and not module.affine:
                continue  # the original architecture would have nowhere to hold the folded bias
            folds.append((layer.owner, bn.owner))
        self.folded = {bn for _, bn in folds}
        return folds


def make_plan(graph: CapturedGraph, fold_batchnorm: bool, activation_sites: str = "outputs") -> Plan:
    """The quantizer placement for ``graph`` (see the module docstring); ``activation_sites``: one
    of ``ACTIVATION_SITES``."""
    rules = _Rules(graph)
    plan = Plan(folds=rules.find_folds() if fold_batchnorm else [])
    layer_inputs_only = activation_sites == "layer_inputs"
    for node in graph.nodes:
        if node.kind == "input":
            if node.outputs[0].is_float and node.consumers[0]:
                if layer_inputs_only and not rules.feeds_layer(node, 0):
                    plan.float_outputs.append((node.op, NOT_A_LAYER_INPUT))
                else:
                    plan.inputs.append(node.op)
            continue
        _collect_free_params(node, plan)
        if node.kind == "function" and node.key == "" and not node.pass_through:
            continue
        leaves = []
        for i, out in enumerate(node.outputs):
            if not out.is_float or not node.consumers[i]:
                continue
            if not out.activation:
                plan.constant_path.append(node_name(node))
                continue
            if rules.transparent(node):
                plan.pass_through_count += 1
                continue
            why = rules.fused_with(node, i)
            if why is None and layer_inputs_only and not rules.feeds_layer(node, i):
                why = NOT_A_LAYER_INPUT
            if why is not None:
                plan.float_outputs.append((node_name(node), why))
                continue
            leaves.append(i)
        if not leaves:
            continue
        if node.kind == "module":
            if isinstance(node.module, QuantizedModule) and node.module.PASS_THROUGH:
                plan.float_outputs.append((node.owner, f"rows of its quantized table ({type(node.module).__name__})"))
                continue
            plan.module_outputs[node.owner] = leaves
        else:
            # layer inputs only: the attention runs as written, its output quantized like any op's
            site = FunctionSite(node.key, node.op, leaves, sdpa=node.op == "sdpa" and not layer_inputs_only)
            plan.functions.setdefault(node.owner, {})[node.key] = site
    return plan


def _collect_free_params(node: Node, plan: Plan) -> None:
    """Parameters of 2+ dims that a functional op takes directly."""
    if node.kind != "function":
        return
    for position, inp in enumerate(node.inputs):
        if inp.param is None or not inp.is_float:
            continue
        axis = PARAM_AXIS.get((node.op, position))
        plan.param_users.setdefault(inp.param, set()).add(node.owner)
        previous = plan.free_params.get(inp.param, "unset")
        if previous == "unset" or (previous is not None and previous != axis):
            plan.free_params[inp.param] = axis if previous == "unset" else None
