"""Exact per-example squared gradient norms for JAX without forming per-example gradients.

The user's ``loss_fn(params, example)`` is traced for ONE example into a jaxpr (calls to
jitted helpers are inlined). Every parameter leaf that reaches exactly one recognised
equation, through a chain of layout-only steps (reshape, transpose, squeeze, a
floating-point cast), gets a *layer-wise* rule; the equation's output receives a
zero-valued perturbation, whose gradient is the output gradient ``d_i`` of example i,
and the forward pass records the equation's other operand ``a_i``. One vmapped
backward pass then gives every ``d_i``, and the identities of DESIGN.md section 6 give
``||g_i(theta)||^2``:

- ``dot_general`` (dense layers, also over extra axes such as time): with ``A_i`` of
  shape [T, p] and ``D_i`` of shape [T, q] per batch index of the contraction,
  ``||a_i||^2 ||d_i||^2`` when T == 1, else the Gram form
  ``sum_{t,s} (a_it . a_is)(d_it . d_is)`` or the explicit ``||A_i^T D_i||^2``, whichever
  costs fewer operations for the equation's shapes;
- ``conv_general_dilated`` with the parameter as kernel (any stride, padding, dilation;
  one feature and batch group): the same with ``A_i`` the unfolded input patches
  (``lax.conv_general_dilated_patches``), T the output positions;
- ``gather`` of rows of a [vocabulary, features] table (``jnp.take(table, ids, axis=0)``,
  ``table[ids]``): rows of ``D_i`` with equal ids are added before squaring, out-of-range
  ids follow the gather's mode (dropped or clipped);
- ``add``, ``sub``, ``mul`` (biases, LayerNorm / GroupNorm scale and shift, also
  broadcast): the per-example gradient of the parameter is the size of the parameter,
  so it is formed directly from ``a_i`` and ``d_i`` by the equation's own VJP.

The squared norm adds over parameters, so every other leaf (an equation without a
rule, a leaf used more than once such as a tied weight, whose uses have cross terms,
a leaf read inside a custom-derivative or control-flow call, an unused leaf) takes the
exact vmap path in the same pass: the per-example gradients of just those leaves are
formed. The mean-gradient sums of the layer-wise leaves come from one batched VJP of
their equation on the masked ``a`` and ``d``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jax_core

from cabs.backends.jax import BatchSums, _scalar_loss, accumulation_dtype

__all__ = ["METHODS", "explain", "layerwise_batch_sums"]

METHODS = ("auto", "layerwise", "vmap")
LAYERWISE = "layerwise"
VMAP = "vmap"

# Calls whose body is inlined before the analysis, so a parameter used inside a jitted helper is seen.
_INLINED_CALLS = frozenset({"pjit", "jit", "closed_call", "core_call"})
# Steps between a parameter and its use that only move or cast its entries, so its gradient's norm is unchanged.
_LAYOUT_STEPS = frozenset({"reshape", "transpose", "squeeze", "convert_element_type", "copy", "copy_p"})
# Element-wise equations whose per-example parameter gradient is formed directly (biases, norm scale / shift).
_ELEMENTWISE = frozenset({"add", "add_any", "sub", "mul"})
_HIGHEST = lax.Precision.HIGHEST


# --- tracing one example ------------------------------------------------------------------


def _literal_value(atom: Any) -> Any:
    return atom.val if isinstance(atom, jax_core.Literal) else None


def _bind(eqn: Any, *invals: Any) -> Any:
    """Apply ``eqn``'s primitive to ``invals`` with its parameters, as ``jax.core.eval_jaxpr`` does."""
    bind_params = eqn.primitive.get_bind_params(eqn.params)
    # Older JAX returns (subfuns, params); newer JAX the params alone.
    subfuns, bind_params = bind_params if isinstance(bind_params, tuple) else ((), bind_params)
    return eqn.primitive.bind(*subfuns, *invals, **bind_params)


