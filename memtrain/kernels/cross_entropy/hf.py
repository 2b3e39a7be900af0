"""Make Hugging Face causal LMs compute their training loss with the fused kernel.

``patch_causal_lm_loss(model)`` swaps the model's ``forward`` for one that, whenever ``labels``
are given, runs the decoder, then feeds its last hidden states and the LM head's weight (and bias)
to :func:`linear_cross_entropy` and returns the loss with ``logits=None``: the batch x sequence x
vocabulary logits are never built. Without labels (generation, evaluation) the stock forward runs
unchanged.

Which family it is matters less than what its stock ``forward`` does, so that forward's source is
read once, at patch time: which module it calls as the decoder, what it does to the head's output
before the loss (a scalar scale such as Granite's ``/ config.logits_scaling`` or Cohere's
``* logit_scale``, which folds into the hidden states; a final-logit softcap as in Gemma 2/3),
whether it adds a router load-balancing loss (MoE), and which output class it returns. A forward
doing anything else to the logits or the loss is refused: its loss would not be reproduced.
"""

from __future__ import annotations

import ast
import builtins
import inspect
import sys
import textwrap
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import CodeType
from typing import Any

import torch

from memtrain.errors import MemtrainError

_STOCK_FORWARD = "_memtrain_stock_forward"
Path = tuple[str, ...]  # an attribute chain from the model, e.g. ("config", "logits_scaling")
_HIDDEN_FORMS = {
    "outputs.last_hidden_state",
    "outputs[0]",
    "slice_logits_to_keep(hidden_states, logits_to_keep)",
}
_HEAD_INPUTS = {"hidden_states", "hidden_states[:, slice_indices, :]"}
_TRACKED = {"outputs", "hidden_states", "logits", "loss", "aux_loss"}
_LOSS_KEYWORDS = {"logits", "labels", "vocab_size"}


@dataclass
class _Recipe:
    """What the stock forward does around the decoder, as read from its source."""

    decoder: Path = ()
    decoder_args: tuple[str, ...] = ()  # forward parameters the decoder gets by position
    decoder_keywords: dict[str, str] = field(default_factory=dict)  # decoder kwarg -> parameter
    decoder_gets_kwargs: bool = False
    head: Path = ()
    logit_ops: list[tuple[str, Path]] = field(default_factory=list)  # ("mul"|"div"|"tanh", path)
    has_loss: bool = False
    aux_loss: CodeType | None = None
    aux_coef: Path | None = None
    output_class: type | None = None
    output_fields: dict[str, CodeType] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)  # forward parameter -> its default
    namespace: dict[str, Any] = field(default_factory=dict)
    scale: list[tuple[str, Path]] = field(default_factory=list)
    softcap: Path | None = None


class _Refused(Exception):
    """The stock forward does something the fused loss does not reproduce."""


def _self_path(node: ast.AST) -> Path | None:
    """``self.a.b`` -> ("a", "b"); anything else -> None."""
    names: list[str] = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name) and node.id == "self" and names:
        return tuple(reversed(names))
    return None


def _resolve(model: Any, path: Path) -> Any:
    for name in path:
        model = getattr(model, name)
    return model


