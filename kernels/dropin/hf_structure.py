"""What a transformers model does between its LM head and its loss, read from its ``forward``.

:func:`read_forward` parses the source of the model class's ``forward`` (the function the class
runs, whatever wrapper, FSDP2 subclass or decorator sits on top) and returns a
:class:`ForwardPlan`: where the head is, and the small program of logit processing that runs
between ``logits = self.<head>(...)`` and ``self.loss_function(logits, labels, ...)``. Every
family's own code is the ground truth; nothing is listed per family. What the program may hold:

- scalings ``logits * s``, ``s * logits``, ``logits / s``, ``logits *= s``, ``.mul_(s)``/``.div_(s)``
  (Cohere's ``logit_scale``, Granite's ``logits_scaling``, ``output_multiplier`` ...);
- ``torch.tanh(logits)`` / ``logits.tanh()`` (with the scalings around it: a soft-cap);
- a vocabulary slice ``logits[..., :n]`` (a padded head whose loss sees the first n entries);
- dtype casts and ``.contiguous()`` (no effect on the fused loss, which computes in fp32);
- ``if <scalar test>:`` blocks over these (``if self.config.final_logit_softcapping is not
  None``), and calls of a submodule or function whose body is one ``return`` of such an
  expression (Inkling's ``Softcap`` module), inlined;
- scalar bindings (``cap = self.config.logits_soft_cap``, ``(c := ...)``) read at call time, so
  a config changed after patching is honoured, as the model honours it.

Anything else that touches the logits (a write into them, a loop, another function of them) is
refused with the line that does it; inside an ``if`` branch it becomes an :class:`Unfusable`
step instead, so that a call taking that branch runs the model's own, unfused loss (xLSTM's
chunked evaluation branch). :func:`evaluate_plan` runs the program at call time and returns the
op's parameters: a scale s of the logits (applied as ``hidden·s`` and ``bias·s``, the same
linear), the soft-cap c and the vocabulary kept.
"""

from __future__ import annotations

import ast
import builtins
import dataclasses
import inspect
import math
import textwrap
from typing import Any, Callable

import torch

HEAD = "<head>"  # the name of the head's raw output in the program


class Unsupported(Exception):
    """The forward does something to the logits that the fused loss cannot express."""


@dataclasses.dataclass(frozen=True)
class Scale:
    value: Callable  # env -> number or tensor
    invert: bool  # logits / value
    text: str


@dataclasses.dataclass(frozen=True)
class Tanh:
    text: str = "tanh"


@dataclasses.dataclass(frozen=True)
class VocabSlice:
    stop: Callable  # env -> int or None
    text: str


@dataclasses.dataclass(frozen=True)
class Cond:
    """``then`` or ``orelse`` ops by a test (an inlined function's ``if …: return``)."""

    test: Callable
    then: tuple
    orelse: tuple
    text: str


@dataclasses.dataclass(frozen=True)
class Bind:
    name: str
    value: Callable
    text: str


@dataclasses.dataclass(frozen=True)
class Apply:
    dst: str
    src: str  # HEAD or a logits name
    ops: tuple  # Scale / Tanh / VocabSlice, in order


@dataclasses.dataclass(frozen=True)
class Branch:
    test: Callable
    then: tuple
    orelse: tuple
    text: str


@dataclasses.dataclass(frozen=True)
class Unfusable:
    reason: str


@dataclasses.dataclass(frozen=True)
class ForwardPlan:
    """The head and the logit program of one model class's ``forward``."""

    head_path: str  # dotted path of the output embeddings from the model ("lm_head")
    program: tuple  # Bind / Apply / Branch / Unfusable, in source order
    result: str  # the logits name the loss function receives
    source_name: str  # "LlamaForCausalLM.forward", for messages

    def describe(self) -> str:
        """The processing in words (for reports): ``plain`` or the steps, e.g.
        ``if …: /c, tanh, ×c``."""
        words = _describe(self.program)
        return "; ".join(words) if words else "plain"


