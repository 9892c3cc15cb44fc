"""Block formats: the names a config gives an element format under a two-level block scale.

OCP and NVIDIA name these as formats (MXFP8 is e4m3 elements under an E8M0 scale per 32), so
``QuantConfig.param_format`` and ``overrides[...].format`` take them by name; each is one element
format (``formats.py``) with one two-level granularity (``granularity.py``), nothing more:

=============  =================================  ============  ===========================
name           elements                           block         scale per block
=============  =================================  ============  ===========================
``lpbq``       int, ``param_bw`` bits, symmetric  param_block   ``param_bw``-bit integer x
                                                  _size          float per channel (AIMET:
                                                                 decompressed_bw = 2 * bw)
``mxfp8``      float8_e4m3fn                      32            E8M0 (power of two)
``mxfp8_e5m2`` float8_e5m2                        32            E8M0
``mxfp4``      float4_e2m1                        32            E8M0
``mxint8``     int8 (k * 2^-6)                    32            E8M0
``nvfp4``      float4_e2m1                        16            float8_e4m3fn x fp32 per tensor
=============  =================================  ============  ===========================

``learnable``: whether ``learn_weight_encodings`` applies (LPBQ trains its per-channel float scale
by LSQ; MX's power-of-two and NVFP4's derived e4m3 block scales follow the weights only). MX and
NVFP4 are activation formats too: dynamic, each block of the last dim scaled from its own values
at run time (``granularity.PerTokenBlocks``), as torchao's and ModelOpt's MX/NVFP4 activations;
LPBQ is for weights only (its integer block scales are calibrated per output channel).
"""

from __future__ import annotations

from dataclasses import dataclass

from .formats import FORMATS, Format, IntFormat
from .granularity import LPBQ, MX, NVFP4, PerBlock, PerTokenBlocks


@dataclass(frozen=True)
class BlockFormat:
    name: str
    element: str  # "int" or a formats.FORMATS name
    granularity: type
    block_size: int  # fixed by the format; 0: the config's param_block_size
    learnable: bool

    def element_format(self, bitwidth: int) -> Format:
        """The element format (``lpbq``: ``bitwidth``-bit symmetric integers; ``mxint8``: 8 bits)."""
        if self.element == "int":
            return IntFormat(bitwidth if self.granularity is LPBQ else 8, True)
        return FORMATS[self.element]

    def granularity_for(self, channel_axis: int, block_axis: int, block_size: int, bitwidth: int) -> PerBlock:
        """The granularity on a weight with these axes (``block_size``: the config's, used by LPBQ)."""
        if self.granularity is LPBQ:
            return LPBQ(channel_axis, block_axis, block_size, scale_bitwidth=bitwidth)
        return self.granularity(channel_axis, block_axis, self.block_size)

    @property
    def for_activations(self) -> bool:
        """Whether activations take this format (dynamic blocks of a fixed size: MX, NVFP4)."""
        return self.granularity is not LPBQ

    def activation_granularity(self) -> PerTokenBlocks:
        """The dynamic granularity of an activation in this format (blocks along the last dim)."""
        return PerTokenBlocks(self.granularity, self.block_size)


BLOCK_FORMATS: dict[str, BlockFormat] = {
    "lpbq": BlockFormat("lpbq", "int", LPBQ, 0, True),
    "mxfp8": BlockFormat("mxfp8", "float8_e4m3fn", MX, 32, False),
    "mxfp8_e5m2": BlockFormat("mxfp8_e5m2", "float8_e5m2", MX, 32, False),
    "mxfp4": BlockFormat("mxfp4", "float4_e2m1", MX, 32, False),
    "mxint8": BlockFormat("mxint8", "int", MX, 32, False),
    "nvfp4": BlockFormat("nvfp4", "float4_e2m1", NVFP4, 16, False),
}

ACTIVATION_BLOCK_FORMATS = tuple(name for name, bf in BLOCK_FORMATS.items() if bf.for_activations)
