"""Any attention module rewritten, by torch.fx, into one whose q, k and v come from Linears (or Conv2ds) of their own.

`trace_attention(name, module, args, kwargs)` traces the module's forward as it was called (tensor arguments stay
inputs; None, flags and other values are fixed to those of the call) and finds its one attention site: q @ k^T
feeding a softmax over the keys whose output is multiplied with v, or F.scaled_dot_product_attention. From each of
q, k and v it walks back to the layer that made it (a Linear, or a Conv2d with groups=1: "the projection"), through
nothing but reshapes, permutes, transposes, unbind/chunk/split, indexing and multiplications by a number; from the
attention's output it walks forward, through the same kind of ops, to the layer that reads it ("the consumer").

Which projection row is which (head h, dim j) of q, k or v is read by value markers: the projections' outputs are
replaced by their channel numbers (and, in a second run, by their token positions; in a third by ones, so that a
multiplication by the softmax scale cancels) and read where q, k, v enter the attention; the consumer's columns
are read the same way from markers put on the attention output. The rewrite (`TracedAttention`):
- q, k, v are new layers holding those rows head-major (dim j of head h is row h * dim + j), laid out as the
  original had them at the attention (heads on the same axis, tokens in the same order, any multiplication by a
  number kept as the number it was);
- everything between q @ k^T and the softmax and between the softmax and attn @ v (scale, relative-position
  biases, masks, head mixing) is the original graph; scaled_dot_product_attention gets the original scale
  explicitly (its default would follow the pruned head dim);
- the attention output is merged heads-major onto the consumer's columns (permuted to that order when they were
  not in it), so a V group is v's rows and the consumer's columns.
The rewrite is bound to the traced call: the batch may change, the other dims of the token layout may not.

Anything else between a projection and the attention (q/k norms, rotary embeddings, pooling, a gate), a projection
also read elsewhere, q and k sharing rows, attention over channels or several attention sites in one module is
refused in one line naming the module and the reason."""
from __future__ import annotations

import inspect
import math
import operator
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten, tree_unflatten

from analysis.attention_capture import SDPA_ARGS, SOFTMAX_FUNCTIONS
from analysis.taylor_prune.attention import PrunedAttention
from evit.models import UnsupportedModelError

VIEW_METHODS = {"view", "reshape", "permute", "transpose", "contiguous", "unbind", "chunk", "split", "flatten",
                "unflatten", "squeeze", "unsqueeze", "swapaxes", "movedim", "float", "type_as", "to"}
VIEW_FUNCTIONS = {operator.getitem, torch.reshape, torch.permute, torch.transpose, torch.unbind, torch.chunk,
                  torch.split, torch.flatten, torch.squeeze, torch.unsqueeze, torch.swapaxes, torch.movedim}
SCALE_METHODS, SCALE_FUNCTIONS = {"mul", "div"}, {operator.mul, operator.truediv, torch.mul, torch.div}
DIVISIONS = {"div", operator.truediv, torch.div}
MATMUL_METHODS, MATMUL_FUNCTIONS = {"matmul", "bmm", "__matmul__"}, {operator.matmul, torch.matmul, torch.bmm}
SHAPE_ATTRIBUTES, SHAPE_METHODS = {"shape", "dtype", "device"}, {"size", "dim"}
PASS_MODULES = (nn.Identity, nn.Dropout)


class Refusal(Exception):
    """Why an attention cannot be rewritten (the caller names the module)."""


class _Tracer(fx.Tracer):
    """Traces one module's own forward: every submodule but a Sequential is a leaf (called, not traced into).
    (Unpickling a rewritten attention traces its generated code again, with no root.)"""

    def __init__(self, root: Optional[nn.Module] = None):
        super().__init__()
        self.traced_root = root

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return module is not self.traced_root and not isinstance(module, nn.Sequential)


def _sizes(spec: tuple, dims: torch.Size) -> list[int]:
    """Dims from a layout spec: an int is itself, (start, stop) the product of `dims[start:stop]` (the token dims
    of the call at hand, so the layout follows the resolution)."""
    return [s if isinstance(s, int) else math.prod(dims[s[0]:s[1]]) for s in spec]


def to_heads(x: torch.Tensor, heads: int, head_axis: Optional[int], rows: tuple, channels_first: bool
             ) -> torch.Tensor:
    """A projection's output (channels head-major: dim j of head h at h * dim + j) laid out as the attention
    reads it: `rows` are the other dims of that layout after the first (which follows the batch), in terms of the
    projection's token dims (`_sizes`), `head_axis` where the heads sit (None: one head)."""
    tokens = x.shape[2:] if channels_first else x.shape[1:-1]
    if channels_first:
        x = x.movedim(1, -1)
    dim, rows = x.shape[-1] // heads, _sizes(rows, tokens)
    if head_axis is None:
        return x.reshape(-1, *rows, dim)
    x = x.reshape(-1, heads, dim).transpose(0, 1).reshape(heads, -1, *rows, dim)
    return x.movedim(0, head_axis)


