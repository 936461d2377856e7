"""Exact per-example squared gradient norms for PyTorch without forming per-example gradients.

One ordinary forward and backward of the *sum* of the per-example losses gives, for
each supported layer, its input activations ``a_i`` (a forward hook) and the gradient
of example i's own loss with respect to its output, ``d_i`` (a hook on the output
tensor). The identities of DESIGN.md section 6 turn these into ``||g_i(theta)||^2`` for
every parameter ``theta`` of the layer:

- ``nn.Linear``: ``||a_i||^2 ||d_i||^2`` on ``[batch, features]``; on ``[batch, time...,
  features]`` either the Gram form ``sum_{t,s} (a_it . a_is)(d_it . d_is)`` or the
  explicit ``||A_i^T D_i||^2``, whichever costs fewer operations for the layer's shapes.
- ``nn.Conv1d`` / ``nn.Conv2d`` (any stride, padding, padding mode, dilation, groups): the
  same with ``A_i`` the unfolded input patches and ``T`` the output positions.
- ``nn.Embedding``: rows of ``D_i`` that share a token id add before squaring.
- ``nn.LayerNorm``, ``nn.GroupNorm``, ``nn.RMSNorm``: the per-example gradients of the
  element-wise scale and shift are small, so they are formed from the normalised input.

The squared norm adds over parameters, so every other parameter (a layer without a rule,
a custom parameter, and a parameter used more than once, whose uses have cross terms)
takes the exact ``torch.func.vmap`` path on its own. Uses are counted on the autograd
graph of every pass, so tied weights and modules called twice are found whichever way
the model reuses them.

The rules hold only when the layer's input rows are the pass's examples and the hooks see
its real computation, so these layers' parameters take the vmap path as well: a layer whose
input or output leading size is not the number of examples (a batch reshaped to
``[batch * time, features]``, a time-major ``[time, batch, features]``, an unbatched call),
a layer with forward hooks or pre-hooks (its own or global) or an instance-level ``forward``,
and a layer whose parameters are not exactly its ``weight``/``bias`` (old-style
``weight_norm``, pruning). Shapes cannot tell a time-major input from a batch-first one
when the number of steps equals the number of examples: such a model needs ``method="vmap"``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as functional
from torch.func import functional_call, grad, vmap

from cabs._stats import GradStats

__all__ = [
    "METHODS",
    "check_options",
    "check_vmap_supported",
    "layerwise_grad_stats",
    "mean_grad",
    "per_example_sq_norms",
    "plan",
]

METHODS = ("auto", "layerwise", "vmap")
LAYERWISE = "layerwise"
VMAP = "vmap"

# Temporaries of one layer's norm computation (patches, Gram matrices, per-example
# products) are formed a slice of examples at a time, keeping each under this many elements.
TEMPORARY_BUDGET_ELEMENTS = 2**22
# The vmap fallback forms per-example gradients of its parameters a chunk at a time, under this many bytes.
VMAP_BUDGET_BYTES = 256 * 2**20

Norms = dict[str, torch.Tensor]


# Layer rules: each maps (module, its input, the gradient of its output) to per-example squared norms [b]
# keyed by the module's own parameter names. They run under no_grad inside the backward pass.


def _outer_product_sq_norms(activations: torch.Tensor, output_grads: torch.Tensor) -> torch.Tensor:
    """``||A_i^T D_i||^2`` for ``A`` of shape [b, T, p] and ``D`` of shape [b, T, q], by the cheaper form."""
    steps, inputs_size, outputs_size = activations.shape[1], activations.shape[2], output_grads.shape[2]
    if steps == 1:
        return activations.pow(2).sum((1, 2)) * output_grads.pow(2).sum((1, 2))
    gram_cost = steps * steps * (inputs_size + outputs_size)
    explicit_cost = steps * inputs_size * outputs_size
    if gram_cost < explicit_cost:
        activation_gram = torch.bmm(activations, activations.transpose(1, 2))
        output_gram = torch.bmm(output_grads, output_grads.transpose(1, 2))
        return (activation_gram * output_gram).sum((1, 2))
    return torch.bmm(activations.transpose(1, 2), output_grads).pow(2).sum((1, 2))


def _linear_rule(module: torch.nn.Linear, layer_input: torch.Tensor, output_grad: torch.Tensor) -> Norms:
    count = layer_input.shape[0]
    activations = layer_input.reshape(count, -1, layer_input.shape[-1])
    output_grads = output_grad.reshape(count, -1, output_grad.shape[-1])
    norms = {"weight": _outer_product_sq_norms(activations, output_grads)}
    if module.bias is not None:
        norms["bias"] = output_grads.sum(1).pow(2).sum(1)
    return norms


def _linear_cost(module: torch.nn.Linear, layer_input: torch.Tensor) -> int:
    steps = layer_input[0].numel() // layer_input.shape[-1]
    return steps * (module.in_features + module.out_features) + min(
        steps * steps, module.in_features * module.out_features
    )


def _padded_input(module: torch.nn.Module, layer_input: torch.Tensor) -> torch.Tensor:
    """The input as the convolution sees it: padded by the module's padding and padding mode."""
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    return functional.pad(layer_input, module._reversed_padding_repeated_twice, mode=mode)


