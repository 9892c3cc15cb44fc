"""Parameters in the exported graph: tied weights (one quantizer, equal encodings on every ONNX
tensor holding them), recurrent gate reordering (``channel_order``), the ``load_encodings`` round
trip through the exported files (static and learned weight encodings), and token-id inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from quant_checks import calibrated, feed, logits_of, next_token_loss, range_learning_steps, sqnr_db
from tiny_hf_models import make_bert, make_gpt2
from tiny_torch_models import RecurrentClassifier, _sequences, make_tied_lm, sharpen
from torch import nn

from orchestrator.quant import QdqRunner, QuantConfig, QuantizationSimModel


def param_entries(path) -> dict[str, dict]:
    return {e["name"]: e for e in json.loads(open(path).read())["param_encodings"]}


def entries_of(entries: dict[str, dict], param: str, names: list[str]) -> dict[str, dict]:
    """The file's entries holding ``param`` (under any of its ``names``, or as their ``source``)."""
    return {n: e for n, e in entries.items() if n in names or e.get("source") in names}


@pytest.mark.parametrize("make", [make_tied_lm, make_gpt2], ids=["tied_lm", "gpt2"])
def test_tied_weights_share_one_quantizer_and_one_encoding(make, tmp_path):
    model, batch = make()
    sim = calibrated(model, [batch(8, s) for s in range(2)])
    tied = [e for e in sim.quantized_params().values() if len(e.names) > 1]
    assert len(tied) == 1, [e.names for e in sim.quantized_params().values()]
    entry = tied[0]
    owners = [sim.model.get_submodule(n.rpartition(".")[0]) for n in entry.names]
    assert all(o.param_quantizers["weight"] is entry.quantizer for o in owners)
    assert len(sim.param_quantizers()) == len({id(p) for p in model.parameters() if p.dim() >= 2})
    paths = sim.export(str(tmp_path), "lm")
    held = entries_of(param_entries(paths["encodings"]), entry.names[0], entry.names)
    assert len(held) == 2, held  # the embedding's table (Gather) and the head's (transposed, MatMul)
    scales = [np.asarray(e["scale"]) for e in held.values()]
    assert np.array_equal(scales[0], scales[1]) and len(scales[0]) == entry.param.shape[0]
    expected = entry.quantizer.encoding(entry.param).scale.numpy()
    assert np.array_equal(scales[0].astype(np.float32), expected)
    ids = batch(16, 77)
    runner = QdqRunner(paths["onnx"], paths["encodings"])
    args = {k: v.numpy() for k, v in ids.items()} if isinstance(ids, dict) else {"ids": ids.numpy()}
    with torch.no_grad():
        ours = logits_of(feed(sim.model.eval(), ids)).numpy()
    assert sqnr_db(ours, runner(**args)) >= 40.0


class FunctionalTiedLM(nn.Module):
    """The output projection reads the embedding table in the model's own code (``F.linear(h, self.tok.weight)``),
    as many LMs do instead of a tied ``lm_head`` module."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(40, 16)
        self.fc = nn.Linear(16, 16)
        self.norm = nn.LayerNorm(16)

    def forward(self, ids):
        h = self.norm(torch.tanh(self.fc(self.tok(ids))))
        return F.linear(h, self.tok.weight)


def test_table_reused_by_functional_code_is_quantized_in_both_uses(tmp_path):
    torch.manual_seed(0)
    model = FunctionalTiedLM().eval()
    ids = torch.randint(0, 40, (8, 6))
    sim = calibrated(model, [ids], param_bw=4)
    entry = sim.quantized_params()["tok.weight"]
    calls = []
    entry.quantizer.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        out = sim.model(ids)
    assert len(calls) == 2, f"the table went through its quantizer {len(calls)} time(s) for 2 uses"
    paths = sim.export(str(tmp_path), "m")
    theirs = QdqRunner(paths["onnx"], paths["encodings"])(ids.numpy())
    step = float(sim.activation_quantizers()["linear_0"].encoding().scale)
    assert np.abs(theirs - out.numpy()).max() <= step, np.abs(theirs - out.numpy()).max() / step


def lstm_order(hidden: int) -> list[int]:
    """PyTorch LSTM gate rows i, f, g, o -> ONNX i, o, f, c."""
    i, f, g, o = (list(range(k * hidden, (k + 1) * hidden)) for k in range(4))
    return i + o + f + g


def gru_order(hidden: int) -> list[int]:
    """PyTorch GRU gate rows r, z, n -> ONNX z, r, h."""
    r, z, n = (list(range(k * hidden, (k + 1) * hidden)) for k in range(3))
    return z + r + n


def recurrent(cell):
    torch.manual_seed(0)
    return sharpen(RecurrentClassifier(cell), 2.0).eval()


@pytest.mark.parametrize("cell,order", [(nn.LSTM, lstm_order), (nn.GRU, gru_order)], ids=["lstm", "gru"])
def test_gate_reordering_is_recorded_as_channel_order(cell, order, tmp_path):
    model = recurrent(cell)
    sim = calibrated(model, [_sequences(16, s) for s in range(2)])
    paths = sim.export(str(tmp_path), "rnn")
    entries = param_entries(paths["encodings"])
    for pname in ("rnn.weight_ih_l0", "rnn.weight_hh_l0", "rnn.weight_ih_l1", "rnn.weight_hh_l1"):
        held = entries_of(entries, pname, [pname])
        assert len(held) == 1, (pname, list(entries))
        (name, e), = held.items()
        assert e["source"] == pname and e["channel_order"] == order(16), (name, e.get("channel_order"))
        entry = sim.quantized_params()[pname]
        ours = entry.quantizer.encoding(entry.param).scale.numpy()
        assert np.array_equal(np.float32(e["scale"]), ours[e["channel_order"]])
        assert e["axis"] == 1  # [num_directions, gates * hidden, in]
    with torch.no_grad():
        x = _sequences(32, 5)
        ours = sim.model(x).numpy()
    theirs = QdqRunner(paths["onnx"], paths["encodings"])(x.numpy())
    assert (ours.argmax(1) == theirs.argmax(1)).all() and np.abs(ours - theirs).max() <= float(
        sim.activation_quantizers()["head"].encoding().scale)


def test_bidirectional_lstm_exports(tmp_path):
    """(The bidirectional GRU is in test_acceptance_torch_models.) The exporter stacks both
    directions' weights into one initializer ``[2, 4H, in]``."""
    torch.manual_seed(0)
    model = sharpen(RecurrentClassifier(nn.LSTM, bidirectional=True), 2.0).eval()
    sim = calibrated(model, [_sequences(16, s) for s in range(2)])
    paths = sim.export(str(tmp_path), "birnn")
    x = _sequences(16, 5)
    with torch.no_grad():
        ours = sim.model(x).numpy()
    assert (QdqRunner(paths["onnx"], paths["encodings"])(x.numpy()).argmax(1) == ours.argmax(1)).all()