def merge_heads(x: torch.Tensor, head_axis: Optional[int], positions: Optional[tuple], channels_first: bool
                ) -> torch.Tensor:
    """The attention output (heads at `head_axis`) as its consumer reads it: channels head-major, positions (the
    consumer's input dims after the batch, channels excluded; None: the output's own token dims) in the order the
    tokens had."""
    if head_axis is not None:
        x = x.movedim(head_axis, -2)
        x = x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])
    if positions is not None:
        x = x.reshape(-1, *positions, x.shape[-1])
    return x.movedim(-1, 1) if channels_first else x


def _spans(rows: tuple, tokens: tuple) -> tuple:
    """`rows` as a layout spec over the projection's token dims (see `_sizes`): each row dim the product of the
    next token dims, a 1 a 1; the literal sizes when they do not split that way."""
    spec, j = [], 0
    for r in rows:
        start, size = j, 1
        while j < len(tokens) and size * tokens[j] <= r and (size < r or tokens[j] == 1):
            size *= tokens[j]
            j += 1
        if size != r:
            return tuple(rows)
        spec.append((start, j) if j > start else 1)
    return tuple(spec) if j == len(tokens) else tuple(rows)


class TracedAttention(PrunedAttention):
    """An attention module rewritten by `trace_attention`: `body` is the rewritten graph (returning the output and
    the heads' queries and keys, which `record` takes), `q`, `k`, `v` its projections and `proj` the consumer of the
    attention output. Called as the original was; the arguments fixed at tracing must keep their values."""

    def __init__(self, body: fx.GraphModule, signature: inspect.Signature, inputs: list[str],
                 fixed: dict[str, Any], heads: int, original: str):
        super().__init__()
        self.body, self.num_heads, self.original = body, heads, original
        self.signature, self.inputs, self.fixed = signature, inputs, fixed

    q = property(lambda self: self.body.get_submodule("q"))
    k = property(lambda self: self.body.get_submodule("k"))
    v = property(lambda self: self.body.get_submodule("v"))
    proj = property(lambda self: self.body.get_submodule(self.body.consumer))

    def matmul_channels(self) -> int:
        return _channels(self.q) + _channels(self.v)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        for name, value in self.fixed.items():
            given = bound.arguments[name]
            if (given is None) != (value is None) or (value is not None and given != value):
                raise RuntimeError(f"{self.original} was traced with {name}={value!r} and is called with another "
                                   f"value")
        out, q, k = self.body(*(bound.arguments[name] for name in self.inputs))
        self.record(q, k)
        return out


def _channels(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def _projection(node: fx.Node, modules: dict[str, nn.Module], values: dict) -> Optional[nn.Module]:
    """The layer `node` runs when it is a projection: a Linear, a Conv2d with groups=1, or F.linear on the
    module's parameters (BEiT's qkv with q and v biases of its own: a Linear holding that weight and bias)."""
    if node.op == "call_module":
        layer = modules[node.target]
        if isinstance(layer, nn.Linear) or (isinstance(layer, nn.Conv2d) and layer.groups == 1):
            return layer
    if node.op == "call_function" and node.target is F.linear:
        args = dict(zip(("input", "weight", "bias"), node.args), **node.kwargs)
        weight, bias = values.get(args["weight"]), values.get(args.get("bias"))
        if isinstance(weight, torch.Tensor) and weight.dim() == 2:
            if "projection" not in node.meta:
                layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                                  dtype=weight.dtype)
                with torch.no_grad():
                    layer.weight.copy_(weight)
                    if bias is not None:
                        layer.bias.copy_(bias)
                node.meta["projection"] = layer
            return node.meta["projection"]
    return None


def _is_projection(node: fx.Node, modules: dict[str, nn.Module], values: dict) -> bool:
    return _projection(node, modules, values) is not None


def _is_matmul(node: fx.Node) -> bool:
    return (node.op == "call_method" and node.target in MATMUL_METHODS) or (
        node.op == "call_function" and node.target in MATMUL_FUNCTIONS)