def _evaluate_inlined(closed: jax_core.ClosedJaxpr, *args: Any) -> list[Any]:
    """Evaluate ``closed`` by binding its primitives, evaluating the bodies of jit calls in place."""
    env: dict[Any, Any] = {}

    def read(atom: Any) -> Any:
        return atom.val if isinstance(atom, jax_core.Literal) else env[atom]

    for var, value in zip(closed.jaxpr.constvars, closed.consts, strict=True):
        env[var] = value
    for var, value in zip(closed.jaxpr.invars, args, strict=True):
        env[var] = value
    for eqn in closed.jaxpr.eqns:
        invals = [read(atom) for atom in eqn.invars]
        if eqn.primitive.name in _INLINED_CALLS and isinstance(eqn.params.get("jaxpr"), jax_core.ClosedJaxpr):
            outs = _evaluate_inlined(eqn.params["jaxpr"], *invals)
        else:
            outs = _bind(eqn, *invals)
            outs = outs if eqn.primitive.multiple_results else [outs]
        for var, value in zip(eqn.outvars, outs, strict=True):
            env[var] = value
    return [read(atom) for atom in closed.jaxpr.outvars]


def _example_shapes(batch: Any) -> list[jax.ShapeDtypeStruct]:
    return [
        jax.ShapeDtypeStruct(np.shape(leaf)[1:], jnp.result_type(leaf)) for leaf in jax.tree_util.tree_leaves(batch)
    ]


def _flat_jaxpr(loss_fn: Callable, params: Any, example_shapes: list, batch_treedef: Any) -> jax_core.ClosedJaxpr:
    """The jaxpr of ``loss_fn`` on one example, arguments ``(*param_leaves, *example_leaves)``, jit calls inlined."""
    param_leaves, param_treedef = jax.tree_util.tree_flatten(params)
    leaf_count = len(param_leaves)
    checked = _scalar_loss(loss_fn)

    def flat_loss(*leaves: Any) -> Any:
        params_tree = jax.tree_util.tree_unflatten(param_treedef, leaves[:leaf_count])
        example = jax.tree_util.tree_unflatten(batch_treedef, leaves[leaf_count:])
        return checked(params_tree, example)

    shapes = [jax.ShapeDtypeStruct(jnp.shape(leaf), jnp.result_type(leaf)) for leaf in param_leaves] + example_shapes
    nested = jax.make_jaxpr(flat_loss)(*shapes)
    return jax.make_jaxpr(lambda *leaves: _evaluate_inlined(nested, *leaves))(*shapes)


# --- analysis: which leaves have a layer-wise rule ------------------------------------------


@dataclass(frozen=True)
class _Use:
    """The one recognised use of a parameter leaf: equation ``eqn_index`` reads it at ``operand``."""

    leaf: int
    eqn_index: int
    operand: int
    chain: tuple[Any, ...]  # layout equations from the leaf to the operand
    kind: str  # "dense", "conv", "embedding" or "elementwise"


@dataclass(frozen=True)
class _Plan:
    flat: jax_core.ClosedJaxpr
    uses: tuple[_Use, ...]
    fallback: tuple[int, ...]  # leaves on the exact vmap path


def _consumers(jaxpr: Any) -> dict[Any, list[tuple[int, int]]]:
    readers: dict[Any, list[tuple[int, int]]] = {}
    for index, eqn in enumerate(jaxpr.eqns):
        for position, atom in enumerate(eqn.invars):
            if not isinstance(atom, jax_core.Literal):
                readers.setdefault(atom, []).append((index, position))
    return readers


def _is_norm_preserving(eqn: Any) -> bool:
    """True when the step only moves or casts entries (floating to floating), so gradient norms are kept."""
    size_kept = eqn.primitive.name == "broadcast_in_dim"  # adding axes of size 1 only (expand_dims)
    if (eqn.primitive.name not in _LAYOUT_STEPS and not size_kept) or len(eqn.invars) != 1:
        return False
    source, target = eqn.invars[0].aval, eqn.outvars[0].aval
    if eqn.primitive.name == "convert_element_type":
        return jnp.issubdtype(source.dtype, jnp.floating) and jnp.issubdtype(target.dtype, jnp.floating)
    return math.prod(source.shape) == math.prod(target.shape)