def _statements(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """Every statement in source order, nested blocks included."""
    for stmt in body:
        yield stmt
        for name in ("body", "orelse", "finalbody"):
            yield from _statements(getattr(stmt, name, []))


def _target(stmt: ast.stmt) -> str | None:
    if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
        target = stmt.targets[0]
    elif isinstance(stmt, ast.AnnAssign | ast.AugAssign):
        target = stmt.target
    else:
        return None
    return target.id if isinstance(target, ast.Name) else None


def _compile(node: ast.expr, allowed: set[str], namespace: dict[str, Any]) -> CodeType:
    """Compile one stock expression, refusing names the patched forward cannot supply."""
    for name in {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}:
        if name not in allowed and name not in namespace and not hasattr(builtins, name):
            raise _Refused(f"it uses {name!r} in {ast.unparse(node)}")
    return compile(ast.Expression(body=node), "<stock forward>", "eval")


def _read_decoder_call(recipe: _Recipe, call: ast.expr) -> None:
    path = _self_path(call.func) if isinstance(call, ast.Call) else None
    if path is None:
        raise _Refused("its decoder call is not self.<module>(...)")
    recipe.decoder = path
    for arg in call.args:
        if not (isinstance(arg, ast.Name) and arg.id in recipe.params):
            raise _Refused(f"it passes {ast.unparse(arg)} to the decoder")
        recipe.decoder_args += (arg.id,)
    for keyword in call.keywords:
        value = keyword.value
        if keyword.arg is None and isinstance(value, ast.Name) and value.id == "kwargs":
            recipe.decoder_gets_kwargs = True
        elif isinstance(value, ast.Name) and value.id in recipe.params and keyword.arg:
            recipe.decoder_keywords[keyword.arg] = value.id
        else:
            raise _Refused(f"it passes {ast.unparse(keyword)} to the decoder")


def _read_logits(recipe: _Recipe, stmt: ast.stmt) -> None:
    value = stmt.value
    text = ast.unparse(value)
    if isinstance(value, ast.Call) and isinstance(value.func, ast.Attribute):
        if value.func.attr in ("float", "contiguous") and not value.args:
            value = value.func.value  # the kernel accumulates in float32 anyway
            text = ast.unparse(value)
    if text == "logits":
        return
    if text == "torch.tanh(logits)":
        recipe.logit_ops.append(("tanh", ()))
        return
    if isinstance(value, ast.BinOp) and ast.unparse(value.left) == "logits":
        path = _self_path(value.right)
        op = {ast.Mult: "mul", ast.Div: "div"}.get(type(value.op))
        if path is not None and op is not None:
            recipe.logit_ops.append((op, path))
            return
    if isinstance(value, ast.Call) and len(value.args) == 1 and not value.keywords:
        head = _self_path(value.func)
        if head is not None and not recipe.head and ast.unparse(value.args[0]) in _HEAD_INPUTS:
            recipe.head = head
            return
    raise _Refused(f"it computes logits = {text}")


def _read_loss(recipe: _Recipe, stmt: ast.stmt) -> None:
    value = stmt.value
    text = ast.unparse(value)
    if isinstance(stmt, ast.AugAssign):
        if (
            isinstance(stmt.op, ast.Add)
            and isinstance(value, ast.BinOp)
            and isinstance(value.op, ast.Mult)
            and ast.unparse(value.right) == "aux_loss.to(loss.device)"
            and _self_path(value.left) is not None
        ):
            recipe.aux_coef = _self_path(value.left)
            return
        raise _Refused(f"it adds {text} to the loss")
    if text == "None":
        return
    if isinstance(value, ast.Call) and ast.unparse(value.func) == "self.loss_function":
        named = {k.arg: ast.unparse(k.value) for k in value.keywords if k.arg}
        given = [ast.unparse(a) for a in value.args] + [named.get("logits"), named.get("labels")]
        spread = [ast.unparse(k.value) for k in value.keywords if k.arg is None]
        if (
            [name for name in given if name is not None][:2] == ["logits", "labels"]
            and len(value.args) <= 3
            and set(named) <= _LOSS_KEYWORDS
            and spread in ([], ["kwargs"])
        ):
            recipe.has_loss = True
            return
    raise _Refused(f"it computes loss = {text}")


def _read_statement(recipe: _Recipe, stmt: ast.stmt) -> None:
    name = _target(stmt)
    if name not in _TRACKED or getattr(stmt, "value", None) is None:
        return
    if name == "outputs":
        _read_decoder_call(recipe, stmt.value)
    elif name == "hidden_states":
        if ast.unparse(stmt.value) not in _HIDDEN_FORMS:
            raise _Refused(f"it computes hidden_states = {ast.unparse(stmt.value)}")
    elif name == "logits":
        _read_logits(recipe, stmt)
    elif name == "loss":
        _read_loss(recipe, stmt)
    elif ast.unparse(stmt.value) != "None":  # aux_loss
        allowed = set(recipe.params) | {"self", "outputs"}
        recipe.aux_loss = _compile(stmt.value, allowed, recipe.namespace)


def _read_return(recipe: _Recipe, function: ast.FunctionDef) -> None:
    """The output class and how each of its fields is filled, from the stock return."""
    for stmt in _statements(function.body):
        if not (isinstance(stmt, ast.Return) and isinstance(stmt.value, ast.Call)):
            continue
        cls = recipe.namespace.get(ast.unparse(stmt.value.func))
        if not (isinstance(cls, type) and hasattr(cls, "__dataclass_fields__")):
            continue
        if stmt.value.args or any(k.arg is None for k in stmt.value.keywords):
            raise _Refused(f"it returns {ast.unparse(stmt.value)}")
        allowed = {"outputs", "loss", "aux_loss", "logits", "self"}
        recipe.output_class = cls
        recipe.output_fields = {
            k.arg: _compile(k.value, allowed, recipe.namespace) for k in stmt.value.keywords
        }
        return
    raise _Refused("it returns no model output class")


def _split_logit_ops(recipe: _Recipe) -> None:
    """Scalar scales first, then at most one softcap (divide by c, tanh, multiply by c)."""
    ops = list(recipe.logit_ops)
    for index, (op, _) in enumerate(ops):
        if op == "tanh":
            before, after = ops[: index - 1], ops[index + 1 :]
            cap = ops[index - 1] if index else None
            if cap is None or cap[0] != "div" or after != [("mul", cap[1])]:
                raise _Refused("it applies tanh to the logits other than as a softcap")
            recipe.scale, recipe.softcap = before, cap[1]
            return
    recipe.scale = ops


def _read_forward(model: torch.nn.Module) -> _Recipe:
    forward = inspect.unwrap(type(model).forward)
    try:
        source = textwrap.dedent(inspect.getsource(forward))
    except (OSError, TypeError):
        raise _Refused("its forward's source cannot be read") from None
    function = ast.parse(source).body[0]
    if not isinstance(function, ast.FunctionDef):
        raise _Refused("its forward is not a plain function")
    recipe = _Recipe(
        params={
            name: None if p.default is inspect.Parameter.empty else p.default
            for name, p in inspect.signature(forward).parameters.items()
            if name != "self" and p.kind is p.POSITIONAL_OR_KEYWORD
        },
        namespace=sys.modules[forward.__module__].__dict__,
    )
    for stmt in _statements(function.body):
        _read_statement(recipe, stmt)
    if not (recipe.decoder and recipe.head and recipe.has_loss):
        raise _Refused("its forward is not decoder -> head -> self.loss_function")
    if recipe.aux_loss is not None and recipe.aux_coef is None:
        raise _Refused("it computes an auxiliary loss it does not add as coef * aux_loss")
    _split_logit_ops(recipe)
    _read_return(recipe, function)
    return recipe


def _check_modules(model: torch.nn.Module, recipe: _Recipe) -> None:
    """The modules the stock forward calls must be the model's decoder and output embeddings."""
    from transformers.loss.loss_utils import LOSS_MAPPING

    decoders = [getattr(model, "base_model", None)]
    if hasattr(model, "get_decoder"):
        decoders.append(model.get_decoder())
    if not any(_resolve(model, recipe.decoder) is d for d in decoders if d is not None):
        raise _Refused(f"self.{'.'.join(recipe.decoder)} is not its decoder (get_decoder)")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if head is None or _resolve(model, recipe.head) is not head or weight is None:
        raise _Refused(f"self.{'.'.join(recipe.head)} is not a linear output embedding")
    if not isinstance(head, torch.nn.Linear) or type(head).forward is not torch.nn.Linear.forward:
        # e.g. a LoRA-wrapped head: its output is more than weight and bias
        raise _Refused(f"its output embedding is a {type(head).__name__}, not a plain Linear")
    if weight.dim() != 2:
        raise _Refused("its output embedding's weight is not a matrix")
    if model.loss_function is not LOSS_MAPPING["ForCausalLM"]:
        raise _Refused("its loss_function is not the standard causal-LM cross-entropy")


def _recipe(model: torch.nn.Module) -> _Recipe:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    try:
        if config is None or not hasattr(model, "get_output_embeddings"):
            raise _Refused("it is not a Hugging Face *ForCausalLM model")
        recipe = _read_forward(model)
        _check_modules(model, recipe)
    except _Refused as exc:
        reason = " ".join(str(exc).split())
        raise MemtrainError(
            f"patch_causal_lm_loss cannot fuse the loss of model_type={model_type!r} "
            f"({type(model).__name__}): {reason}"
        ) from None
    return recipe


def _causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face causal LM inside a PEFT wrapper (LoRA and the rest call its forward,
    which is what the fused loss replaces), else ``model`` itself."""
    get_base_model = getattr(model, "get_base_model", None)
    if callable(get_base_model) and type(model).__module__.split(".")[0] == "peft":
        inner = get_base_model()
        if isinstance(inner, torch.nn.Module):
            return inner
    return model


def fused_loss_problem(model: torch.nn.Module) -> str | None:
    """Why :func:`patch_causal_lm_loss` cannot fuse ``model``'s loss (None: it can)."""
    try:
        _recipe(_causal_lm(model))
    except MemtrainError as exc:
        return str(exc)
    return None


def _decoder_outputs(
    model: torch.nn.Module, recipe: _Recipe, values: dict[str, Any], extra: dict[str, Any]
) -> Any:
    """Call the decoder as the stock forward does (router logits recorded when asked)."""
    args = [values.get(name) for name in recipe.decoder_args]
    kwargs = {key: values.get(name) for key, name in recipe.decoder_keywords.items()}
    if recipe.decoder_gets_kwargs:
        kwargs.update(extra)
    return _resolve(model, recipe.decoder)(*args, **kwargs)


def _fused_loss(
    model: torch.nn.Module,
    recipe: _Recipe,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    options: dict[str, Any],
) -> torch.Tensor:
    """Head, scale and softcap as the stock forward, cross-entropy as the stock loss."""
    from memtrain.kernels.cross_entropy import linear_cross_entropy

    head = _resolve(model, recipe.head)
    bias = getattr(head, "bias", None)
    scale = 1.0
    for op, path in recipe.scale:
        value = float(_resolve(model, path))
        scale = scale * value if op == "mul" else scale / value
    if scale != 1.0:  # (h W^T + b) * s == (h s) W^T + b s
        hidden = hidden * scale
        bias = None if bias is None else bias * scale
    softcap = None if recipe.softcap is None else _resolve(model, recipe.softcap)
    return linear_cross_entropy(hidden, head.weight, labels.to(hidden.device), bias=bias,
                                softcap=softcap, **options)  # fmt: skip


def _fused_forward(
    model: torch.nn.Module,
    recipe: _Recipe,
    loss_options: dict[str, Any],
    input_ids: torch.Tensor | None,
    labels: torch.Tensor,
    kwargs: dict[str, Any],
) -> Any:
    """The stock forward with labels, the logits never built: same loss, same other outputs."""
    num_items = kwargs.pop("num_items_in_batch", None)
    shift_labels = kwargs.pop("shift_labels", None)
    ignore_index = kwargs.pop("ignore_index", -100)
    return_dict = kwargs.pop("return_dict", True)
    values = {name: kwargs.pop(name, default) for name, default in recipe.params.items()}
    values.update(input_ids=input_ids, labels=labels)
    routed = "output_router_logits" in recipe.params
    if routed and values.get("output_router_logits") is None:
        values["output_router_logits"] = getattr(model.config, "output_router_logits", False)
    outputs = _decoder_outputs(model, recipe, values, kwargs)
    options = dict(loss_options, ignore_index=ignore_index, shift=shift_labels is None)
    options["reduction"] = "sum" if num_items is not None else "mean"
    targets = labels if shift_labels is None else shift_labels
    loss = _fused_loss(model, recipe, outputs[0], targets, options)
    if num_items is not None:
        loss = loss / (num_items.to(loss.device) if torch.is_tensor(num_items) else num_items)
    aux_loss = None
    if recipe.aux_loss is not None and (values.get("output_router_logits") or not routed):
        scope = {**values, "self": model, "outputs": outputs}
        aux_loss = eval(recipe.aux_loss, recipe.namespace, scope)  # the stock expression
        if torch.is_tensor(aux_loss):
            loss = loss + _resolve(model, recipe.aux_coef) * aux_loss.to(loss.device)
    scope = {"outputs": outputs, "loss": loss, "aux_loss": aux_loss, "logits": None, "self": model}
    fields = {
        key: eval(code, recipe.namespace, scope) for key, code in recipe.output_fields.items()
    }
    result = recipe.output_class(**fields)
    return result if return_dict else result.to_tuple()


def patch_causal_lm_loss(model: torch.nn.Module, **loss_options: Any) -> torch.nn.Module:
    """Route ``model(..., labels=...)`` through the fused loss; returns the same model.

    ``loss_options`` go to :func:`linear_cross_entropy` (e.g. ``grad_filter=True``,
    ``impl="torch"``). ``num_items_in_batch`` (gradient accumulation in the HF Trainer) is honoured
    as in the stock loss: summed and divided by it; so are ``shift_labels`` and, for MoE models,
    the router load-balancing loss. A model whose stock loss the kernel cannot reproduce raises a
    one-line :class:`MemtrainError`. Undo with :func:`unpatch_causal_lm_loss`. A PEFT model
    (LoRA, ...) has the causal LM inside it patched; it is returned as given.
    """
    outer, model = model, _causal_lm(model)
    recipe = _recipe(model)
    if hasattr(model, _STOCK_FORWARD):
        return outer
    stock_forward = model.forward
    # The patched forward lives in the model's __dict__; holding the model weakly (and its class
    # forward, not a bound method) keeps that from being a reference cycle, so a dropped model
    # frees its GPU memory at once instead of at the next garbage collection.
    model_ref = weakref.ref(model)
    if "forward" not in model.__dict__:
        class_forward = type(model).forward

        def stock_forward(*args, **kwargs):
            return class_forward(model_ref(), *args, **kwargs)

    def forward(input_ids=None, *args, labels=None, **kwargs):
        if labels is None:
            return stock_forward(input_ids, *args, **kwargs)
        if args:
            raise MemtrainError(
                "with the fused loss, pass model inputs other than input_ids by name"
            )
        return _fused_forward(model_ref(), recipe, loss_options, input_ids, labels, kwargs)

    setattr(model, _STOCK_FORWARD, stock_forward)
    model.forward = forward
    return outer


def unpatch_causal_lm_loss(model: torch.nn.Module) -> torch.nn.Module:
    """Restore the stock ``forward`` replaced by :func:`patch_causal_lm_loss`."""
    inner = _causal_lm(model)
    if hasattr(inner, _STOCK_FORWARD):
        del inner.forward
        delattr(inner, _STOCK_FORWARD)
    return model