def _is_sdpa(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is F.scaled_dot_product_attention


def _is_shape_query(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target is getattr and node.args[1] in SHAPE_ATTRIBUTES) or (
        node.op == "call_method" and node.target in SHAPE_METHODS)


def _softmax_dim(node: fx.Node, modules: dict[str, nn.Module]) -> Optional[int]:
    """The dim of a softmax node (None: not a softmax)."""
    if node.op == "call_method" and node.target == "softmax":
        return node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    if node.op == "call_function" and node.target in SOFTMAX_FUNCTIONS:
        return node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    if node.op == "call_module" and isinstance(modules[node.target], nn.Softmax):
        return modules[node.target].dim
    return None


def _describe(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"{node.target} ({type(modules[node.target]).__name__})"
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return str(node.target)


def _scalar(value: Any) -> bool:
    return isinstance(value, (int, float)) or (isinstance(value, torch.Tensor) and value.numel() == 1)


def _pass_input(node: fx.Node, modules: dict[str, nn.Module], values: dict) -> Optional[fx.Node]:
    """The tensor a layout op or a multiplication by a number passes on (None: the node is neither)."""
    if node.op == "call_method" and node.target in VIEW_METHODS or (
            node.op == "call_function" and node.target in VIEW_FUNCTIONS):
        return node.args[0] if isinstance(node.args[0], fx.Node) else None
    if node.op == "call_module" and isinstance(modules[node.target], PASS_MODULES):
        return node.args[0]
    if (node.op == "call_method" and node.target in SCALE_METHODS) or (
            node.op == "call_function" and node.target in SCALE_FUNCTIONS):
        tensors = [a for a in node.args if isinstance(a, fx.Node) and not _scalar(values.get(a))]
        others = [a for a in node.args if a not in tensors]
        first = node.args[0] in tensors
        if len(tensors) == 1 and all(_scalar(values.get(a, a)) for a in others) and (
                first or node.target not in DIVISIONS):
            return tensors[0]
    return None


def _why_not(node: fx.Node, role: str, modules: dict[str, nn.Module]) -> str:
    """Why `node`, met between `role`'s projection and the attention, stops the rewrite."""
    where = "between its projection and the attention"
    if node.op == "placeholder":
        return f"{role} is an input of the module ({node.target}), not made by a projection inside it"
    if node.op == "get_attr":
        return f"{role} is a parameter ({node.target}), not a projection of the tokens"
    if node.op == "call_module":
        layer = modules[node.target]
        has_layers = any(isinstance(m, (nn.Linear, nn.Conv2d)) for m in layer.modules())
        if isinstance(layer, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)) or (
                "Norm" in type(layer).__name__ and not has_layers):
            return (f"{role} goes through a norm ({_describe(node, modules)}) {where}: one norm over the head dim "
                    f"cannot lose a different dim in each head")
        if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.modules.pooling._AvgPoolNd, nn.modules.pooling._MaxPoolNd)):
            return f"{role} is pooled or convolved ({_describe(node, modules)}) {where}"
        return f"{role} comes from {_describe(node, modules)}, not from a Linear or a Conv2d"
    name = _describe(node, modules)
    if name in ("normalize", "norm"):
        return (f"{role} is normalized ({name}) {where}: one norm over the head dim cannot lose a different dim "
                f"in each head")
    if name in ("add", "mul", "cat", "sub", "stack", "addcmul") or name.startswith(("__add", "__mul", "__sub")):
        return f"{role} is combined with another tensor ({name}) {where} (a rotary embedding or a gate)"
    if name in ("amax", "max", "mean", "avg_pool2d", "max_pool2d", "adaptive_avg_pool2d"):
        return f"{role} is pooled ({name}) {where}"
    return f"{role} goes through {name} {where}"


def _walk_back(node: fx.Node, role: str, modules: dict[str, nn.Module], values: dict
               ) -> tuple[fx.Node, list[fx.Node]]:
    """(the projection that makes `role`, the layout ops from it to `node`)."""
    path = []
    while not _is_projection(node, modules, values):
        data = _pass_input(node, modules, values)
        if data is None:
            raise Refusal(_why_not(node, role, modules))
        path.append(node)
        node = data
    return node, path


def _inputs(node: fx.Node) -> list[fx.Node]:
    return [a for a in tree_flatten((node.args, node.kwargs))[0] if isinstance(a, fx.Node)]


def _score_matmul(softmax: fx.Node) -> Optional[fx.Node]:
    """The matmul whose product reaches the softmax (through biases, masks, head mixing); None when none does."""
    found, seen, stack = [], set(), [softmax.args[0]] if softmax.args else []
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if _is_matmul(node):
            found.append(node)
        elif node.op not in ("placeholder", "get_attr"):
            stack.extend(_inputs(node))
    if len(found) > 1:
        raise Refusal(f"its softmax reads {len(found)} matmuls, not one q @ k^T")
    return found[0] if found else None


def _output_matmul(softmax: fx.Node) -> tuple[fx.Node, bool]:
    """The matmul the softmax output (through dropout, head mixing) multiplies v in, and whether it is
    v @ attn^T (the output transposed: channels before tokens) rather than attn @ v."""
    found, seen, stack = [], set(), [(u, softmax) for u in softmax.users]
    while stack:
        node, came_from = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if _is_matmul(node):
            found.append((node, node.args[0] is not came_from))
        else:
            stack.extend((u, node) for u in node.users)
    if len(found) != 1:
        raise Refusal(f"its softmax output reaches {len(found)} matmuls, not one attn @ v")
    return found[0]