def _is_broadcast(eqn: Any) -> bool:
    return eqn.primitive.name == "broadcast_in_dim" and len(eqn.invars) == 1


def _is_row_gather(eqn: Any, operand: int) -> bool:
    """``table[ids]`` on a 2-d table: whole rows selected by the last (size 1) axis of the indices."""
    if operand != 0:
        return False
    table, indices = eqn.invars[0].aval, eqn.invars[1].aval
    numbers = eqn.params["dimension_numbers"]
    return (
        len(table.shape) == 2
        and len(indices.shape) >= 1
        and indices.shape[-1] == 1
        and tuple(numbers.offset_dims) == (len(indices.shape) - 1,)
        and tuple(numbers.collapsed_slice_dims) == (0,)
        and tuple(numbers.start_index_map) == (0,)
        and not tuple(numbers.operand_batching_dims)
        and not tuple(numbers.start_indices_batching_dims)
        and tuple(eqn.params["slice_sizes"]) == (1, table.shape[1])
        and eqn.params["mode"]
        in (lax.GatherScatterMode.CLIP, lax.GatherScatterMode.FILL_OR_DROP, lax.GatherScatterMode.PROMISE_IN_BOUNDS)
    )


def _classify(eqn: Any, operand: int, chain: tuple[Any, ...]) -> str | None:
    """The rule for a parameter read by ``eqn`` at ``operand`` through ``chain``; None if there is none."""
    name = eqn.primitive.name
    if len(eqn.outvars) != 1:
        return None
    if name in _ELEMENTWISE and len(eqn.invars) == 2:
        # Any broadcast is fine here: the per-example gradient goes back through the chain's own VJP.
        return "elementwise" if all(_is_norm_preserving(step) or _is_broadcast(step) for step in chain) else None
    if not all(_is_norm_preserving(step) for step in chain):
        return None
    if name == "dot_general" and operand in (0, 1):
        return "dense"
    if (
        name == "conv_general_dilated"
        and operand == 1
        and eqn.params["feature_group_count"] == 1
        and eqn.params["batch_group_count"] == 1
    ):
        return "conv"
    if name == "gather" and _is_row_gather(eqn, operand):
        return "embedding"
    return None


def _find_use(jaxpr: Any, leaf: int, readers: dict, outvars: set) -> _Use | None:
    """Follow leaf ``leaf`` through layout steps to its single use; None if it has no rule or several uses."""
    var, chain = jaxpr.invars[leaf], []
    while True:
        uses = readers.get(var, [])
        if len(uses) != 1 or var in outvars:
            return None
        eqn_index, operand = uses[0]
        eqn = jaxpr.eqns[eqn_index]
        if _is_norm_preserving(eqn) or _is_broadcast(eqn):
            chain.append(eqn)
            var = eqn.outvars[0]
            continue
        kind = _classify(eqn, operand, tuple(chain))
        return None if kind is None else _Use(leaf, eqn_index, operand, tuple(chain), kind)


def _plan(loss_fn: Callable, params: Any, batch: Any, method: str) -> _Plan:
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {METHODS}, got method={method!r}.")
    leaf_count = len(jax.tree_util.tree_leaves(params))
    flat = _flat_jaxpr(loss_fn, params, _example_shapes(batch), jax.tree_util.tree_structure(batch))
    if method == VMAP:
        return _Plan(flat, (), tuple(range(leaf_count)))
    jaxpr = flat.jaxpr
    readers = _consumers(jaxpr)
    outvars = {atom for atom in jaxpr.outvars if not isinstance(atom, jax_core.Literal)}
    found = [_find_use(jaxpr, leaf, readers, outvars) for leaf in range(leaf_count)]
    # An equation that reads two parameters (e.g. x @ (a @ b)'s inner product) would need both as
    # per-example records; such leaves take the exact path.
    per_eqn: dict[int, int] = {}
    for use in found:
        if use is not None:
            per_eqn[use.eqn_index] = per_eqn.get(use.eqn_index, 0) + 1
    uses = tuple(use for use in found if use is not None and per_eqn[use.eqn_index] == 1)
    handled = {use.leaf for use in uses}
    fallback = tuple(leaf for leaf in range(leaf_count) if leaf not in handled)
    if method == LAYERWISE and fallback:
        paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
        raise ValueError(
            f'`method` must be "auto" or "vmap" for this loss: method="layerwise" needs a layer rule for every '
            f"parameter, and {[paths[leaf] for leaf in fallback]} have none (used more than once, or by an "
            f'operation without a rule). Use method="auto", which sends just these leaves to the exact vmap path.'
        )
    return _Plan(flat, uses, fallback)


