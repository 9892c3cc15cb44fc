"""``sim.model`` sharded with FSDP2 on 2 gloo processes computes what the unsharded simulation
computes: FSDP swaps the module's parameters for sharded, then gathered, tensor objects, and a
parameter the model's code passes straight to an op (a ViT ``cls_token``) must still be found and
quantized (the runtime matches it by name, not by the object the simulation was built with)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn


class TokenModel(nn.Module):
    """ViT-like: a learned token concatenated to the sequence, blocks in a ModuleList, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.randn(1, 1, 8))
        self.blocks = nn.ModuleList([nn.Linear(8, 8) for _ in range(2)])
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        for block in self.blocks:
            x = torch.relu(block(x))
        return self.head(x[:, 0])


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from orchestrator.quant import QuantConfig, QuantizationSimModel
    from orchestrator.train.strategies.fsdp import blocks_of, shard

    torch.manual_seed(0)
    model, x = TokenModel().eval(), torch.randn(4, 3, 8)
    sim = QuantizationSimModel(model, x, QuantConfig(param_bw=4, output_bw=8))
    sim.compute_encodings(lambda m, _: m(x), None)
    assert "cls_token" in sim.param_quantizers()
    with torch.no_grad():
        unsharded = sim.model(x)
        sim.param_quantizers()["cls_token"].enabled = False
        token_float = sim.model(x)
        sim.param_quantizers()["cls_token"].enabled = True
    assert len(blocks_of(sim.model, [])) == 2
    shard(sim.model, [])
    assert type(sim.model.cls_token).__name__ == "DTensor"
    with torch.no_grad():
        sharded = sim.model(x)
    torch.save({"unsharded": unsharded, "token_float": token_float, "sharded": sharded},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_sharded_sim_quantizes_a_parameter_passed_straight_to_an_op(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        out = torch.load(tmp_path / f"rank{rank}.pt")
        assert not torch.allclose(out["token_float"], out["unsharded"])  # the token's 4-bit grid shows
        torch.testing.assert_close(out["sharded"], out["unsharded"])