@dataclass
class Site:
    """One attention in the graph: the op(s) that run it and the nodes where q, k^T (matmul) or k (SDPA) and v
    enter it, and the node of its output."""

    ops: list[fx.Node]
    q: fx.Node
    k: fx.Node
    v: fx.Node
    out: fx.Node
    sdpa: bool
    transposed: bool = False  # v @ attn^T: v is (..., dim, keys) and the output (..., dim, queries)


def _find_site(graph: fx.Graph, modules: dict[str, nn.Module], values: dict) -> Site:
    sites = []
    for node in graph.nodes:
        if _is_sdpa(node):
            args = dict(zip(SDPA_ARGS, node.args), **node.kwargs)
            if args.get("enable_gqa"):
                raise Refusal("grouped-query attention (k and v shared by several heads)")
            sites.append(Site([node], args["query"], args["key"], args["value"], node, True))
            continue
        dim = _softmax_dim(node, modules)
        value = values.get(node)
        if dim is None or not isinstance(value, torch.Tensor) or value.dim() < 3 or dim not in (-1, value.dim() - 1):
            continue
        score = _score_matmul(node)
        if score is None:
            continue  # a softmax over something else (ConViT's positional scores): part of what the site computes
        out, transposed = _output_matmul(node)
        v = out.args[0] if transposed else out.args[1]
        sites.append(Site([score, out], score.args[0], score.args[1], v, out, False, transposed))
    if not sites:
        raise Refusal("no q @ k^T feeds its softmax (attention weights made another way, e.g. by a Linear)")
    if len(sites) > 1:
        raise Refusal(f"it runs {len(sites)} attention sites in one forward; one per module is supported")
    return sites[0]


# --- reading the channel mapping with value markers --------------------------------------------------------------

def _channel_axis(layer: nn.Module) -> int:
    return -1 if isinstance(layer, nn.Linear) else 1


def _markers(shape: torch.Size, axis: int, kind: str) -> torch.Tensor:
    """float64 markers of `shape`: the channel number + 1 along `axis` ('channel'), the position (row-major over the
    other dims) + 1 ('position'), or ones."""
    axis = axis % len(shape)
    if kind == "ones":
        return torch.ones(shape, dtype=torch.float64)
    if kind == "channel":
        view = [1] * len(shape)
        view[axis] = shape[axis]
        return torch.arange(1, shape[axis] + 1, dtype=torch.float64).view(view).expand(shape).contiguous()
    others = [s for i, s in enumerate(shape) if i != axis]
    positions = torch.arange(1, math.prod(others) + 1, dtype=torch.float64).view(others).unsqueeze(axis)
    return positions.expand(shape).contiguous()


def _evaluate(interpreter: fx.Interpreter, values: dict, overrides: dict, compute: list[fx.Node],
              read: list[fx.Node]) -> list[torch.Tensor]:
    """The values at `read` when `overrides` replace nodes' values and `compute` (in graph order) is recomputed
    from them; every other node keeps its traced value."""
    interpreter.env = {**values, **overrides}
    for node in compute:
        interpreter.env[node] = interpreter.run_node(node)
    return [interpreter.env[node] for node in read]


@dataclass
class Layout:
    """How the attention reads a projection: `rows[h]` are head h's projection rows in dim order, heads at
    `head_axis` (negative; None: one head), `rows_shape` the layout's other dims after the first (a `to_heads`
    spec), and the number the values were multiplied by on the way."""

    rows: list[list[int]]
    head_axis: Optional[int]
    rows_shape: tuple
    scale: float


def _read_numbers(marked: torch.Tensor, ones: torch.Tensor, what: str) -> tuple[torch.Tensor, float]:
    """Marker numbers (0-based) from a marked run and the all-ones run; the common factor the ops applied."""
    if not torch.all(ones == ones.flatten()[0]):
        raise Refusal(f"{what} is multiplied by a tensor, not a number")
    scale = float(ones.flatten()[0])
    numbers = marked / scale
    if not torch.allclose(numbers, numbers.round(), atol=1e-3):
        raise Refusal(f"{what} mixes projection channels")
    return numbers.round().long() - 1, scale