def explain(loss_fn: Callable[[Any, Any], Any], params: Any, example: Any, method: str = "auto") -> dict[str, str]:
    """The method each parameter leaf takes: ``"layerwise"`` or ``"vmap"``, keyed by its pytree path.

    Args:
        loss_fn: ``loss_fn(params, example) -> scalar``, the loss of ONE example.
        params: pytree of floating arrays.
        example: one example (no batch axis), or anything with its shapes and dtypes.
        method: ``"auto"``, ``"layerwise"`` (raises if a leaf has no rule) or ``"vmap"``.

    Returns:
        ``{jax.tree_util.keystr(path): method}`` for every leaf of ``params``.

    Example:
        >>> import jax.numpy as jnp
        >>> def loss_fn(params, example):
        ...     return jnp.sum((example["x"] @ params["w"] + params["b"]) ** 2)
        >>> params = {"w": jnp.ones((3, 2)), "b": jnp.ones(2)}
        >>> explain(loss_fn, params, {"x": jnp.ones(3)})
        {"['b']": 'layerwise', "['w']": 'layerwise'}
    """
    batch = jax.tree_util.tree_map(
        lambda leaf: jax.ShapeDtypeStruct((1, *jnp.shape(leaf)), jnp.result_type(leaf)), example
    )
    plan = _plan(loss_fn, params, batch, method)
    paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    layerwise = {use.leaf for use in plan.uses}
    return {path: (LAYERWISE if leaf in layerwise else VMAP) for leaf, path in enumerate(paths)}


# --- one example's loss with perturbed outputs and recorded inputs ------------------------


def _apply_chain(chain: Sequence[Any], value: Any) -> Any:
    for eqn in chain:
        value = _bind(eqn, value)
    return value


def _apply_use(use: _Use, eqn: Any, leaf_value: Any, others: Sequence[Any]) -> Any:
    """The use's equation with the leaf (through its chain) at its operand and the recorded ``others``."""
    others_iter = iter(others)
    invals = []
    for position, atom in enumerate(eqn.invars):
        if position == use.operand:
            invals.append(_apply_chain(use.chain, leaf_value))
        elif isinstance(atom, jax_core.Literal):
            invals.append(atom.val)
        else:
            invals.append(next(others_iter))
    return _bind(eqn, *invals)


def _perturbed_loss(plan: _Plan, leaves: Sequence[Any], perturbations: Sequence[Any]) -> tuple[Any, list]:
    """One example's loss with ``perturbations[k]`` added to use k's output; also each use's other operands."""
    jaxpr = plan.flat.jaxpr
    by_eqn = {use.eqn_index: (k, use) for k, use in enumerate(plan.uses)}
    records: list[Any] = [None] * len(plan.uses)
    env: dict[Any, Any] = {}

    def read(atom: Any) -> Any:
        return atom.val if isinstance(atom, jax_core.Literal) else env[atom]

    for var, value in zip(jaxpr.constvars, plan.flat.consts, strict=True):
        env[var] = value
    for var, value in zip(jaxpr.invars, leaves, strict=True):
        env[var] = value
    for index, eqn in enumerate(jaxpr.eqns):
        invals = [read(atom) for atom in eqn.invars]
        outs = _bind(eqn, *invals)
        outs = list(outs) if eqn.primitive.multiple_results else [outs]
        if index in by_eqn:
            k, use = by_eqn[index]
            records[k] = tuple(
                value
                for position, (atom, value) in enumerate(zip(eqn.invars, invals, strict=True))
                if position != use.operand and not isinstance(atom, jax_core.Literal)
            )
            outs[0] = outs[0] + perturbations[k]
        for var, value in zip(eqn.outvars, outs, strict=True):
            env[var] = value
    return read(jaxpr.outvars[0]), records