def restored(model, dummy, paths, **cfg) -> QuantizationSimModel:
    """A fresh sim of a fresh copy of ``model`` holding the exported .pth weights, encodings loaded."""
    fresh = type(model)(*([model.rnn.__class__] if isinstance(model, RecurrentClassifier) else []))
    fresh.load_state_dict(torch.load(paths["pth"], weights_only=True))
    sim = QuantizationSimModel(fresh.eval(), dummy, QuantConfig(**cfg))
    assert not sim.calibrated
    sim.load_encodings(paths["encodings"])
    assert sim.calibrated
    return sim


@pytest.mark.parametrize("learned", [False, True], ids=["static", "learned_weights"])
def test_load_encodings_round_trip_through_reordered_lstm_weights(learned, tmp_path):
    cfg = dict(param_bw=4, output_bw=8, range_learning=learned, learn_weight_encodings=learned)
    model = recurrent(nn.LSTM)
    batches = [_sequences(16, s) for s in range(2)]
    sim = calibrated(model, batches, **cfg)
    labels = torch.randint(0, 5, (16,), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.Adam(sim.model.parameters(), lr=1e-2)
    sim.model.train()
    for _ in range(5):  # weights (and learned scales) move away from their calibration
        opt.zero_grad()
        F.cross_entropy(sim.model(batches[0]), labels).backward()
        opt.step()
    sim.model.eval()
    paths = sim.export(str(tmp_path), "lstm")
    assert any("channel_order" in e for e in param_entries(paths["encodings"]).values())
    back = restored(model, batches[0], paths, **cfg)
    (a_acts, a_params), (b_acts, b_params) = back.encodings(), sim.encodings()
    assert list(a_acts) == list(b_acts) and list(a_params) == list(b_params)
    for name in b_acts:
        assert torch.equal(a_acts[name].scale, b_acts[name].scale), name
    for name in b_params:
        assert torch.allclose(a_params[name].scale, b_params[name].scale, rtol=1e-6, atol=0), name
    if learned:  # learned scales are the trained ones, not those of the weights' min-max
        entry = back.quantized_params()["rnn.weight_ih_l0"]
        w = entry.param.detach()
        minmax = torch.maximum(w.amax(1) / 7, -w.amin(1) / 8)
        assert not torch.allclose(entry.quantizer.encoding().scale, minmax, rtol=1e-3)
    x = _sequences(32, 9)
    with torch.no_grad():
        assert torch.equal(back.model(x), sim.model(x))


def test_load_encodings_round_trip_tied_lm_after_range_learning(tmp_path):
    model, batch = make_tied_lm()
    batches = [batch(8, s) for s in range(2)]
    cfg = dict(range_learning=True, learn_weight_encodings=True)
    sim = calibrated(model, batches, **cfg)
    range_learning_steps(sim, batches[:1], next_token_loss, batches[:1], steps=5, encoding_lr=1e-2)
    paths = sim.export(str(tmp_path), "lm")
    fresh = type(model)()
    fresh.load_state_dict(torch.load(paths["pth"], weights_only=True))
    back = QuantizationSimModel(fresh.eval(), batches[0], QuantConfig(**cfg))
    back.load_encodings(paths["encodings"])
    with torch.no_grad():
        assert torch.equal(back.model(batches[1]), sim.model.eval()(batches[1]))


def test_token_id_dict_inputs_run_in_their_onnx_dtypes(tmp_path):
    model, batch = make_bert()
    sim = calibrated(model, [batch(8, s) for s in range(2)])
    paths = sim.export(str(tmp_path), "bert")
    runner = QdqRunner(paths["onnx"], paths["encodings"])
    assert [(i.name, i.type) for i in runner.inputs] == [("input_ids", "tensor(int64)"),
                                                         ("attention_mask", "tensor(int64)")]
    b = batch(32, 3)
    with torch.no_grad():
        ours = sim.model(**b).logits.numpy()
    named = runner(**{k: v.numpy().astype(np.int32) for k, v in b.items()})  # cast to int64 by the runner
    positional = runner(b["input_ids"].numpy(), b["attention_mask"].numpy())
    everything = runner.run(**{k: v.numpy() for k, v in b.items()})
    assert runner.output_names == ["logits"] and len(everything) == 1
    for theirs in (named, positional, everything[0]):
        assert (theirs.argmax(-1) == ours.argmax(-1)).all() and sqnr_db(ours, theirs) >= 40.0