def _layout(role: str, channel: torch.Tensor, position: torch.Tensor, ones: torch.Tensor, tokens: tuple
            ) -> Layout:
    """Read how the attention lays out `role` (…, tokens, dim) from its channel and position markers."""
    channel, scale = _read_numbers(channel, ones, role)
    position, _ = _read_numbers(position, ones, role)
    if not torch.equal(channel, channel[..., :1, :].expand_as(channel)):
        if torch.equal(channel, channel[..., :1].expand_as(channel)):
            raise Refusal("attention over channels: its q @ k^T contracts the tokens (the softmax runs over "
                          "channels)")
        raise Refusal(f"{role} mixes channels into the token dim")
    varying = [i for i in range(channel.dim() - 2)
               if not torch.equal(channel, channel.narrow(i, 0, 1).expand_as(channel))]
    if len(varying) > 1:
        raise Refusal(f"{role}'s heads are spread over several dims")
    head_axis = varying[0] - channel.dim() if varying else None
    per_head = channel.movedim(head_axis, 0) if varying else channel.unsqueeze(0)
    rows = [per_head[h].reshape(-1, per_head.shape[-1])[0].tolist() for h in range(per_head.shape[0])]
    order = (position.movedim(head_axis, 0)[0] if varying else position)[..., 0]
    if not torch.equal(position, position[..., :1].expand_as(position)) or not torch.equal(
            order.flatten(), torch.arange(order.numel())):
        raise Refusal(f"{role}'s tokens are reordered between its projection and the attention")
    return Layout(rows, head_axis, _spans(tuple(order.shape[1:]), tokens), scale)


def _merge_markers(shape: torch.Size, head_axis: Optional[int], kind: str) -> torch.Tensor:
    """Markers on the attention output (…, tokens, dim): head-major channel number + 1, or the row position
    (row-major over every dim but the heads and the channels) + 1, or ones."""
    if kind == "ones":
        return torch.ones(shape, dtype=torch.float64)
    heads = shape[head_axis] if head_axis is not None else 1
    moved = list(shape)
    if head_axis is not None:
        moved.pop(head_axis % len(shape))
    rows, dim = moved[:-1], moved[-1]
    if kind == "channel":
        values = torch.arange(1, heads * dim + 1, dtype=torch.float64).view(heads, *[1] * len(rows), dim)
        values = values.expand(heads, *rows, dim)
    else:
        values = torch.arange(1, math.prod(rows) + 1, dtype=torch.float64).view(1, *rows, 1).expand(heads, *rows, dim)
    return (values.movedim(0, head_axis) if head_axis is not None else values[0]).contiguous()


# --- the rewrite -------------------------------------------------------------------------------------------------

def _gather_rows(layer: nn.Module, rows: list[int]) -> nn.Module:
    """A copy of `layer` with only output rows `rows`, in that order (same device and dtype)."""
    weight = layer.weight
    if isinstance(layer, nn.Linear):
        new = nn.Linear(layer.in_features, len(rows), bias=layer.bias is not None, device=weight.device,
                        dtype=weight.dtype)
    else:
        new = nn.Conv2d(layer.in_channels, len(rows), layer.kernel_size, layer.stride, layer.padding,
                        layer.dilation, bias=layer.bias is not None, padding_mode=layer.padding_mode,
                        device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight[rows])
        if layer.bias is not None:
            new.bias.copy_(layer.bias[rows])
    return new


def _replace_uses(node: fx.Node, value: Any) -> None:
    """Put the constant `value` where `node` was used."""
    def swap(a: Any) -> Any:
        if a is node:
            return value
        if isinstance(a, (tuple, list)):
            return type(a)(swap(b) for b in a)
        if isinstance(a, dict):
            return {k: swap(b) for k, b in a.items()}
        return a
    for user in list(node.users):
        user.args, user.kwargs = swap(user.args), swap(user.kwargs)


def _trace(module: nn.Module, args: tuple, kwargs: dict
           ) -> tuple[fx.GraphModule, inspect.Signature, list[str], dict, list]:
    """The module's forward traced as called: (traced module, signature, tensor inputs by name, fixed arguments,
    their values)."""
    signature = inspect.signature(module.forward)
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in signature.parameters.values()):
        raise Refusal("its forward takes *args or **kwargs, which cannot be traced as called")
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    graph = None
    # Sizes (PVT's feature size) stay inputs where the forward only computes with them; None, flags and what the
    # forward branches on are fixed to the traced call.
    for fixing in (lambda v: v is None or isinstance(v, bool) or not isinstance(v, (int, float, list, tuple)),
                   lambda v: True):
        inputs = [n for n, v in bound.arguments.items() if isinstance(v, torch.Tensor) or not fixing(v)]
        fixed = {n: v for n, v in bound.arguments.items() if n not in inputs}
        try:
            graph = _Tracer(module).trace(module, concrete_args=fixed)
            break
        except Exception as e:  # noqa: BLE001 -- any tracing failure is the refusal's reason
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            error = f"its forward cannot be traced by torch.fx ({type(e).__name__}: {first})"
    if graph is None:
        raise Refusal(error)
    codegen = graph._codegen
    if isinstance(codegen, fx.graph._PyTreeCodeGen):  # fixed list arguments: plain inputs, the output unflattened
        output = next(n for n in graph.nodes if n.op == "output")
        output.args = (tree_unflatten(list(output.args[0]), codegen.pytree_info.out_spec),)
        graph._codegen = fx.graph.CodeGen()
    traced = fx.GraphModule(module, graph)
    graph = traced.graph
    for node in list(graph.nodes):  # the checks fx adds for fixed arguments: TracedAttention checks them itself
        if node.op == "call_function" and node.target in (fx._symbolic_trace._assert_is_none, torch._assert):
            graph.erase_node(node)
    graph.eliminate_dead_code()
    for node in [n for n in graph.nodes if n.op == "placeholder"]:
        if not node.users and node.target not in inputs:
            graph.erase_node(node)
    if [n.target for n in graph.nodes if n.op == "placeholder"] != inputs:
        raise Refusal("its forward's non-tensor arguments cannot be fixed to the traced call")
    traced.recompile()
    return traced, signature, inputs, fixed, [bound.arguments[n] for n in inputs]