# --- per-example squared norms from a_i and d_i --------------------------------------------


def _outer_sq_norms(activations: Any, output_grads: Any) -> Any:
    """``sum_h ||A_bh^T D_bh||^2`` for ``A`` [b, h, T, p] and ``D`` [b, h, T, q], by the cheapest form."""
    steps, inputs, outputs = activations.shape[2], activations.shape[3], output_grads.shape[3]
    if steps == 1:
        # One position per head: g is an outer product, its norm the product of the two norms.
        return jnp.sum(jnp.sum(activations**2, axis=(2, 3)) * jnp.sum(output_grads**2, axis=(2, 3)), axis=1)
    if steps * steps * (inputs + outputs) <= steps * inputs * outputs:
        gram_a = jnp.einsum("bhtp,bhsp->bhts", activations, activations, precision=_HIGHEST)
        gram_d = jnp.einsum("bhtq,bhsq->bhts", output_grads, output_grads, precision=_HIGHEST)
        return jnp.sum(gram_a * gram_d, axis=(1, 2, 3))
    explicit = jnp.einsum("bhtp,bhtq->bhpq", activations, output_grads, precision=_HIGHEST)
    return jnp.sum(explicit**2, axis=(1, 2, 3))


def _dense_sq_norms(eqn: Any, use: _Use, other: Any, output_grad: Any) -> Any:
    """``dot_general``: the data operand as A [b, h, T, p] and the output gradient as D [b, h, T, q]."""
    (contract_lhs, contract_rhs), (batch_lhs, batch_rhs) = eqn.params["dimension_numbers"]
    data = 1 - use.operand
    data_batch = tuple((batch_lhs, batch_rhs)[data])
    data_contract = tuple((contract_lhs, contract_rhs)[data])
    data_ndim = other.ndim - 1
    data_free = tuple(axis for axis in range(data_ndim) if axis not in data_batch + data_contract)
    size = other.shape[0]
    heads = math.prod(other.shape[1 + axis] for axis in data_batch)
    steps = math.prod(other.shape[1 + axis] for axis in data_free)
    order = (0, *(1 + axis for axis in data_batch + data_free + data_contract))
    activations = jnp.reshape(jnp.transpose(other, order), (size, heads, steps, -1))
    batch_count, free_count = len(data_batch), len(data_free)
    if use.operand == 0:
        # Output axes: contraction batch, the parameter's free axes, then the data's free axes.
        param_free_count = output_grad.ndim - 1 - batch_count - free_count
        batch_axes = tuple(range(1, 1 + batch_count))
        param_axes = tuple(range(1 + batch_count, 1 + batch_count + param_free_count))
        data_axes = tuple(range(1 + batch_count + param_free_count, output_grad.ndim))
        output_grad = jnp.transpose(output_grad, (0, *batch_axes, *data_axes, *param_axes))
    output_grads = jnp.reshape(output_grad, (size, heads, steps, -1))
    return _outer_sq_norms(activations, output_grads)