def _conv_patches(module: torch.nn.Module, padded: torch.Tensor) -> torch.Tensor:
    """The unfolded input patches [b, C_in * prod(kernel), T] in the order of ``weight.view(C_out, -1)``."""
    kernel, dilation, stride = module.kernel_size, module.dilation, module.stride
    if isinstance(module, torch.nn.Conv1d):
        # unfold is two-dimensional: a length-L signal is a 1 x L image with a 1 x k kernel.
        padded = padded.unsqueeze(2)
        kernel, dilation, stride = (1, kernel[0]), (1, dilation[0]), (1, stride[0])
    return functional.unfold(padded, kernel, dilation=dilation, stride=stride)


def _conv_gram_sq_norms(module: torch.nn.Module, padded: torch.Tensor, output_grad: torch.Tensor) -> torch.Tensor:
    """Weight norms by the Gram form on unfolded patches: cheap when there are few output positions."""
    count, groups = padded.shape[0], module.groups
    patches = _conv_patches(module, padded)
    steps = patches.shape[-1]
    # Each group's weights see only their own input channels: the groups are separate layers.
    grouped_patches = patches.reshape(count * groups, -1, steps).transpose(1, 2)
    grouped_grads = output_grad.reshape(count * groups, -1, steps).transpose(1, 2)
    return _outer_product_sq_norms(grouped_patches, grouped_grads).reshape(count, groups).sum(1)


def _conv_explicit_sq_norms(module: torch.nn.Module, padded: torch.Tensor, output_grad: torch.Tensor) -> torch.Tensor:
    """Weight norms from each example's weight gradient, formed for this layer only by one grouped convolution.

    ``g_i[o, c, u] = sum_t d_i[o, t] x_i[c, stride * t + dilation * u]`` is a convolution of the input with
    the output gradient as kernel (stride and dilation swap roles); with the input channels of all
    examples and groups as the convolution's groups, and the channels within a group as its batch, one
    call forms every example's gradient (unfolding the patches costs far more memory traffic on CPU).
    """
    count, groups, spatial = padded.shape[0], module.groups, padded.shape[2:]
    group_inputs = module.in_channels // groups
    convolution = functional.conv1d if isinstance(module, torch.nn.Conv1d) else functional.conv2d
    inputs = padded.reshape(count, groups, group_inputs, *spatial).movedim(2, 0)
    inputs = inputs.reshape(group_inputs, count * groups, *spatial)
    kernels = output_grad.reshape(count * module.out_channels, 1, *output_grad.shape[2:])
    grads = convolution(inputs, kernels, stride=module.dilation, dilation=module.stride, groups=count * groups)
    # Positions past the kernel appear when the stride does not divide the padded size: not part of the weight.
    grads = grads[(..., *(slice(0, size) for size in module.kernel_size))]
    return grads.reshape(group_inputs, count, -1).pow(2).sum((0, 2))


def _conv_rule(module: torch.nn.Module, layer_input: torch.Tensor, output_grad: torch.Tensor) -> Norms:
    count = layer_input.shape[0]
    padded = _padded_input(module, layer_input)
    steps = output_grad[0, 0].numel()
    patch_size = module.weight[0].numel()
    group_outputs = module.out_channels // module.groups
    if steps * steps * (patch_size + group_outputs) < steps * patch_size * group_outputs:
        weight_norms = _conv_gram_sq_norms(module, padded, output_grad)
    else:
        weight_norms = _conv_explicit_sq_norms(module, padded, output_grad)
    norms = {"weight": weight_norms}
    if module.bias is not None:
        norms["bias"] = output_grad.reshape(count, module.out_channels, -1).sum(2).pow(2).sum(1)
    return norms