def _attribute(module: nn.Module, target: str) -> Any:
    obj = module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _outputs_close(a: Any, b: Any) -> float:
    """The largest difference between two outputs of the same structure (inf when the structure differs)."""
    fa, fb = tree_flatten(a)[0], tree_flatten(b)[0]
    if len(fa) != len(fb):
        return math.inf
    diffs = [float((x - y).abs().max()) if isinstance(x, torch.Tensor) and x.numel() else 0.0 for x, y in zip(fa, fb)]
    return max(diffs, default=0.0)


def trace_attention(name: str, module: nn.Module, args: tuple, kwargs: dict) -> TracedAttention:
    """`module` (called with `args`, `kwargs`) as a TracedAttention computing the same function (checked, unless its
    parameters live on the meta device). UnsupportedModelError naming the module and why, when it cannot be."""
    try:
        return _rewrite(module, args, kwargs)
    except Refusal as e:
        raise UnsupportedModelError(f"{name} ({type(module).__name__}): {e}") from None


def _rewrite(module: nn.Module, args: tuple, kwargs: dict) -> TracedAttention:
    on_meta = any(t.is_meta for t in tree_flatten((args, kwargs, list(module.parameters())))[0]
                  if isinstance(t, torch.Tensor))
    with torch.no_grad():
        expected = None if on_meta else module(*args, **kwargs)
    traced, signature, inputs, fixed, tensors = _trace(module, args, kwargs)
    graph = traced.graph
    modules = dict(traced.named_modules())
    interpreter = fx.Interpreter(traced, garbage_collect_values=False)
    with torch.no_grad():
        interpreter.run(*tensors)
    values = dict(interpreter.env)
    site = _find_site(graph, modules, values)
    walks = {role: _walk_back(node, role, modules, values) for role, node in (("q", site.q), ("k", site.k),
                                                                           ("v", site.v))}
    _check_nothing_else_reads(walks, site, modules)
    consumer, chain = _walk_forward(site.out, modules, values)

    layouts = _read_layouts(interpreter, values, site, walks, modules)
    heads = _check_heads(layouts)
    _check_rows(walks, layouts, modules, values)

    merge = _merge_layout(interpreter, values, site, layouts["v"].head_axis, consumer, chain, modules)
    new = _new_projections(walks, layouts, modules, values)
    for role, layer in new.items():  # the graph's module resolves its targets (dead code elimination asks them)
        traced.add_submodule(role, layer)
    graph = _rewire(graph, site, walks, layouts, consumer, chain, merge, modules, values)
    roots = {}
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr") and node.target not in roots:
            roots[node.target] = new[node.target] if node.target in new else _attribute(traced, node.target)
    body = fx.GraphModule(roots, graph, class_name=f"{type(module).__name__}Traced")
    body.consumer = consumer.target
    attention = TracedAttention(body, signature, inputs, fixed, heads, type(module).__name__)
    if expected is not None:
        with torch.no_grad():
            diff = _outputs_close(attention(*args, **kwargs), expected)
        scale = max((float(t.abs().max()) for t in tree_flatten(expected)[0] if isinstance(t, torch.Tensor)
                     and t.numel()), default=1.0)
        if not diff <= 1e-5 * max(1.0, scale):
            raise Refusal(f"the rewritten attention computes another function (max diff {diff:.3g})")
    return attention