def _describe_ops(ops):
    words = []
    for op in ops:
        if isinstance(op, Cond):
            words.append(f"if {op.text}: {', '.join(_describe_ops(op.then)) or 'nothing'} "
                         f"else: {', '.join(_describe_ops(op.orelse)) or 'nothing'}")
        else:
            words.append(op.text)
    return words


def _describe(program):
    words = []
    for step in program:
        if isinstance(step, Apply):
            words += _describe_ops(step.ops)
        elif isinstance(step, Branch):
            inner = "; ".join(_describe(step.then)) or "nothing"
            other = "; ".join(_describe(step.orelse))
            words.append(f"if {step.text}: {inner}" + (f" else: {other}" if other else ""))
        elif isinstance(step, Unfusable):
            words.append(f"unfused ({step.reason})")
    return words


@dataclasses.dataclass
class LogitParams:
    """What :func:`evaluate_plan` returns: the fused loss of ``post·tanh(pre·z)`` (or ``pre·z``
    without tanh) over the first ``vocab`` classes. ``scale`` multiplies the hidden states (and
    bias); ``softcap`` is the op's."""

    scale: Any = 1.0
    softcap: float | None = None
    vocab: int | None = None  # None: the head's whole vocabulary


# ---------------------------------------------------------------------------------------------
# scalar expressions: compiled to closures over a call-time environment (dict of names)
# ---------------------------------------------------------------------------------------------

_CMP = {ast.Is: lambda a, b: a is b, ast.IsNot: lambda a, b: a is not b,
        ast.Eq: lambda a, b: a == b, ast.NotEq: lambda a, b: a != b, ast.Lt: lambda a, b: a < b,
        ast.LtE: lambda a, b: a <= b, ast.Gt: lambda a, b: a > b, ast.GtE: lambda a, b: a >= b}
_BIN = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
        ast.Div: lambda a, b: a / b, ast.FloorDiv: lambda a, b: a // b, ast.Pow: lambda a, b: a ** b}
SHAPE = "<logits shape>"  # env entry: name -> that logits' shape at this point of the program