def _conv_cost(module: torch.nn.Module, layer_input: torch.Tensor) -> int:
    steps = 1
    for size, kernel, stride, dilation, padding in zip(
        layer_input.shape[2:],
        module.kernel_size,
        module.stride,
        module.dilation,
        module._reversed_padding_repeated_twice[::2],
        strict=True,
    ):
        steps *= max(1, (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1)
    patch_size = module.weight[0].numel()
    group_outputs = module.out_channels // module.groups
    return steps * (module.groups * patch_size + module.out_channels) + module.groups * min(
        steps * steps, patch_size * group_outputs
    )


def _embedding_rule(module: torch.nn.Embedding, layer_input: torch.Tensor, output_grad: torch.Tensor) -> Norms:
    count, vocabulary = layer_input.shape[0], module.num_embeddings
    token_ids = layer_input.reshape(count, -1)
    output_grads = output_grad.reshape(count, token_ids.shape[1], -1)
    # Rows of one example with the same id add before squaring: group by (example, id).
    keys = token_ids + torch.arange(count, device=token_ids.device).unsqueeze(1) * vocabulary
    if module.padding_idx is not None:
        keep = token_ids != module.padding_idx
        keys, output_grads = keys[keep], output_grads[keep]
    keys, output_grads = keys.reshape(-1), output_grads.reshape(-1, output_grads.shape[-1])
    unique_keys, group = torch.unique(keys, return_inverse=True)
    row_sums = output_grads.new_zeros(unique_keys.shape[0], output_grads.shape[-1]).index_add_(0, group, output_grads)
    norms = output_grads.new_zeros(count).index_add_(0, unique_keys // vocabulary, row_sums.pow(2).sum(1))
    return {"weight": norms}


def _embedding_cost(module: torch.nn.Embedding, layer_input: torch.Tensor) -> int:
    return 3 * layer_input[0].numel() * module.embedding_dim


def _elementwise_affine_norms(module: torch.nn.Module, normalized: torch.Tensor, output_grad: torch.Tensor) -> Norms:
    """Norms of a scale and shift of shape [C] broadcast over ``[b, C, rest]`` views of the tensors."""
    norms = {}
    if getattr(module, "weight", None) is not None:
        norms["weight"] = (normalized * output_grad).sum(2).pow(2).sum(1)
    if getattr(module, "bias", None) is not None:
        norms["bias"] = output_grad.sum(2).pow(2).sum(1)
    return norms


def _last_dims_view(tensor: torch.Tensor, trailing: int) -> torch.Tensor:
    """[b, ..., *trailing dims] as [b, C, rest] with C the trailing dims flattened, rest the middle ones."""
    return tensor.reshape(tensor.shape[0], -1, trailing).transpose(1, 2)


def _layer_norm_rule(module: torch.nn.LayerNorm, layer_input: torch.Tensor, output_grad: torch.Tensor) -> Norms:
    normalized = functional.layer_norm(layer_input, module.normalized_shape, None, None, module.eps)
    trailing = int(torch.Size(module.normalized_shape).numel())
    return _elementwise_affine_norms(
        module, _last_dims_view(normalized, trailing), _last_dims_view(output_grad, trailing)
    )


def _rms_norm_rule(module: torch.nn.Module, layer_input: torch.Tensor, output_grad: torch.Tensor) -> Norms:
    normalized = functional.rms_norm(layer_input, module.normalized_shape, None, module.eps)
    trailing = int(torch.Size(module.normalized_shape).numel())
    return _elementwise_affine_norms(
        module, _last_dims_view(normalized, trailing), _last_dims_view(output_grad, trailing)
    )


def _group_norm_rule(module: torch.nn.GroupNorm, layer_input: torch.Tensor, output_grad: torch.Tensor) -> Norms:
    normalized = functional.group_norm(layer_input, module.num_groups, None, None, module.eps)
    count, channels = layer_input.shape[0], layer_input.shape[1]
    return _elementwise_affine_norms(
        module, normalized.reshape(count, channels, -1), output_grad.reshape(count, channels, -1)
    )


def _elementwise_cost(module: torch.nn.Module, layer_input: torch.Tensor) -> int:
    return 3 * layer_input[0].numel()


def _rules() -> dict[type, tuple[Callable, Callable]]:
    """Module type -> (rule, elements of temporaries per example)."""
    rules: dict[type, tuple[Callable, Callable]] = {
        torch.nn.Linear: (_linear_rule, _linear_cost),
        torch.nn.Conv1d: (_conv_rule, _conv_cost),
        torch.nn.Conv2d: (_conv_rule, _conv_cost),
        torch.nn.Embedding: (_embedding_rule, _embedding_cost),
        torch.nn.LayerNorm: (_layer_norm_rule, _elementwise_cost),
        torch.nn.GroupNorm: (_group_norm_rule, _elementwise_cost),
    }
    if hasattr(torch.nn, "RMSNorm") and hasattr(functional, "rms_norm"):
        rules[torch.nn.RMSNorm] = (_rms_norm_rule, _elementwise_cost)
    return rules


_RULES = _rules()


def _runs_plain_forward(module: torch.nn.Module) -> bool:
    """True when the rule sees the module's real computation: its own parameters, its class's forward, no hooks.

    A forward hook may replace the output and a pre-hook may swap a weight in (``torch.nn.utils.weight_norm``,
    ``prune``), an instance-level ``forward`` may compute anything, and parameters under other names
    (``weight_g``/``weight_v``) mean ``weight`` is computed from them: the rule's identities would be wrong.
    """
    expected = {"weight", "bias"}
    own = module._parameters
    if not set(own) <= expected or "forward" in module.__dict__:
        return False
    for local_name in expected:
        value = getattr(module, local_name, None)
        if value is not None and own.get(local_name) is not value:
            return False  # the attribute the forward reads is not the registered parameter
    hooks = (
        module._forward_hooks,
        module._forward_pre_hooks,
        getattr(torch.nn.modules.module, "_global_forward_hooks", {}),
        getattr(torch.nn.modules.module, "_global_forward_pre_hooks", {}),
    )
    return not any(hooks)


def _example_rows(module: torch.nn.Module, layer_input: torch.Tensor, output: torch.Tensor, count: int) -> bool:
    """True when dim 0 of the layer's input and output holds the pass's ``count`` examples, one per row.

    A model that reshapes the batch (``x.reshape(b * t, f)``), runs time-major or calls the layer on an
    unbatched tensor breaks the rules' premise that row i belongs to example i alone. Shapes cannot prove
    the premise (a time-major layout with as many steps as examples looks batch-first), but they refuse
    every layout whose leading size differs from the number of examples.
    """
    if isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d)):
        dims_ok = layer_input.dim() == (3 if isinstance(module, torch.nn.Conv1d) else 4)
    elif isinstance(module, torch.nn.Embedding):
        dims_ok = layer_input.dim() >= 1
    elif hasattr(module, "normalized_shape"):  # LayerNorm, RMSNorm: a batch dim in front of the normalised ones
        dims_ok = layer_input.dim() > len(module.normalized_shape)
    else:
        dims_ok = layer_input.dim() >= 2
    return dims_ok and layer_input.shape[0] == count and output.dim() >= 1 and output.shape[0] == count