def _conv_sq_norms(eqn: Any, use: _Use, inputs: Any, output_grad: Any) -> tuple[Any, Any]:
    """``conv_general_dilated`` with the parameter as kernel: patches [b, 1, T, p], output gradient [b, 1, T, q].

    Returns:
        ``(norms, kernel_grad_sum)``: the per-example squared norms, and when the explicit
        per-example products ``A_i^T D_i`` were formed (and the convolution has one feature
        and batch group), their sum over the batch as the kernel's gradient sum (in the
        kernel's layout, before the leaf's chain), else None.
    """
    numbers = eqn.params["dimension_numbers"]
    rhs_spec, out_spec = numbers.rhs_spec, numbers.out_spec
    kernel_shape = eqn.invars[1].aval.shape
    filter_shape = tuple(kernel_shape[axis] for axis in rhs_spec[2:])

    def patches_of(example_input: Any) -> Any:
        return lax.conv_general_dilated_patches(
            example_input,
            filter_shape,
            eqn.params["window_strides"],
            eqn.params["padding"],
            lhs_dilation=eqn.params["lhs_dilation"],
            rhs_dilation=eqn.params["rhs_dilation"],
            dimension_numbers=numbers,
            precision=_HIGHEST,
        )

    # Both in the output layout: positions (batch and spatial axes of the output) first, features last.
    order = (0, 1 + out_spec[0], *(1 + axis for axis in out_spec[2:]), 1 + out_spec[1])
    size = inputs.shape[0]
    sliced = _sliced_patches(eqn, inputs, filter_shape, output_grad)
    if sliced is not None:
        activations = sliced[:, None]
    else:
        patches = jax.vmap(patches_of)(inputs)
        activations = jnp.reshape(jnp.transpose(patches, order), (size, 1, -1, patches.shape[1 + out_spec[1]]))
    output_grads = jnp.reshape(jnp.transpose(output_grad, order), (size, 1, -1, output_grad.shape[1 + out_spec[1]]))
    steps, patch_size, channels = activations.shape[2], activations.shape[3], output_grads.shape[3]
    single_group = eqn.params["feature_group_count"] == 1 and eqn.params["batch_group_count"] == 1
    if steps == 1 or steps * steps * (patch_size + channels) <= steps * patch_size * channels or not single_group:
        return _outer_sq_norms(activations, output_grads), None
    # The explicit form already holds every example's kernel gradient A_i^T D_i: its sum is the
    # kernel's gradient sum, which saves the batched VJP of the convolution (a second weight-gradient pass).
    explicit = jnp.einsum("btp,btq->bpq", activations[:, 0], output_grads[:, 0], precision=_HIGHEST)
    norms = jnp.sum(explicit**2, axis=(1, 2))
    # Patch features are ordered (input channel, filter positions...); the canonical kernel is (O, I, filter...).
    canonical = jnp.reshape(jnp.transpose(jnp.sum(explicit, axis=0)), (channels, -1, *filter_shape))
    return norms, jnp.transpose(canonical, tuple(int(axis) for axis in np.argsort(rhs_spec)))


def _sliced_patches(eqn: Any, inputs: Any, filter_shape: tuple[int, ...], output_grad: Any) -> Any:
    """Patches [b, T, p] as strided slices of the padded input, or None where this does not apply.

    ``conv_general_dilated_patches`` extracts patches by a convolution with an identity
    kernel of p output channels, which costs ``T p^2`` per example (for the paper's second
    MNIST layer, p = 800, more than the layer itself); one strided slice per filter position
    only copies. Positions are ordered (output batch, output spatial axes), features
    (input channel, filter positions), as in the patch convolution's output.
    """
    numbers = eqn.params["dimension_numbers"]
    padding = eqn.params["padding"]
    if any(factor != 1 for factor in eqn.params["lhs_dilation"]) or any(low < 0 or high < 0 for low, high in padding):
        return None
    lhs_spec, out_spec = numbers.lhs_spec, numbers.out_spec
    size = inputs.shape[0]
    canonical = jnp.transpose(inputs, (0, *(1 + axis for axis in lhs_spec)))  # [b, N, C, spatial...]
    canonical = jnp.pad(canonical, ((0, 0), (0, 0), (0, 0), *padding))
    output_sizes = tuple(output_grad.shape[1 + axis] for axis in out_spec[2:])
    strides, dilation = eqn.params["window_strides"], eqn.params["rhs_dilation"]
    slices = []
    for offset in np.ndindex(*filter_shape):
        start = (0, 0, 0, *(position * factor for position, factor in zip(offset, dilation, strict=True)))
        limit = (
            *canonical.shape[:3],
            *(
                first + (count - 1) * stride + 1
                for first, count, stride in zip(start[3:], output_sizes, strides, strict=True)
            ),
        )
        slices.append(lax.slice(canonical, start, limit, (1, 1, 1, *strides)))
    stacked = jnp.stack(slices, axis=3)  # [b, N, C, K, out spatial...]
    spatial = tuple(range(4, stacked.ndim))
    positions = jnp.transpose(stacked, (0, 1, *spatial, 2, 3))
    return jnp.reshape(positions, (size, -1, stacked.shape[2] * stacked.shape[3]))