class _Compiler:
    """Compiles the forward's statements between the head and the loss into a program."""

    def __init__(self, model, fn, globals_):
        self.model = model
        self.fn = fn
        self.globals = globals_
        self.inline_depth = 0

    # -- scalars ---------------------------------------------------------------------------

    def scalar(self, node, logits_names, subst):
        """A closure ``env -> value`` for an expression that is not logits-valued."""
        if isinstance(node, ast.Constant):
            value = node.value
            return lambda env: value
        if isinstance(node, ast.Name):
            if node.id in logits_names:
                raise Unsupported(f"uses the logits as a number in `{ast.unparse(node)}`")
            if node.id in subst:
                return subst[node.id]
            name, globals_ = node.id, self.globals

            def read(env):
                if name in env:
                    return env[name]
                if name in globals_:
                    return globals_[name]
                if hasattr(builtins, name):
                    return getattr(builtins, name)
                raise Unsupported(f"the name {name!r} has no value where the loss is fused")
            return read
        if isinstance(node, ast.Attribute):
            if (node.attr == "shape" and isinstance(node.value, ast.Name)
                    and node.value.id in logits_names):
                name = node.value.id
                return lambda env: env[SHAPE](name)
            base, attr = self.scalar(node.value, logits_names, subst), node.attr
            return lambda env: getattr(base(env), attr)
        if isinstance(node, ast.Subscript):
            base = self.scalar(node.value, logits_names, subst)
            index = self.scalar(node.slice, logits_names, subst)
            return lambda env: base(env)[index(env)]
        if isinstance(node, ast.Call):
            func = self.scalar(node.func, logits_names, subst)
            args = [self.scalar(a, logits_names, subst) for a in node.args]
            if any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords):
                raise Unsupported(f"unpacks arguments in `{ast.unparse(node)}`")
            kws = {k.arg: self.scalar(k.value, logits_names, subst) for k in node.keywords}
            return lambda env: func(env)(*[a(env) for a in args], **{k: v(env) for k, v in kws.items()})
        if isinstance(node, ast.Compare):
            first = self.scalar(node.left, logits_names, subst)
            rest = [(_CMP[type(op)], self.scalar(c, logits_names, subst))
                    for op, c in zip(node.ops, node.comparators)]

            def compare(env):
                left = first(env)
                for op, right in rest:
                    value = right(env)
                    if not op(left, value):
                        return False
                    left = value
                return True
            return compare
        if isinstance(node, ast.BoolOp):
            parts = [self.scalar(v, logits_names, subst) for v in node.values]
            if isinstance(node.op, ast.And):
                def all_of(env):
                    value = True
                    for p in parts:
                        value = p(env)
                        if not value:
                            return value
                    return value
                return all_of

            def any_of(env):
                value = False
                for p in parts:
                    value = p(env)
                    if value:
                        return value
                return value
            return any_of
        if isinstance(node, ast.UnaryOp):
            operand = self.scalar(node.operand, logits_names, subst)
            if isinstance(node.op, ast.Not):
                return lambda env: not operand(env)
            if isinstance(node.op, ast.USub):
                return lambda env: -operand(env)
        if isinstance(node, ast.BinOp) and type(node.op) in _BIN:
            op = _BIN[type(node.op)]
            left = self.scalar(node.left, logits_names, subst)
            right = self.scalar(node.right, logits_names, subst)
            return lambda env: op(left(env), right(env))
        if isinstance(node, ast.NamedExpr):
            value, name = self.scalar(node.value, logits_names, subst), node.target.id

            def bind(env):
                env[name] = result = value(env)
                return result
            return bind
        if isinstance(node, ast.IfExp):
            test = self.scalar(node.test, logits_names, subst)
            a = self.scalar(node.body, logits_names, subst)
            b = self.scalar(node.orelse, logits_names, subst)
            return lambda env: a(env) if test(env) else b(env)
        if isinstance(node, (ast.Tuple, ast.List)):
            items = [self.scalar(e, logits_names, subst) for e in node.elts]
            return lambda env: tuple(i(env) for i in items)
        if isinstance(node, ast.Slice):
            parts = [self.scalar(p, logits_names, subst) if p is not None else (lambda env: None)
                     for p in (node.lower, node.upper, node.step)]
            return lambda env: slice(*(p(env) for p in parts))
        raise Unsupported(f"cannot read `{ast.unparse(node)}`")

    # -- logits-valued expressions ---------------------------------------------------------

    def resolve_static(self, node, subst_objects):
        """The object an expression names at patch time (``torch.tanh``, ``self.softcap_module``),
        or None."""
        try:
            if isinstance(node, ast.Name):
                if node.id in subst_objects:
                    return subst_objects[node.id]
                return self.globals.get(node.id, getattr(builtins, node.id, None))
            if isinstance(node, ast.Attribute):
                base = self.resolve_static(node.value, subst_objects)
                return getattr(base, node.attr) if base is not None else None
        except Exception:  # a property that fails outside a forward: not a static name
            return None
        return None

    def logits_expr(self, node, logits_names, subst, objects, head_call):
        """(source logits name, ops) for a logits-valued expression, or None if ``node`` does not
        involve the logits."""
        if node is head_call:
            return HEAD, ()
        if isinstance(node, ast.Name):
            return (node.id, ()) if node.id in logits_names else None
        if not _mentions(node, logits_names, head_call):
            return None
        text = ast.unparse(node)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Mult, ast.Div)):
            left = self.logits_expr(node.left, logits_names, subst, objects, head_call)
            right = None if left else self.logits_expr(node.right, logits_names, subst, objects, head_call)
            if left and isinstance(node.op, ast.Div):
                s = node.right
                return left[0], left[1] + (Scale(self.scalar(s, logits_names, subst), True,
                                                 f"/{ast.unparse(s)}"),)
            if isinstance(node.op, ast.Mult) and (left or right):
                src, other = (left, node.right) if left else (right, node.left)
                return src[0], src[1] + (Scale(self.scalar(other, logits_names, subst), False,
                                               f"×{ast.unparse(other)}"),)
            raise Unsupported(f"divides by the logits in `{text}`")
        if isinstance(node, ast.Subscript):
            inner = self.logits_expr(node.value, logits_names, subst, objects, head_call)
            if inner is None:
                raise Unsupported(f"indexes with the logits in `{text}`")
            stop = _vocab_slice_stop(node.slice)
            if stop is False:
                raise Unsupported(f"indexes the logits in `{text}` (only a vocabulary slice "
                                  f"`[..., :n]` can be fused)")
            return inner[0], inner[1] + (VocabSlice(self.scalar(stop, logits_names, subst),
                                                    f"[..., :{ast.unparse(stop)}]"),)
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Attribute):
                inner = self.logits_expr(func.value, logits_names, subst, objects, head_call)
                if inner is not None:  # a method of the logits
                    for a in list(node.args) + [k.value for k in node.keywords]:
                        if _mentions(a, logits_names, head_call):
                            raise Unsupported(f"combines logits in `{text}`")
                    if func.attr in ("float", "double", "half", "bfloat16", "contiguous", "to",
                                     "type_as", "clone"):
                        return inner
                    if func.attr in ("tanh", "tanh_") and not node.args:
                        return inner[0], inner[1] + (Tanh(),)
                    if func.attr in ("mul", "mul_", "div", "div_") and len(node.args) == 1:
                        s = node.args[0]
                        return inner[0], inner[1] + (Scale(self.scalar(s, logits_names, subst),
                                                           func.attr.startswith("div"),
                                                           f"{'/' if func.attr.startswith('div') else '×'}"
                                                           f"{ast.unparse(s)}"),)
                    raise Unsupported(f"calls `.{func.attr}` on the logits in `{text}`")
            target = self.resolve_static(func, objects)
            logit_args = [i for i, a in enumerate(node.args) if _mentions(a, logits_names, head_call)]
            if any(_mentions(k.value, logits_names, head_call) for k in node.keywords) or len(logit_args) != 1:
                raise Unsupported(f"passes the logits to `{ast.unparse(func)}` in `{text}`")
            inner = self.logits_expr(node.args[logit_args[0]], logits_names, subst, objects, head_call)
            if target in (torch.tanh, torch.nn.functional.tanh) and len(node.args) == 1:
                return inner[0], inner[1] + (Tanh(),)
            if isinstance(target, torch.nn.Module) or inspect.isfunction(target):
                return inner[0], inner[1] + self.inline(target, node, logit_args[0], logits_names, subst)
            raise Unsupported(f"passes the logits to `{ast.unparse(func)}` in `{text}`")
        raise Unsupported(f"computes `{text}` from the logits")

    def inline(self, target, call, logit_pos, logits_names, subst):
        """The ops of a module or function whose body is one ``return`` of the recognised
        expressions (Inkling's ``Softcap`` module)."""
        if self.inline_depth >= 3:
            raise Unsupported("logit processing nested too deeply")
        is_module = isinstance(target, torch.nn.Module)
        fn = inspect.unwrap(type(target).forward if is_module else target)
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
        except (OSError, TypeError, SyntaxError) as exc:
            raise Unsupported(f"cannot read the source of {getattr(fn, '__qualname__', fn)}: {exc}") from None
        body = [s for s in tree.body[0].body if not _is_docstring(s)]
        name = getattr(fn, "__qualname__", str(fn))
        guards = body[:-1]  # `if <test>: return <expr>` lines before the last return
        if (not body or not isinstance(body[-1], ast.Return) or body[-1].value is None
                or not all(isinstance(g, ast.If) and not g.orelse and len(g.body) == 1
                           and isinstance(g.body[0], ast.Return) and g.body[0].value is not None
                           for g in guards)):
            raise Unsupported(f"applies {name} to the logits, which is more than a return of them")
        params = [a.arg for a in tree.body[0].args.args]
        if is_module:
            params = params[1:]  # self
        if logit_pos >= len(params):
            raise Unsupported(f"passes the logits to {name} in a way that cannot be read")
        inner_subst, objects = {}, {}
        if is_module:
            inner_subst["self"] = lambda env, m=target: m
            objects["self"] = target
        defaults = tree.body[0].args.defaults
        for p, d in zip(params[len(params) - len(defaults):], defaults):
            inner_subst[p] = self.scalar(d, (), {})
        for i, a in enumerate(call.args):
            if i != logit_pos and i < len(params):
                inner_subst[params[i]] = self.scalar(a, logits_names, subst)
        for k in call.keywords:
            inner_subst[k.arg] = self.scalar(k.value, logits_names, subst)
        compiler = _Compiler(self.model, fn, fn.__globals__)
        compiler.inline_depth = self.inline_depth + 1
        x = params[logit_pos]

        def ops_of(expr):
            src, ops = compiler.logits_expr(expr, {x}, inner_subst, objects, None)
            if src != x:
                raise Unsupported(f"{name} returns something other than its input")
            return ops
        ops = ops_of(body[-1].value)
        for guard in reversed(guards):
            test = compiler.scalar(guard.test, {x}, inner_subst)
            ops = (Cond(test, ops_of(guard.body[0].value), ops, ast.unparse(guard.test)),)
        return ops

    # -- statements ------------------------------------------------------------------------

    def statements(self, stmts, logits_names, head_call, top):
        """The program of a list of statements. ``logits_names`` (a set) is updated in place."""
        program = []
        for stmt in stmts:
            try:
                program += self.statement(stmt, logits_names, head_call, top)
            except Unsupported as exc:
                reason = f"line {stmt.lineno + self.fn.__code__.co_firstlineno - 1}: {exc}"
                if top:
                    raise Unsupported(reason) from None
                return program + [Unfusable(reason)]
        return program

    def statement(self, stmt, logits_names, head_call, top):
        mentions = _mentions(stmt, logits_names, head_call)
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            name = stmt.targets[0].id
            expr = self.logits_expr(stmt.value, logits_names, {}, {"self": self.model}, head_call)
            if expr is not None:
                logits_names.add(name)
                return [Apply(name, expr[0], expr[1])]
            logits_names.discard(name)
            try:
                return [Bind(name, self.scalar(stmt.value, logits_names, {}), ast.unparse(stmt.value))]
            except Unsupported:
                return []  # a value the logits never depend on (read it later: refused then)
        if isinstance(stmt, ast.AugAssign) and isinstance(stmt.target, ast.Name) and stmt.target.id in logits_names:
            if not isinstance(stmt.op, (ast.Mult, ast.Div)):
                raise Unsupported(f"updates the logits with `{ast.unparse(stmt)}`")
            name = stmt.target.id
            value = self.scalar(stmt.value, logits_names, {})
            return [Apply(name, name, (Scale(value, isinstance(stmt.op, ast.Div),
                                             f"{'/' if isinstance(stmt.op, ast.Div) else '×'}"
                                             f"{ast.unparse(stmt.value)}"),))]
        if isinstance(stmt, ast.Expr) and mentions:
            call = stmt.value
            if (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
                    and isinstance(call.func.value, ast.Name) and call.func.value.id in logits_names
                    and call.func.attr in ("mul_", "div_", "tanh_")):
                name = call.func.value.id
                _, ops = self.logits_expr(call, logits_names, {}, {"self": self.model}, head_call)
                return [Apply(name, name, ops)]
            raise Unsupported(f"`{ast.unparse(stmt)}` changes or reads the logits")
        if isinstance(stmt, ast.If):
            if _mentions(stmt.test, logits_names, head_call, shape_ok=True):
                raise Unsupported(f"branches on the logits' values in `if {ast.unparse(stmt.test)}`")
            test = self.scalar(stmt.test, logits_names, {})
            then_names, else_names = set(logits_names), set(logits_names)
            then = self.statements(stmt.body, then_names, head_call, False)
            orelse = self.statements(stmt.orelse, else_names, head_call, False)
            if then_names != else_names and (then_names | else_names) - logits_names:
                raise Unsupported(f"names new logits in only one branch of `if {ast.unparse(stmt.test)}`")
            logits_names |= then_names | else_names
            return [Branch(test, tuple(then), tuple(orelse), ast.unparse(stmt.test))]
        if mentions:
            raise Unsupported(f"`{_first_line(stmt)}` changes or reads the logits")
        if isinstance(stmt, (ast.Assign, ast.AnnAssign)):
            return []  # a binding the program does not read (loss = None, ...)
        return []


