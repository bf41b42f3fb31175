"""FLOPs of a train step, counted on fake tensors: what the model FLOP utilisation (MFU) of a run
and of the benches is computed from.

Counted are matrix products, convolutions and attention, forward and backward, by torch's
FlopCounterMode formulas (a multiply and an add are two FLOPs), with two corrections: the CPU's
fused attention, which torch leaves out, counts as CUDA's attention kernels do, and a grouped
(depthwise) convolution's weight gradient counts as its forward, not as an ungrouped convolution.
Elementwise work, norms and the optimizer's update are not counted: MFU's numerator is the model's
arithmetic, the part a GPU's peak FLOP/s describes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import (
    FlopCounterMode,
    conv_flop_count,
    flop_registry,
    sdpa_backward_flop,
    sdpa_flop,
    shape_wrapper,
)

aten = torch.ops.aten


def convolution_backward_flops(
    grad_out_shape,
    input_shape,
    weight_shape,
    bias_sizes,
    stride,
    padding,
    dilation,
    transposed,
    output_padding,
    groups,
    output_mask,
    **kwargs,
) -> int:
    """A convolution's input and weight gradients each cost its forward's multiplications. Torch's own
    formula counts the weight gradient as an ungrouped convolution: c times too much for a depthwise one."""
    forward = conv_flop_count(list(input_shape), list(weight_shape), list(grad_out_shape), transposed)
    return forward * (int(output_mask[0]) + int(output_mask[1]))


# On shapes, as FlopCounterMode's custom_mapping takes them.
CORRECTIONS = {
    aten._scaled_dot_product_flash_attention_for_cpu: lambda query, key, value, *args, **kwargs: sdpa_flop(
        query, key, value
    ),
    aten._scaled_dot_product_flash_attention_for_cpu_backward: lambda grad, query, key, value, *args, **kwargs: (
        sdpa_backward_flop(grad, query, key, value)
    ),
    aten.convolution_backward: convolution_backward_flops,
}
# The same formulas on an op's tensors and output (``out_val``), for a dispatch mode of one's own
# (bench/peak_memory.py counts them per phase of the step).
FLOP_FORMULAS = {**flop_registry, **{op: shape_wrapper(formula) for op, formula in CORRECTIONS.items()}}


def train_step_flops(build_model: Callable[[], nn.Module], loss: Callable[[nn.Module], torch.Tensor]) -> int:
    """FLOPs of one train step's forward and backward: ``loss(model)`` on a model that ``build_model``
    makes, and the gradients of all it requires grad for.

    Both run on fake tensors (shapes and dtypes, no arithmetic, no memory), so the count costs no
    device time and touches no real weights, optimizer or EMA: real tensors that ``loss`` reads (a
    batch, a frozen encoder's weights) are taken as constants. Torch's global generators are restored
    afterwards (model initialisation and dropout draw from them); ``loss`` should draw from a
    generator of its own. Autocast changes no count. The model should be built without activation
    checkpointing: what a checkpoint recomputes is counted again, and MFU counts the model's FLOPs
    (recomputing costs time, which MFU should show, not hide).
    """
    devices = [torch.cuda.current_device()] if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices), FakeTensorMode(allow_non_fake_inputs=True):
        model = build_model().train()
        with FlopCounterMode(display=False, custom_mapping=CORRECTIONS) as counter:
            loss(model).backward()
    return counter.get_total_flops()