def _embedding_sq_norms(eqn: Any, indices: Any, output_grad: Any) -> Any:
    """Row gather: rows of D_i with equal (effective) ids add before squaring."""
    rows = eqn.invars[0].aval.shape[0]
    size = indices.shape[0]
    ids = jnp.reshape(indices, (size, -1))
    grads = jnp.reshape(output_grad, (size, ids.shape[1], -1))
    if eqn.params["mode"] == lax.GatherScatterMode.FILL_OR_DROP:
        # Out-of-range rows read the fill value and send no gradient to the table.
        grads = jnp.where(((ids >= 0) & (ids < rows))[..., None], grads, jnp.zeros((), grads.dtype))
    else:
        ids = jnp.clip(ids, 0, rows - 1)

    def one_example(example_ids: Any, example_grads: Any) -> Any:
        order = jnp.argsort(example_ids)
        sorted_ids = example_ids[order]
        segment = jnp.cumsum(
            jnp.concatenate([jnp.zeros(1, jnp.int32), (sorted_ids[1:] != sorted_ids[:-1]).astype(jnp.int32)])
        )
        per_id = jax.ops.segment_sum(example_grads[order], segment, num_segments=example_ids.shape[0])
        return jnp.sum(per_id**2)

    return jax.vmap(one_example)(ids, grads)


def _elementwise_grads(eqn: Any, use: _Use, leaf_value: Any, others: Sequence[Any], output_grad: Any) -> Any:
    """Per-example gradients of a leaf read element-wise (bias, scale): the equation's VJP per example."""

    def one_example(example_others: Any, example_grad: Any) -> Any:
        _, pullback = jax.vjp(lambda value: _apply_use(use, eqn, value, example_others), leaf_value)
        return pullback(example_grad)[0]

    return jax.vmap(one_example)(tuple(others), output_grad)


def _batched_grad_sum(eqn: Any, use: _Use, leaf_value: Any, others: Sequence[Any], output_grad: Any) -> Any:
    """``sum_i g_i`` of a layer-wise leaf: one VJP of the batched equation on the (masked) records."""

    def batched(value: Any) -> Any:
        return jax.vmap(lambda example_others: _apply_use(use, eqn, value, example_others))(tuple(others))

    _, pullback = jax.vjp(batched, leaf_value)
    return pullback(output_grad)[0]


# --- the sums -----------------------------------------------------------------------------


def _keep(mask: Any, values: Any, dtype: Any = None) -> Any:
    """``values`` on the real examples and 0 on padding (``jnp.where``: NaN on padding cannot leak)."""
    values = values if dtype is None else values.astype(dtype)
    wide_mask = jnp.reshape(mask, mask.shape + (1,) * (values.ndim - 1))
    return jnp.where(wide_mask, values, jnp.zeros((), values.dtype))