def _first_line(node):
    return ast.unparse(node).splitlines()[0]


def _is_docstring(stmt):
    return isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str)


def _mentions(node, names, head_call, shape_ok=False):
    """Whether ``node`` reads a logits name (``x.shape`` excepted when ``shape_ok``) or holds
    the head call."""
    for sub in ast.walk(node):
        if sub is head_call:
            return True
        if isinstance(sub, ast.Name) and sub.id in names:
            if shape_ok and _is_shape_read(node, sub):
                continue
            return True
    return False


def _is_shape_read(root, name_node):
    for sub in ast.walk(root):
        if isinstance(sub, ast.Attribute) and sub.value is name_node and sub.attr == "shape":
            return True
    return False


def _vocab_slice_stop(index):
    """``n`` of a last-dimension slice ``[..., :n]`` / ``[:, :, :n]``, else False."""
    elts = index.elts if isinstance(index, ast.Tuple) else [index]
    *lead, last = elts
    full = all(isinstance(e, ast.Constant) and e.value is Ellipsis
               or isinstance(e, ast.Slice) and e.lower is None and e.upper is None and e.step is None
               for e in lead)
    if not lead or not full or not isinstance(last, ast.Slice) or last.step is not None:
        return False
    if last.lower is not None and not (isinstance(last.lower, ast.Constant) and last.lower.value == 0):
        return False
    return last.upper if last.upper is not None else ast.Constant(None)