def _read_layouts(interpreter: fx.Interpreter, values: dict, site: Site, walks: dict,
                  modules: dict[str, nn.Module]) -> dict[str, Layout]:
    """q's, k's and v's layouts, read from the projections' outputs marked by channel, by position and by ones."""
    projections = list(dict.fromkeys(p for p, _ in walks.values()))
    order = {n: i for i, n in enumerate(interpreter.graph.nodes)}
    compute = sorted({n for _, path in walks.values() for n in path}, key=order.get)
    runs = {}
    for kind in ("channel", "position", "ones"):
        overrides = {p: _markers(values[p].shape, _channel_axis(_projection(p, modules, values)), kind)
                     for p in projections}
        q, kt, v = _evaluate(interpreter, values, overrides, compute, [site.q, site.k, site.v])
        runs[kind] = dict(q=q, k=kt if site.sdpa else kt.transpose(-1, -2),
                          v=v.transpose(-1, -2) if site.transposed else v)
    layouts = {}
    for role, (projection, _) in walks.items():
        shape, conv = values[projection].shape, _channel_axis(_projection(projection, modules, values)) == 1
        tokens = tuple(shape[2:] if conv else shape[1:-1])
        layouts[role] = _layout(role, runs["channel"][role], runs["position"][role], runs["ones"][role], tokens)
    return layouts


def _walk_forward(out: fx.Node, modules: dict[str, nn.Module], values: dict) -> tuple[fx.Node, list[fx.Node]]:
    """(the consumer of the attention output, the layout ops from the output to it)."""
    node, chain = out, []
    while True:
        users = [u for u in node.users if not _is_shape_query(u)]
        if len(users) != 1:
            raise Refusal(f"its attention output is read by {len(users)} ops before any projection")
        user = users[0]
        if user.op == "call_module" and _is_projection(user, modules, values) and user.args[0] is node:
            return user, chain
        if _pass_input(user, modules, values) is not node:
            if user.op == "call_module":
                raise Refusal(f"its attention output goes through {_describe(user, modules)} before its projection")
            raise Refusal(f"its attention output goes through {_describe(user, modules)} before a Linear reads it")
        chain.append(user)
        node = user


def _check_nothing_else_reads(walks: dict, site: Site, modules: dict[str, nn.Module]) -> None:
    """The projections' outputs and the ops on the way reach nothing but the attention (or ask only shapes)."""
    allowed = set(site.ops)
    for projection, path in walks.values():
        allowed |= {projection, *path}
    for role, (projection, path) in walks.items():
        for node in [projection, *path]:
            for user in node.users:
                if user not in allowed and not _is_shape_query(user):
                    raise Refusal(f"{role} is also read outside the attention (by {_describe(user, modules)})")


def _check_heads(layouts: dict[str, Layout]) -> int:
    q, k, v = layouts["q"], layouts["k"], layouts["v"]
    if not (len(q.rows) == len(k.rows) == len(v.rows)) or not (q.head_axis == k.head_axis == v.head_axis):
        raise Refusal("q, k and v do not have their heads on the same axis")
    if len(q.rows[0]) != len(k.rows[0]):
        raise Refusal("q and k have different head dims")
    return len(q.rows)


def _check_rows(walks: dict, layouts: dict[str, Layout], modules: dict[str, nn.Module], values: dict) -> None:
    """Every row of every projection is one dim of one head of q, k or v, once."""
    used: dict[fx.Node, list[int]] = {}
    for role, (projection, _) in walks.items():
        used.setdefault(projection, []).extend(r for head in layouts[role].rows for r in head)
    q_rows = {r for head in layouts["q"].rows for r in head}
    if walks["q"][0] is walks["k"][0] and q_rows & {r for head in layouts["k"].rows for r in head}:
        raise Refusal(f"q and k are the same rows of {walks['q'][0].target} (one op makes both; they cannot be "
                      f"sliced apart)")
    for projection, rows in used.items():
        width = values[projection].shape[_channel_axis(_projection(projection, modules, values))]
        if sorted(rows) != list(range(width)):
            raise Refusal(f"the rows of {projection.target} are not each one dim of one head of q, k or v")


@dataclass
class Merge:
    head_axis: Optional[int]
    positions: Optional[tuple]
    channels_first: bool
    scale: float


def _merge_layout(interpreter: fx.Interpreter, values: dict, site: Site, head_axis: Optional[int],
                  consumer: fx.Node, chain: list[fx.Node], modules: dict[str, nn.Module]) -> Merge:
    """How the consumer reads the attention output; its columns are permuted here into head-major order."""
    shape, layer = values[site.out].shape, modules[consumer.target]
    if site.transposed:  # markers laid out (..., queries, dim), then put as the output has them
        shape = (*shape[:-2], shape[-1], shape[-2])

    def marked(kind: str) -> torch.Tensor:
        markers = _merge_markers(shape, head_axis, kind)
        return markers.transpose(-1, -2).contiguous() if site.transposed else markers

    runs = {kind: _evaluate(interpreter, values, {site.out: marked(kind)}, chain, [consumer.args[0]])[0]
            for kind in ("channel", "position", "ones")}
    axis = _channel_axis(layer)
    channel, scale = _read_numbers(runs["channel"], runs["ones"], "the attention output")
    position, _ = _read_numbers(runs["position"], runs["ones"], "the attention output")
    channel, position = channel.movedim(axis, -1), position.movedim(axis, -1)
    columns = channel.reshape(-1, channel.shape[-1])
    rows = (shape[head_axis] if head_axis is not None else 1) * shape[-1]
    if not torch.equal(columns, columns[:1].expand_as(columns)) or sorted(columns[0].tolist()) != list(range(rows)):
        raise Refusal("its attention output's heads and dims are not each one input channel of "
                      f"{consumer.target}")
    positions = position[..., 0]
    if not torch.equal(position, position[..., :1].expand_as(position)) or not torch.equal(
            positions.flatten(), torch.arange(positions.numel())):
        raise Refusal(f"its attention output's tokens are reordered before {consumer.target}")
    order = torch.argsort(columns[0])  # column of head-major channel c
    if not torch.equal(order, torch.arange(len(order))):
        with torch.no_grad():
            layer.weight.data = layer.weight.data[:, order].contiguous()
    own = [d for i, d in enumerate(shape[:-1]) if head_axis is None or i != head_axis % len(shape)][1:]
    tail = tuple(positions.shape[1:])
    return Merge(head_axis, None if tail == tuple(own) and axis == -1 else tail, axis == 1, scale)