def _static_rule(module: torch.nn.Module) -> tuple[Callable, Callable] | None:
    """The rule for a module of exactly a supported type (a subclass may change its forward), if its options allow."""
    rule = _RULES.get(type(module))
    if rule is None:
        return None
    if isinstance(module, torch.nn.Embedding) and (module.scale_grad_by_freq or module.sparse):
        return None  # the gradient depends on the batch's id counts, or is sparse
    return rule


# Which parameters take which path ---------------------------------------------------------------


def _trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {key: value for key, value in model.named_parameters() if value.requires_grad}


def _layerwise_owners(model: torch.nn.Module) -> dict[str, tuple[torch.nn.Module, str]]:
    """Trainable parameter name -> (owning supported module, local name), for parameters owned by one module only."""
    owners: dict[int, list[tuple[str, torch.nn.Module, str]]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for local_name, parameter in module.named_parameters(recurse=False):
            qualified = f"{module_name}.{local_name}" if module_name else local_name
            owners.setdefault(id(parameter), []).append((qualified, module, local_name))
    trainable = _trainable(model)
    found = {}
    for key, parameter in trainable.items():
        uses = owners.get(id(parameter), [])
        distinct_modules = {id(module) for _, module, _ in uses}
        # A parameter registered under two names or in two modules is tied: it needs the exact path.
        if len(uses) != 1 or len(distinct_modules) != 1:
            continue
        _, module, local_name = uses[0]
        if _static_rule(module) is not None and _runs_plain_forward(module):
            found[key] = (module, local_name)
    return found


def plan(model: torch.nn.Module, inputs: Any = None) -> dict[str, str]:
    """The method each trainable parameter takes under ``method="auto"``: ``"layerwise"`` or ``"vmap"``.

    Args:
        model: the network.
        inputs: optional model input (a tensor or tuple of tensors, batch on dim 0). With it, one
            forward of the first example also finds parameters used more than once (a module called
            twice, a weight reused outside its module), which take the ``"vmap"`` path; without it
            the plan sees only the model's structure.

    Returns:
        A dict from parameter name (as in ``model.named_parameters()``) to ``"layerwise"`` or ``"vmap"``.

    Example:
        >>> import torch
        >>> plan(torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.PReLU()))
        {'0.weight': 'layerwise', '0.bias': 'layerwise', '1.weight': 'vmap'}
    """
    owners = _layerwise_owners(model)
    methods = {key: (LAYERWISE if key in owners else VMAP) for key in _trainable(model)}
    if inputs is None:
        return methods
    input_tuple = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    with _Capture(owners, count=1) as capture, torch.enable_grad():
        outputs = model(*(tensor[:1] for tensor in input_tuple))
        roots = [tensor for tensor in _tensors_in(outputs) if tensor.grad_fn is not None]
        uses = _parameter_uses(roots, _trainable(model))
    for key in owners:
        if not capture.valid(key, uses):
            methods[key] = VMAP
    return methods


def _tensors_in(value: Any) -> Iterable[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors_in(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors_in(item)


def _parameter_uses(roots: list[torch.Tensor], trainable: dict[str, torch.Tensor]) -> dict[str, int]:
    """How many autograd edges lead into each parameter: more than one means its uses have cross terms."""
    name_of = {id(value): key for key, value in trainable.items()}
    uses = dict.fromkeys(trainable, 0)
    seen: set = set()
    stack = [root.grad_fn for root in roots]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for child, _ in node.next_functions:
            if child is None:
                continue
            variable = getattr(child, "variable", None)
            if variable is not None and id(variable) in name_of:
                uses[name_of[id(variable)]] += 1
            stack.append(child)
    return uses


# The hooks ---------------------------------------------------------------------------------------


class _Capture:
    """Forward hooks on the supported modules; each registers a hook on its output that computes the norms."""

    def __init__(
        self,
        owners: dict[str, tuple[torch.nn.Module, str]],
        count: int,
        accumulate_dtype: torch.dtype | None = None,
    ):
        self.count = count
        self.accumulate_dtype = accumulate_dtype
        # Modules whose input rows are not the pass's examples: their parameters take the vmap path.
        self.refused: set[torch.nn.Module] = set()
        self.names: dict[torch.nn.Module, dict[str, str]] = {}
        self.module_of = {key: module for key, (module, _) in owners.items()}
        for key, (module, local_name) in owners.items():
            self.names.setdefault(module, {})[local_name] = key
        self.calls: dict[torch.nn.Module, int] = {}
        self.norms: Norms = {}
        self.inputs: dict[torch.nn.Module, torch.Tensor] = {}
        self.handles: list = []

    def __enter__(self) -> _Capture:
        for module in self.names:
            self.handles.append(module.register_forward_hook(self._forward_hook, with_kwargs=True))
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for handle in self.handles:
            handle.remove()

    def valid(self, key: str, uses: dict[str, int]) -> bool:
        """True when the layer rule gives the whole gradient of ``key``: one module call and one use of it."""
        module = self.module_of[key]
        return self.calls.get(module, 0) == 1 and uses[key] == 1 and module not in self.refused

    def _forward_hook(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        self.calls[module] = self.calls.get(module, 0) + 1
        layer_input = args[0] if args else next(iter(kwargs.values()), None)
        if not (
            isinstance(layer_input, torch.Tensor)
            and isinstance(output, torch.Tensor)
            and _example_rows(module, layer_input, output, self.count)
        ):
            self.refused.add(module)
            return
        if self.accumulate_dtype is None or not output.requires_grad:
            return
        if self.calls[module] == 1:
            # Held here, not in the hook's closure, so the input is freed once its norms are done,
            # as autograd frees saved activations during the backward, not when the graph dies.
            self.inputs[module] = layer_input
            output.register_hook(lambda output_grad: self._backward_hook(module, output_grad))

    def _backward_hook(self, module: torch.nn.Module, output_grad: torch.Tensor) -> None:
        layer_input = self.inputs.pop(module, None)
        # A module called more than once has cross terms between its calls: the vmap path takes it.
        if self.calls[module] != 1 or layer_input is None:
            return
        rule, cost = _static_rule(module)
        # Named in profiles, so the time of the statistics can be told from the ordinary backward's.
        with torch.no_grad(), torch.profiler.record_function("cabs::layerwise_norms"):
            if layer_input.is_floating_point() and layer_input.dtype != self.accumulate_dtype:
                layer_input = layer_input.to(self.accumulate_dtype)
            output_grad = output_grad.to(self.accumulate_dtype)
            count = layer_input.shape[0]
            slice_size = max(1, TEMPORARY_BUDGET_ELEMENTS // max(1, cost(module, layer_input)))
            pieces: dict[str, list[torch.Tensor]] = {}
            for start in range(0, count, slice_size):
                stop = min(start + slice_size, count)
                for local_name, norms in rule(module, layer_input[start:stop], output_grad[start:stop]).items():
                    pieces.setdefault(local_name, []).append(norms)
        for local_name, norms in pieces.items():
            if local_name in self.names[module]:  # a frozen parameter of the layer has no entry
                self.norms[self.names[module][local_name]] = torch.cat(norms)


# One pass ----------------------------------------------------------------------------------------


def _check_losses(losses: Any, count: int) -> None:
    if not isinstance(losses, torch.Tensor) or tuple(losses.shape) != (count,) or not losses.is_floating_point():
        shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
        raise ValueError(
            f"`loss_fn` must return per-example losses, a floating tensor of shape [m], got shape={shape} for a "
            f"batch of m={count}. Use reduction='none', e.g. torch.nn.CrossEntropyLoss(reduction='none')."
        )


def _vmap_sq_norms(
    model: torch.nn.Module, loss_fn: Callable, keys: list[str], inputs: tuple, targets: tuple, chunk_size: int | None
) -> Norms:
    """Per-example squared norms of the parameters ``keys`` only, from per-example gradients formed with vmap."""
    differentiable = {key: value.detach() for key, value in model.named_parameters() if key in keys}
    fixed = {key: value.detach() for key, value in model.named_parameters() if key not in differentiable}
    fixed.update({key: value.detach() for key, value in model.named_buffers()})

    def example_loss(differentiable: dict, example_inputs: tuple, example_targets: tuple) -> torch.Tensor:
        batch_inputs = tuple(tensor.unsqueeze(0) for tensor in example_inputs)
        batch_targets = tuple(tensor.unsqueeze(0) for tensor in example_targets)
        outputs = functional_call(model, (differentiable, fixed), batch_inputs)
        return loss_fn(outputs, batch_targets[0] if len(batch_targets) == 1 else batch_targets).reshape(())

    per_example_grads = vmap(grad(example_loss), in_dims=(None, 0, 0), randomness="different")
    accumulate_dtype = _accumulate_dtype(dict(model.named_parameters()).values())
    count = inputs[0].shape[0]
    bytes_per_example = sum(value.numel() * max(value.element_size(), 4) for value in differentiable.values())
    chunk = chunk_size or max(1, min(count, VMAP_BUDGET_BYTES // max(1, bytes_per_example)))
    pieces: dict[str, list[torch.Tensor]] = {key: [] for key in differentiable}
    with torch.no_grad(), torch.profiler.record_function("cabs::vmap_norms"):
        for start in range(0, count, chunk):
            grads = per_example_grads(
                differentiable,
                tuple(tensor[start : start + chunk] for tensor in inputs),
                tuple(tensor[start : start + chunk] for tensor in targets),
            )
            for key, value in grads.items():
                pieces[key].append(value.to(accumulate_dtype).reshape(value.shape[0], -1).pow(2).sum(1))
    return {key: torch.cat(value) for key, value in pieces.items()}


def _accumulate_dtype(parameters: Iterable[torch.Tensor]) -> torch.dtype:
    """float64 when any parameter is float64, else float32 (also for float16 / bfloat16)."""
    return torch.float64 if any(value.dtype == torch.float64 for value in parameters) else torch.float32


def _one_pass(
    model: torch.nn.Module,
    loss_fn: Callable,
    inputs: tuple,
    targets: tuple,
    method: str,
    with_norms: bool = True,
    vmap_chunk_size: int | None = None,
) -> tuple[torch.Tensor, Norms]:
    """Forward and backward of the summed loss (adding to ``.grad``); per-example squared norms of every parameter.

    Returns the sum of the losses (detached) and, when ``with_norms``, a dict parameter name -> norms [b].
    """
    trainable = _trainable(model)
    accumulate_dtype = _accumulate_dtype(trainable.values())
    owners = _layerwise_owners(model) if with_norms and method != VMAP else {}
    count = inputs[0].shape[0]
    with _Capture(owners, count, accumulate_dtype) as capture, torch.enable_grad():
        losses = loss_fn(model(*inputs), targets[0] if len(targets) == 1 else targets)
        _check_losses(losses, count)
        total = losses.sum()
        uses = _parameter_uses([total], trainable) if owners else {}
        total.backward()
    loss_sum = losses.detach().to(accumulate_dtype).sum()
    if not with_norms:
        return loss_sum, {}
    norms: Norms = {}
    exact_keys = []
    for key, parameter in trainable.items():
        if key in owners and capture.valid(key, uses) and key in capture.norms:
            norms[key] = capture.norms[key]
        elif key in owners and uses[key] == 0 and capture.module_of[key] not in capture.refused:
            norms[key] = torch.zeros(count, dtype=accumulate_dtype, device=parameter.device)  # unused this pass
        else:
            exact_keys.append(key)
    if method == LAYERWISE and exact_keys:
        raise ValueError(
            f'`method` must be "auto" or "vmap" for this model: method="layerwise" needs a layer rule for every '
            f"trainable parameter, got parameters without one (or used more than once, or in a layer that sees a "
            f"reshaped batch, has forward hooks or a patched forward): {exact_keys}. "
            f'Use method="auto", which sends just these parameters to the exact vmap path.'
        )
    if exact_keys:
        with _renormalised_tables_fixed(model):
            norms.update(_vmap_sq_norms(model, loss_fn, exact_keys, inputs, targets, vmap_chunk_size))
    return loss_sum, norms


def _max_norm_embeddings(model: torch.nn.Module) -> list[tuple[str, torch.nn.Embedding]]:
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Embedding) and module.max_norm is not None
    ]


@contextlib.contextmanager
def _renormalised_tables_fixed(model: torch.nn.Module) -> Iterator[None]:
    """``max_norm`` off in every Embedding while the vmap part runs after the ordinary pass of the same examples.

    ``max_norm`` renormalises the looked-up rows of the table in place during the forward, which vmap
    cannot run. The ordinary pass has just renormalised exactly the rows these examples look up, and a
    renormalised row is below ``max_norm``, so a second renormalisation would leave it as it is: the
    forward without ``max_norm`` computes the same values.
    """
    embeddings = [module for _, module in _max_norm_embeddings(model)]
    saved = [module.max_norm for module in embeddings]
    for module in embeddings:
        module.max_norm = None
    try:
        yield
    finally:
        for module, max_norm in zip(embeddings, saved, strict=True):
            module.max_norm = max_norm


def check_vmap_supported(model: torch.nn.Module) -> None:
    """Raise ``ValueError`` when ``method="vmap"`` cannot run ``model`` (an Embedding with ``max_norm``)."""
    found = _max_norm_embeddings(model)
    if found:
        name, module = found[0]
        raise ValueError(
            f'`method` must be "auto" or "layerwise" for this model, got method="vmap" with Embedding '
            f"'{name or '<model>'}' (max_norm={module.max_norm}): max_norm renormalises the table in place "
            f"during the forward, which per-example gradients under torch.func.vmap cannot express. Use "
            f'method="auto" (its ordinary pass renormalises the table first) or remove max_norm.'
        )


def _chunks(inputs: tuple, targets: tuple, max_examples_per_pass: int | None) -> Iterable[tuple[tuple, tuple]]:
    count = inputs[0].shape[0]
    size = count if max_examples_per_pass is None else max_examples_per_pass
    for start in range(0, count, size):
        yield (
            tuple(tensor[start : start + size] for tensor in inputs),
            tuple(tensor[start : start + size] for tensor in targets),
        )


def _as_tuple(value: Any) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def check_options(method: str, max_examples_per_pass: int | None) -> None:
    """Raise ``ValueError`` for an unknown ``method`` or a ``max_examples_per_pass`` that is not a positive int."""
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {METHODS}, got method={method!r}.")
    if max_examples_per_pass is not None and (
        isinstance(max_examples_per_pass, bool)
        or not isinstance(max_examples_per_pass, int)
        or max_examples_per_pass < 1
    ):
        raise ValueError(
            f"`max_examples_per_pass` must be a positive integer or None, got max_examples_per_pass="
            f"{max_examples_per_pass!r}. Pick how many examples fit in memory in one forward and backward."
        )


def _accumulated_passes(
    model: torch.nn.Module,
    loss_fn: Callable,
    inputs: tuple,
    targets: tuple,
    method: str,
    max_examples_per_pass: int | None,
    with_norms: bool,
    vmap_chunk_size: int | None = None,
) -> tuple[int, torch.Tensor, dict[str, list[torch.Tensor]], dict[str, torch.Tensor]]:
    """Run the passes: count, loss sum, per-example norms and the summed gradients (at least accumulation dtype).

    The summed gradient of a parameter of the accumulation dtype is its ``.grad``; a narrower parameter's
    is a wider copy (its ``.grad`` must keep the parameter's dtype).
    """
    inputs, targets = _as_tuple(inputs), _as_tuple(targets)
    trainable = _trainable(model)
    accumulate_dtype = _accumulate_dtype(trainable.values())
    # Parameters narrower than the accumulation dtype have their chunk gradients summed in a wider copy.
    narrow = {key: value for key, value in trainable.items() if value.dtype != accumulate_dtype}
    wide_sums = {key: torch.zeros_like(value, dtype=accumulate_dtype) for key, value in narrow.items()}
    for parameter in trainable.values():
        parameter.grad = None
    loss_sum = None
    norms: dict[str, list[torch.Tensor]] = {}
    for chunk_inputs, chunk_targets in _chunks(inputs, targets, max_examples_per_pass):
        chunk_loss, chunk_norms = _one_pass(
            model, loss_fn, chunk_inputs, chunk_targets, method, with_norms, vmap_chunk_size
        )
        loss_sum = chunk_loss if loss_sum is None else loss_sum + chunk_loss
        for key, value in chunk_norms.items():
            norms.setdefault(key, []).append(value)
        for key, parameter in narrow.items():
            if parameter.grad is not None:
                wide_sums[key] += parameter.grad.to(accumulate_dtype)
                parameter.grad = None
    grad_sums = {}
    for key, parameter in trainable.items():
        if key in narrow:
            grad_sums[key] = wide_sums[key]
        elif parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)  # not used by this batch: a zero gradient
        grad_sums.setdefault(key, parameter.grad)
    return inputs[0].shape[0], loss_sum, norms, grad_sums


def per_example_sq_norms(
    model: torch.nn.Module,
    loss_fn: Callable,
    inputs: tuple,
    targets: tuple,
    *,
    method: str = "auto",
    max_examples_per_pass: int | None = None,
) -> dict[str, torch.Tensor]:
    """Per-example squared gradient norms ``||g_i(theta)||^2`` of every trainable parameter ``theta``.

    Args:
        model, loss_fn, inputs, targets: as for :func:`layerwise_grad_stats`.
        method: ``"auto"`` or ``"layerwise"``.
        max_examples_per_pass: as for :func:`layerwise_grad_stats`.

    Returns:
        A dict parameter name -> tensor [m] in the accumulation dtype. Leaves the *summed* gradient in ``.grad``.
    """
    check_options(method, max_examples_per_pass)
    _, _, norms, grad_sums = _accumulated_passes(model, loss_fn, inputs, targets, method, max_examples_per_pass, True)
    _write_mean_grads(_trainable(model), grad_sums, 1)
    return {key: torch.cat(value) for key, value in norms.items()}


def layerwise_grad_stats(
    model: torch.nn.Module,
    loss_fn: Callable,
    inputs: tuple,
    targets: tuple,
    *,
    method: str = "auto",
    max_examples_per_pass: int | None = None,
    vmap_chunk_size: int | None = None,
) -> GradStats:
    """``GradStats`` from one ordinary forward and backward per pass; leaves the mean gradient in ``.grad``.

    Args:
        model: the network (validated by the caller).
        loss_fn: ``loss_fn(outputs, targets)`` returning per-example losses [m].
        inputs: the model's input, a tensor or a tuple of tensors (positional arguments), batch on dim 0.
        targets: a tensor or a tuple of tensors, batch on dim 0.
        method: ``"auto"`` (layer rules where they apply, vmap for the rest) or ``"layerwise"`` (a
            ``ValueError`` when a parameter has no layer rule).
        max_examples_per_pass: split the batch into passes of at most this many examples; counts, loss sums,
            gradient sums and squared norm sums add, so the result is that of the whole batch.
        vmap_chunk_size: examples per vmap call for the parameters without a layer rule (None: a memory budget).

    Returns:
        :class:`cabs.GradStats` of 0-d tensors in float64 when a parameter is float64, else float32.
    """
    check_options(method, max_examples_per_pass)
    count, loss_sum, norms, grad_sums = _accumulated_passes(
        model, loss_fn, inputs, targets, method, max_examples_per_pass, True, vmap_chunk_size
    )
    trainable = _trainable(model)
    accumulate_dtype = _accumulate_dtype(trainable.values())
    device = loss_sum.device
    sq_norm_sum = torch.zeros((), dtype=accumulate_dtype, device=device)
    for pieces in norms.values():
        for value in pieces:
            sq_norm_sum += value.sum()
    with torch.no_grad():
        # From the summed gradients, before they are narrowed; multi-tensor kernels keep small steps fast.
        grad_sq_norm = torch.stack(torch._foreach_norm(list(grad_sums.values()))).pow(2).sum() / (count * count)
    _write_mean_grads(trainable, grad_sums, count)
    return GradStats(
        count=torch.tensor(count, dtype=torch.int64, device=device),
        loss=loss_sum / count,
        grad_sq_norm=grad_sq_norm,
        sq_norm_sum=sq_norm_sum,
    )


def mean_grad(
    model: torch.nn.Module,
    loss_fn: Callable,
    inputs: tuple,
    targets: tuple,
    *,
    max_examples_per_pass: int | None = None,
) -> torch.Tensor:
    """A plain step's gradient: the mean gradient in ``.grad``, no statistics; returns the mean loss.

    This is what a loop with ``stats_every=k`` runs on the steps without statistics.
    """
    check_options("auto", max_examples_per_pass)
    count, loss_sum, _, grad_sums = _accumulated_passes(
        model, loss_fn, inputs, targets, VMAP, max_examples_per_pass, False
    )
    _write_mean_grads(_trainable(model), grad_sums, count)
    return loss_sum / count


def _write_mean_grads(trainable: dict[str, torch.Tensor], grad_sums: dict[str, torch.Tensor], count: int) -> None:
    """``.grad`` = summed gradient / count, in the parameter's dtype."""
    with torch.no_grad():
        in_place = [grad_sums[key] for key, value in trainable.items() if grad_sums[key] is value.grad]
        if in_place:
            torch._foreach_div_(in_place, count)  # one multi-tensor kernel keeps small steps fast
        for key, parameter in trainable.items():
            if grad_sums[key] is not parameter.grad:
                parameter.grad = (grad_sums[key] / count).to(parameter.dtype)
