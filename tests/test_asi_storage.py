"""ASI's Tucker form held in 16 bits (``asi-fp16``, ``asi-bf16``) or 8 (``asi-int8``): half or a
quarter of the bytes at the same ranks (8 bits: plus a float32 scale per slice), gradients within a
stated bound of float32 storage on real activations, and a planner that spends the bytes saved on
rank."""

import pytest
import torch

from odl_fed.asi import ASIConv2d, last_conv_names
from odl_fed.asi.storage import dequantize_int8, quantize_int8, tucker_nbytes
from odl_fed.asi.tucker import tucker_numel
from odl_fed.asi.variants import get_variant
from odl_fed.planning.ranks import plan_ranks
from odl_fed.training.data import batches, load_dataset
from odl_fed.training.methods import get_method
from odl_fed.training.models import build_model, prepare_finetune
from odl_fed.training.saved_memory import SavedTensorMeter

# Relative error of dW against the same ranks stored in float32 (measured on these inputs:
# fp16 about 3e-4, bf16 about 2.5e-3, int8 1e-2 to 1.5e-2; the bounds leave 2-4x room).
BOUNDS = {"asi-fp16": 1e-3, "asi-bf16": 1e-2, "asi-int8": 3e-2}
ITEMSIZE = {"asi-fp16": 2, "asi-bf16": 2, "asi-int8": 1}


@pytest.fixture(scope="module")
def real_inputs():
    """The inputs of EfficientNet-Lite0's last 4 convs (packaged ImageNet weights) on real digits."""
    torch.manual_seed(0)
    model = build_model("efficientnet_lite0", weights="imagenet", num_classes=10)
    x, _ = next(batches(load_dataset("mnist-digits", split="test"), batch_size=32, image_size=112))
    names, seen = last_conv_names(model, 4), {}
    handles = [model.get_submodule(n).register_forward_pre_hook(
        lambda module, args, n=n: seen.__setitem__(n, args[0].detach())) for n in names]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return model, seen


def _step(model, name, x, ranks, variant):
    conv = model.get_submodule(name)
    padding = getattr(conv, "static_padding", None)
    layer = ASIConv2d.from_conv(conv, ranks=ranks, variant=variant, name=name,
                                pre_padding=padding if isinstance(padding, torch.nn.Module) else None)
    grad_output = torch.randn(layer(x).shape, generator=torch.Generator().manual_seed(1))
    layer.weight.grad = None
    with SavedTensorMeter(exclude=[layer.weight]) as meter:  # x needs no grad: only the packed form is saved
        out = layer(x)
    out.backward(grad_output)
    return layer.weight.grad.clone(), meter.nbytes, layer


@pytest.mark.parametrize("variant", sorted(BOUNDS))
def test_narrow_storage_holds_fewer_bytes_and_keeps_the_gradient_within_its_bound(real_inputs, variant):
    ranks = (32, 16, 2, 3)  # the batch kept whole, channels and height compressed, width whole
    model, inputs = real_inputs
    for name, x in inputs.items():
        ranks_here = tuple(min(r, d) for r, d in zip(ranks, x.shape))
        reference, reference_bytes, _ = _step(model, name, x, ranks_here, "asi")
        grad, nbytes, layer = _step(model, name, x, ranks_here, variant)
        assert reference_bytes == tucker_nbytes(x.shape, ranks_here, 4) > 0, name
        # every saved number in 2 or 1 bytes instead of 4 (8 bits: and the scales the planner counts)
        assert nbytes == tucker_nbytes(x.shape, ranks_here, ITEMSIZE[variant]), name
        assert nbytes <= reference_bytes * ITEMSIZE[variant] / 4 * 1.05, name  # 8-bit scales: 2.2% at these ranks
        error = ((grad - reference).norm() / reference.norm()).item()
        print(f"{variant} {name}: dW relative to float32 storage {error:.1e}")
        assert 0 < error <= BOUNDS[variant], f"{name} at {ranks_here}: {error:.2e}"
        assert all(b is None or b.dtype == torch.float32 for b in layer.bases())  # warm starts stay float32


def test_the_variant_names_its_storage_and_refuses_one_it_cannot_hold():
    assert get_variant("asi-fp16").storage == torch.float16 and get_variant("asi-bf16").storage == torch.bfloat16
    assert get_variant("asi-int8").storage == torch.int8 and get_method("asi-int8").storage_itemsize == 1
    assert get_method("asi-fp16").storage_itemsize == 2 and get_method("asi").storage_itemsize is None
    with pytest.raises(ValueError, match="storage must be one of"):
        type(get_variant("asi"))(storage=torch.float64)


def test_8_bit_slices_are_scaled_on_their_own_and_round_to_nearest():
    torch.manual_seed(0)
    t = torch.randn(6, 5, 3) * torch.tensor([1e-3, 1.0, 10.0, 0.0, 5.0]).view(1, 5, 1)  # slices of very unequal size
    q, scale = quantize_int8(t, 1)
    assert q.dtype == torch.int8 and scale.shape == (5,) and q.abs().max() <= 127
    back = dequantize_int8(q, scale, 1, torch.float32)
    for c in range(5):  # each slice's error is at most half a step of its own scale, whatever the others hold
        assert (back[:, c] - t[:, c]).abs().max() <= scale[c] / 2 + 1e-12
    assert torch.equal(back[:, 3], t[:, 3])  # an all-zero slice comes back exactly


@pytest.mark.parametrize("method", ["asi-fp16", "asi-int8"])
def test_the_planner_buys_more_rank_with_the_bytes_narrow_storage_saves(method):
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=10)
    convs = prepare_finetune(model, layers=2)
    data = load_dataset("digits", split="train")
    calibration = [b for _, b in zip(range(2), batches(data, batch_size=16, image_size=32, shuffle=True))]
    shapes = {}
    handles = [model.get_submodule(n).register_forward_pre_hook(
        lambda module, args, n=n: shapes.__setitem__(n, tuple(args[0].shape))) for n in convs]
    with torch.no_grad():
        model(calibration[0][0])
    for handle in handles:
        handle.remove()
    budget = sum(torch.Size(s).numel() * 4 for s in shapes.values()) // 8
    wide = plan_ranks(model, convs, calibration, budget, model_name="resnet18")
    itemsize = get_method(method).storage_itemsize
    narrow = plan_ranks(model, convs, calibration, budget, model_name="resnet18", storage_itemsize=itemsize)
    held = {plan: sum(tucker_numel(shapes[n], r) for n, r in plan.targets().items()) for plan in (wide, narrow)}
    assert narrow.total_bytes <= budget and wide.total_bytes <= budget
    assert narrow.total_bytes == sum(tucker_nbytes(shapes[n], r, itemsize) for n, r in narrow.targets().items())
    assert wide.total_bytes == 4 * held[wide]
    assert held[narrow] > held[wide]  # more numbers (rank) for the same budget