def _new_projections(walks: dict, layouts: dict[str, Layout], modules: dict[str, nn.Module], values: dict
                     ) -> dict[str, nn.Module]:
    """q, k, v layers holding their rows head-major; a projection that is one role's in that order is kept."""
    new = {}
    for role, (projection, _) in walks.items():
        layer = _projection(projection, modules, values)
        rows = [r for head in layouts[role].rows for r in head]
        alone = sum(p is projection for p, _ in walks.values()) == 1
        new[role] = layer if alone and rows == list(range(_channels(layer))) else _gather_rows(layer, rows)
    return new


def _rewire(graph: fx.Graph, site: Site, walks: dict, layouts: dict[str, Layout], consumer: fx.Node,
            chain: list[fx.Node], merge: Merge, modules: dict[str, nn.Module], values: dict) -> fx.Graph:
    """The graph with q, k, v made by the new layers and laid out by `to_heads`, the output merged by
    `merge_heads` onto the consumer, (output, q, k) returned, and what led there before removed."""
    made = {}
    for role, (projection, _) in walks.items():
        layout = layouts[role]
        before = site.ops[0] if role != "v" else site.ops[-1]
        with graph.inserting_before(before):
            node = graph.call_module(role, (projection.args[0],))
            node = graph.call_function(to_heads, (node, len(layout.rows), layout.head_axis, layout.rows_shape,
                                                  _channel_axis(_projection(projection, modules, values)) == 1))
            node.meta["is_wrapped"] = True  # a leaf of any later trace (unpickling traces the code again)
            if layout.scale != 1:
                node = graph.call_function(operator.mul, (node, layout.scale))
        made[role] = node
    if site.sdpa:
        sdpa = site.ops[0]
        args = dict(zip(SDPA_ARGS, sdpa.args), **sdpa.kwargs)
        scale = args.get("scale")
        scale = values[scale] if isinstance(scale, fx.Node) else scale
        args.update(query=made["q"], key=made["k"], value=made["v"],
                    scale=scale if scale is not None else len(layouts["q"].rows[0]) ** -0.5)
        sdpa.args, sdpa.kwargs = (), args
    else:
        score, out = site.ops
        with graph.inserting_before(score):
            kt = graph.call_method("transpose", (made["k"], -2, -1))
        score.args = (made["q"], kt)
        if site.transposed:
            with graph.inserting_before(out):
                out.args = (graph.call_method("transpose", (made["v"], -2, -1)), out.args[1])
        else:
            out.args = (out.args[0], made["v"])
    with graph.inserting_after(site.out):
        result = site.out
        if site.transposed:
            result = graph.call_method("transpose", (result, -2, -1))
        with graph.inserting_after(result):
            merged = graph.call_function(merge_heads, (result, merge.head_axis, merge.positions,
                                                       merge.channels_first))
            merged.meta["is_wrapped"] = True
        if merge.scale != 1:
            with graph.inserting_after(merged):
                merged = graph.call_function(operator.mul, (merged, merge.scale))
    consumer.args = (merged, *consumer.args[1:])
    output = next(n for n in graph.nodes if n.op == "output")
    output.args = ((output.args[0], made["q"], made["k"]),)
    for node in [p for p, _ in walks.values()] + [n for _, path in walks.values() for n in path] + chain:
        for user in list(node.users):
            if _is_shape_query(user):
                _replace_uses(user, values[user])
    graph.eliminate_dead_code()
    created = {n.args[0] if n.target is operator.mul else n for n in made.values()}
    created = {n.args[0] for n in created}  # the call_module nodes of the new layers
    if any(n.op == "call_module" and n.target in made and n not in created for n in graph.nodes):
        raise Refusal("it keeps a layer named q, k or v besides its projections")
    graph.lint()
    return graph