# ---------------------------------------------------------------------------------------------
# reading a model's forward
# ---------------------------------------------------------------------------------------------


def head_path(model, head) -> str | None:
    """The dotted path of ``head`` (the output embeddings) from ``model``."""
    for name, module in model.named_modules():
        if module is head and name:
            return name
    return None


def _attr_chain(node):
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name) and node.id == "self":
        return ".".join(reversed(parts))
    return None


def class_forward(model):
    """The ``forward`` the model's class defines (FSDP2's and other dynamic subclasses add none)."""
    for cls in type(model).__mro__:
        if "forward" in vars(cls):
            return cls, inspect.unwrap(vars(cls)["forward"])
    raise Unsupported("has no forward")


def read_forward(model, head) -> ForwardPlan:
    """The :class:`ForwardPlan` of ``model``'s class, or :class:`Unsupported` with the reason."""
    cls, fn = class_forward(model)
    where = f"{cls.__name__}.forward"
    path = head_path(model, head)
    if path is None:
        raise Unsupported(f"its output embeddings ({type(head).__name__}) is not a submodule of the model")
    try:
        source = textwrap.dedent(inspect.getsource(fn))
    except (OSError, TypeError) as exc:
        raise Unsupported(f"the source of {where} cannot be read ({exc})") from None
    tree = ast.parse(source)
    func = tree.body[0]
    real_path = path
    head_calls = [n for n in ast.walk(func) if isinstance(n, ast.Call) and _attr_chain(n.func) == path]
    if not head_calls:
        # BERT-style heads: the forward calls a prediction head (self.lm_head) whose own forward
        # ends in `x = self.decoder(x); return x` (the output embeddings): that call is the head's
        ancestor = _ancestor_calling_head(model, path)
        while ancestor is not None and not head_calls:
            path = ancestor
            head_calls = [n for n in ast.walk(func) if isinstance(n, ast.Call) and _attr_chain(n.func) == path]
            ancestor = _ancestor_calling_head(model, path)
    loss_calls = [n for n in ast.walk(func) if isinstance(n, ast.Call) and _attr_chain(n.func) == "loss_function"]
    if not loss_calls:
        raise Unsupported(f"{where} does not call self.loss_function (its loss is computed another way)")
    if not head_calls:
        raise Unsupported(f"{where} does not call its output embeddings self.{path} directly")
    if len(head_calls) > 1 or len(loss_calls) > 1:
        raise Unsupported(f"{where} calls self.{path} {len(head_calls)} times and self.loss_function "
                          f"{len(loss_calls)} times (one of each can be fused)")
    head_call, loss_call = head_calls[0], loss_calls[0]
    body = func.body
    i_head = _top_index(body, head_call)
    i_loss = _top_index(body, loss_call)
    if not isinstance(body[i_head], (ast.Assign, ast.AnnAssign)) or i_loss <= i_head:
        raise Unsupported(f"{where} calls self.{path} inside a block or after its loss "
                          f"(`{_first_line(body[i_head])}`)")
    for arg in head_call.args + [k.value for k in head_call.keywords]:
        if any(isinstance(n, ast.Call) and _attr_chain(n.func) == path for n in ast.walk(arg)):
            raise Unsupported(f"{where} feeds the head its own output")
    labels_param = "labels"
    if labels_param not in [a.arg for a in func.args.args + func.args.kwonlyargs]:
        raise Unsupported(f"{where} takes no `labels` argument")
    for n in ast.walk(func):
        if isinstance(n, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = n.targets if isinstance(n, ast.Assign) else [n.target]
            if any(isinstance(t, ast.Name) and t.id == labels_param for t in targets):
                raise Unsupported(f"{where} changes `labels` before its loss (`{_first_line(n)}`)")
    compiler = _Compiler(model, fn, fn.__globals__)
    names: set = set()
    program = compiler.statements([body[i_head]] + body[i_head + 1:i_loss], names, head_call, True)
    # down to the loss call: `if labels is not None:` blocks, whose other statements must leave
    # the logits alone
    stmt = body[i_loss]
    while not _is_loss_statement(stmt, loss_call):
        if not isinstance(stmt, ast.If) or _mentions(stmt.test, names, head_call, shape_ok=True):
            raise Unsupported(f"{where} reaches its loss through `{_first_line(stmt)}`")
        inner = stmt.body
        j = _top_index(inner, loss_call)
        program += compiler.statements(inner[:j], names, head_call, True)
        stmt = inner[j]
    logits_arg = _argument(loss_call, 0, "logits")
    labels_arg = _argument(loss_call, 1, "labels")
    if not (isinstance(labels_arg, ast.Name) and labels_arg.id == labels_param):
        raise Unsupported(f"{where} passes `{ast.unparse(labels_arg) if labels_arg else None}` as the "
                          f"loss's labels, not its `labels` argument")
    if not (isinstance(logits_arg, ast.Name) and logits_arg.id in names):
        expr = compiler.logits_expr(logits_arg, names, {}, {"self": model}, head_call) if logits_arg else None
        if expr is None:
            raise Unsupported(f"{where} passes `{ast.unparse(logits_arg) if logits_arg else None}` to "
                              f"its loss, not the head's logits")
        program.append(Apply("<loss logits>", expr[0], expr[1]))
        result = "<loss logits>"
    else:
        result = logits_arg.id
    return ForwardPlan(head_path=real_path, program=tuple(program), result=result, source_name=where)


def _ancestor_calling_head(model, path):
    """The path of the module above the head whose forward returns the head's output unchanged
    (``x = self.decoder(x); return x``), or None."""
    parts = path.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        parent_path, rest = ".".join(parts[:cut]), ".".join(parts[cut:])
        parent = model.get_submodule(parent_path)
        try:
            _, fn = class_forward(parent)
            body = [s for s in ast.parse(textwrap.dedent(inspect.getsource(fn))).body[0].body
                    if not _is_docstring(s)]
        except (OSError, TypeError, SyntaxError, Unsupported):
            continue
        if len(body) < 2 or not isinstance(body[-1], ast.Return) or not isinstance(body[-2], ast.Assign):
            continue
        call, ret = body[-2].value, body[-1].value
        if (isinstance(call, ast.Call) and _attr_chain(call.func) == rest
                and len(body[-2].targets) == 1 and isinstance(body[-2].targets[0], ast.Name)
                and isinstance(ret, ast.Name) and ret.id == body[-2].targets[0].id):
            return parent_path
    return None


def _top_index(stmts, node):
    for i, s in enumerate(stmts):
        if any(sub is node for sub in ast.walk(s)):
            return i
    raise Unsupported("internal: statement not found")


def _is_loss_statement(stmt, loss_call):
    value = getattr(stmt, "value", None)
    return isinstance(stmt, (ast.Assign, ast.AnnAssign, ast.AugAssign, ast.Expr)) and value is loss_call


def _argument(call, position, name):
    for k in call.keywords:
        if k.arg == name:
            return k.value
    if len(call.args) > position and not isinstance(call.args[position], ast.Starred):
        return call.args[position]
    return None


# ---------------------------------------------------------------------------------------------
# running the program at call time
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Logits:
    pre: Any = 1.0  # scale inside the tanh (or the whole scale without one)
    post: Any = 1.0  # scale outside the tanh
    tanh: bool = False
    vocab: int | None = None


def evaluate_plan(plan: ForwardPlan, model, lead_shape, vocab) -> LogitParams | str:
    """The op's parameters for this call, or the reason (a string) the call runs unfused."""
    state = {HEAD: _Logits()}

    def shape(name):  # `logits.shape` where the program reads it
        width = state[name].vocab if name in state and state[name].vocab is not None else vocab
        return torch.Size(tuple(lead_shape) + (width,))
    env = {"self": model, SHAPE: shape}
    reason = _run(plan.program, env, state, tuple(lead_shape), vocab)
    if reason is not None:
        return reason
    final = state[plan.result]
    if final.tanh:
        cap = final.post
        if isinstance(cap, torch.Tensor):
            if cap.requires_grad:
                return "the soft-cap is a tensor with a gradient"
            cap = float(cap)
        if not (isinstance(cap, (int, float)) and math.isfinite(cap) and cap > 0):
            return f"the soft-cap {cap!r} is not a positive number"
        return LogitParams(scale=_mul(final.pre, cap), softcap=float(cap), vocab=final.vocab)
    return LogitParams(scale=final.pre, softcap=None, vocab=final.vocab)


def _mul(a, b):
    if isinstance(a, (int, float)) and a == 1:
        return b
    if isinstance(b, (int, float)) and b == 1:
        return a
    return a * b


def _run(program, env, state, lead_shape, vocab):
    for step in program:
        if isinstance(step, Bind):
            env[step.name] = step.value(env)
        elif isinstance(step, Branch):
            reason = _run(step.then if step.test(env) else step.orelse, env, state, lead_shape, vocab)
            if reason is not None:
                return reason
        elif isinstance(step, Unfusable):
            return step.reason
        elif isinstance(step, Apply):
            cur = state.get(step.src)
            if cur is None:
                return f"`{step.src}` has no value on this path"
            cur = _apply_ops(step.ops, cur, env, vocab)
            if isinstance(cur, str):
                return cur
            state[step.dst] = cur
    return None


def _apply_ops(ops, cur, env, vocab):
    for op in ops:
        width = cur.vocab if cur.vocab is not None else vocab
        if isinstance(op, Cond):
            cur = _apply_ops(op.then if op.test(env) else op.orelse, cur, env, vocab)
            if isinstance(cur, str):
                return cur
        elif isinstance(op, Scale):
            s = op.value(env)
            if s is None:
                return f"the logit scale `{op.text}` is None"
            s = 1.0 / s if op.invert else s
            cur = (dataclasses.replace(cur, post=_mul(cur.post, s)) if cur.tanh
                   else dataclasses.replace(cur, pre=_mul(cur.pre, s)))
        elif isinstance(op, Tanh):
            if cur.tanh:
                return "tanh is applied twice"
            cur = dataclasses.replace(cur, tanh=True)
        elif isinstance(op, VocabSlice):
            stop = op.stop(env)
            if stop is not None:
                stop = range(width)[slice(None, int(stop))].stop
                cur = dataclasses.replace(cur, vocab=stop)
    return cur