def layerwise_batch_sums(
    loss_fn: Callable[[Any, Any], Any], params: Any, batch: Any, mask: Any, *, method: str = "auto"
) -> BatchSums:
    """:func:`cabs.backends.jax.batch_sums` with layer-wise norms where a rule applies.

    Pure and traceable (the analysis runs at trace time on shapes). The statistics
    equal those of the vmap path; padded examples (``mask`` False) contribute nothing
    whatever they compute.

    Args:
        loss_fn: ``loss_fn(params, example) -> scalar`` for one example.
        params: pytree of floating arrays.
        batch: pytree of arrays with the (padded) batch on axis 0.
        mask: bool vector, True for real examples.
        method: ``"auto"`` (rules where they apply, the vmap path for the other
            leaves), ``"layerwise"`` (raises ``ValueError`` if a leaf has no rule)
            or ``"vmap"`` (every leaf on the vmap path).

    Returns:
        :class:`cabs.backends.jax.BatchSums` in the accumulation dtype.
    """
    dtype = accumulation_dtype(params)
    plan = _plan(loss_fn, params, batch, method)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    example_leaves = jax.tree_util.tree_leaves(batch)
    eqns = plan.flat.jaxpr.eqns
    size = mask.shape[0]

    def example_loss(fallback_leaves: Any, perturbations: Any, example: Any) -> Any:
        all_leaves = list(leaves)
        for leaf, value in zip(plan.fallback, fallback_leaves, strict=True):
            all_leaves[leaf] = value
        return _perturbed_loss(plan, [*all_leaves, *example], perturbations)

    perturbations = tuple(
        jnp.zeros((size, *eqns[use.eqn_index].outvars[0].aval.shape), eqns[use.eqn_index].outvars[0].aval.dtype)
        for use in plan.uses
    )
    per_example = jax.vmap(jax.value_and_grad(example_loss, argnums=(0, 1), has_aux=True), in_axes=(None, 0, 0))
    (losses, records), (fallback_grads, output_grads) = per_example(
        tuple(leaves[leaf] for leaf in plan.fallback), perturbations, example_leaves
    )

    grad_sum: list[Any] = [None] * len(leaves)
    square_norms = jnp.zeros(size, dtype)
    for leaf, grads in zip(plan.fallback, fallback_grads, strict=True):
        grads = _keep(mask, grads, dtype)
        grad_sum[leaf] = jnp.sum(grads, axis=0)
        square_norms = square_norms + jnp.sum(jnp.reshape(grads, (size, -1)) ** 2, axis=1)
    for use, others, output_grad in zip(plan.uses, records, output_grads, strict=True):
        eqn = eqns[use.eqn_index]
        # Padding is zeroed in a_i and d_i before any product, so NaN there cannot reach a sum.
        output_grad = _keep(mask, output_grad)
        others = tuple(_keep(mask, value) if jnp.issubdtype(value.dtype, jnp.inexact) else value for value in others)
        leaf_value = leaves[use.leaf]
        if use.kind == "elementwise":
            grads = _elementwise_grads(eqn, use, leaf_value, others, output_grad).astype(dtype)
            grad_sum[use.leaf] = jnp.sum(grads, axis=0)
            norms = jnp.sum(jnp.reshape(grads, (size, -1)) ** 2, axis=1)
        else:
            wide = tuple(value.astype(dtype) if jnp.issubdtype(value.dtype, jnp.inexact) else value for value in others)
            if use.kind == "dense":
                norms = _dense_sq_norms(eqn, use, wide[0], output_grad.astype(dtype))
            elif use.kind == "conv":
                norms, kernel_grad_sum = _conv_sq_norms(eqn, use, wide[0], output_grad.astype(dtype))
                if kernel_grad_sum is not None and not use.chain:
                    # The leaf is the kernel itself (no layout steps to undo), in the accumulation dtype.
                    grad_sum[use.leaf] = kernel_grad_sum
            else:
                norms = _embedding_sq_norms(eqn, others[0], output_grad.astype(dtype))
            if grad_sum[use.leaf] is None:
                grad_sum[use.leaf] = _batched_grad_sum(eqn, use, leaf_value, others, output_grad).astype(dtype)
        square_norms = square_norms + _keep(mask, norms)
    return BatchSums(
        count=jnp.sum(mask, dtype=jnp.int32),
        loss_sum=jnp.sum(_keep(mask, losses, dtype)),
        grad_sum=jax.tree_util.tree_unflatten(treedef, grad_sum),
        sq_norm_sum=jnp.sum(square_norms),
    )
