"""The ``spec.argsTemplate`` language: jinja2 restricted so that any template's cost is bounded.

A custom runtime's template is user input rendered inside the operator's event loop, the
admission webhook and ``capstan render``. Jinja's sandbox stops a template from reaching Python
objects, but not from spinning (``{% for a in name.ljust(99999) %}...``) or from allocating
(``{{ name|indent(1500000000) }}``). So, on top of the sandbox:

* **Static allowlist.** Only output, ``if``, ``for`` (nesting depth 2), ``set``, literals, the
  five variables, arithmetic, comparisons, ``~``, attribute/item access, and the filters, tests and
  ``str`` methods listed below. No macros, includes, blocks, dicts, ``*args``; no globals at all.
* **Every value is bounded.** A string holds at most :data:`MAX_VALUE_CHARS` characters, a list
  at most :data:`MAX_ITEMS` flat items, an integer at most 2**63 in magnitude. Every operation that
  can build a value bigger than its inputs (``*``, ``**``, ``%``, ``str.format``, ``ljust``,
  ``center``, ``zfill``, ``expandtabs``, ``replace``, ``join``, ``indent``, ``center``, ``format``)
  computes the size of its result first and refuses before allocating.
* **Every step is paid for.** The compiled template has each expression wrapped in a charge that
  spends :data:`STEP_COST` plus the value's size from a fuel budget of :data:`FUEL`, and each loop
  iteration spends a step, so the work of one render is O(:data:`FUEL`) whatever the template. A
  wall-clock deadline (:data:`RENDER_SECONDS`) backs that up, and the output stops at
  :data:`MAX_RENDERED_CHARS`.

Every failure, whatever raised it, becomes :class:`ArgsTemplateError` naming ``spec.argsTemplate``.
Compiled templates and render results are cached, so a reconcile pass re-renders nothing.
"""

from __future__ import annotations

import contextvars
import re
import string
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from functools import lru_cache
from typing import Any

from jinja2 import StrictUndefined, TemplateError, nodes
from jinja2 import filters as jfilters
from jinja2 import tests as jtests
from jinja2.exceptions import SecurityError
from jinja2.meta import find_undeclared_variables
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import pass_context

TEMPLATE_FIELD = "spec.argsTemplate"
TEMPLATE_VARIABLES = (
    "model_path", "port", "tensor_parallel", "max_model_len", "name", "pipeline_parallel", "nodes",
)
MAX_TEMPLATE_CHARS = 8192
MAX_RENDERED_CHARS = 65536
MAX_VALUE_CHARS = MAX_RENDERED_CHARS
MAX_ITEMS = 4096
MAX_INT = 2**63
# Loops may nest this deep; the fuel bounds the work anyway, this keeps templates readable.
MAX_LOOP_DEPTH = 2
# Deeper expressions overflow Python's parser once compiled; no argument list needs them.
MAX_EXPR_DEPTH = 24
FUEL = 1_000_000
STEP_COST = 32
RENDER_SECONDS = 1.0
# Error messages quote user input; keep them short whatever the input.
MAX_MESSAGE_CHARS = 400
MAX_ERRORS_SHOWN = 2  # structural errors named in one message


class ArgsTemplateError(ValueError):
    """``spec.argsTemplate`` cannot be rendered; the message names the field."""


class _OverBudget(SecurityError):
    """The render ran out of fuel or time (not a property of the template alone if time)."""

    def __init__(self, message: str, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out


class _Budget:
    __slots__ = ("deadline", "fuel")

    def __init__(self) -> None:
        self.fuel = FUEL
        self.deadline = time.monotonic() + RENDER_SECONDS

    def spend(self, units: int) -> None:
        self.fuel -= units
        if self.fuel < 0:
            raise _OverBudget(f"rendering needs more than {FUEL} steps of work; simplify the template")
        if time.monotonic() > self.deadline:
            raise _OverBudget(f"rendering takes longer than {RENDER_SECONDS:g}s", timed_out=True)


_BUDGET: contextvars.ContextVar[_Budget] = contextvars.ContextVar("capstan_args_budget")


def _spend(units: int) -> None:
    budget = _BUDGET.get(None)
    if budget is None:  # called outside a render (jinja constant folding): refuse to fold
        raise SecurityError("not during compilation")
    budget.spend(units)


# --- sizes ------------------------------------------------------------------------------------


def _measure(value: Any) -> int:
    """Size of ``value`` in characters; refuses values beyond the caps."""
    if isinstance(value, str):
        if len(value) > MAX_VALUE_CHARS:
            raise SecurityError(f"a string of more than {MAX_VALUE_CHARS} characters")
        return len(value)
    if isinstance(value, bool) or value is None or isinstance(value, float | complex):
        return 1
    if isinstance(value, int):
        if abs(value) > MAX_INT:
            raise SecurityError("an integer beyond 2**63")
        return 1
    if isinstance(value, list | tuple):
        if len(value) > MAX_ITEMS:
            raise SecurityError(f"a list of more than {MAX_ITEMS} items")
        size = len(value)
        for item in value:
            if isinstance(item, list | tuple | dict):
                raise SecurityError("nested lists are not supported")
            size += _measure(item)
        if size > MAX_VALUE_CHARS:
            raise SecurityError(f"a list of more than {MAX_VALUE_CHARS} characters")
        return size
    if isinstance(value, dict):
        raise SecurityError("mappings are not supported")
    return 1  # methods, loop, undefined: no payload of their own


def _text_size(value: Any) -> int:
    """Upper bound of ``str(value)`` or ``repr(value)`` (escapes expand a character up to 10)."""
    return len(value) if isinstance(value, str) else 10 * _measure(value) + 32


def _limit(what: str, size: int) -> None:
    if size > MAX_VALUE_CHARS:
        raise SecurityError(f"{what} would build {size} characters (at most {MAX_VALUE_CHARS})")


def _int(value: Any, what: str) -> int:
    if not isinstance(value, int):
        raise TypeError(f"{what} must be an integer, not {type(value).__name__}")
    return value


def _arg(args: tuple[Any, ...], kwargs: Mapping[str, Any], index: int, name: str, default: Any) -> Any:
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


# --- string formatting bounds ------------------------------------------------------------------

_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?(.)?", re.S)


def _percent_bound(fmt: str, values: Any) -> int:
    """Upper bound of ``fmt % values``."""
    items = list(values.values()) if isinstance(values, Mapping) else (
        list(values) if isinstance(values, tuple) else [values]
    )
    biggest = max((_text_size(v) for v in items), default=0)
    total = len(fmt)
    for width, precision, _conv in _PERCENT_SPEC.findall(fmt):
        if "*" in (width, precision):
            raise SecurityError("'*' field widths are not supported")
        total += int(width or 0) + int(precision or 0) + biggest + 32
        if total > MAX_VALUE_CHARS:
            break
    return total


def _brace_bound(fmt: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> int:
    """Upper bound of ``fmt.format(*args, **kwargs)``."""
    biggest = max((_text_size(v) for v in (*args, *kwargs.values())), default=0)
    total = 0
    for literal, field, spec, _conv in string.Formatter().parse(fmt):
        total += len(literal)
        if field is None:
            continue
        if "{" in (spec or ""):
            raise SecurityError("nested format fields are not supported")
        total += sum(int(n) for n in re.findall(r"\d+", spec or "")) + biggest + 32
        if total > MAX_VALUE_CHARS:
            break
    return total


# --- str methods: the ones a template may call, with a bound where the result can grow ----------


def _pad_bound(s: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> int:
    return max(len(s), _int(_arg(args, kwargs, 0, "width", 0), "width"))


def _tabs_bound(s: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> int:
    tab = _int(_arg(args, kwargs, 0, "tabsize", 8), "tabsize")
    return len(s) + s.count("\t") * max(tab, 0)


def _replace_bound(s: str, old: Any, new: Any, count: Any) -> int:
    old, new = str(old), str(new)
    hits = len(s) + 1 if old == "" else s.count(old)
    if count is not None and _int(count, "count") >= 0:
        hits = min(hits, count)
    return len(s) + hits * max(len(new) - len(old), 0)


def _str_replace_bound(s: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> int:
    old, new = _arg(args, kwargs, 0, "old", ""), _arg(args, kwargs, 1, "new", "")
    return _replace_bound(s, old, new, _arg(args, kwargs, 2, "count", None))


def _join_bound(sep: str, items: Any) -> int:
    if not isinstance(items, str | list | tuple):
        raise SecurityError("join needs a string or a list")
    return sum(_text_size(i) for i in items) + len(sep) * max(len(items) - 1, 0)


_Bound = Callable[[str, tuple[Any, ...], Mapping[str, Any]], int]
_GROWING: dict[str, _Bound] = {
    "ljust": _pad_bound,
    "rjust": _pad_bound,
    "center": _pad_bound,
    "zfill": _pad_bound,
    "expandtabs": _tabs_bound,
    "replace": _str_replace_bound,
    "join": lambda s, a, k: _join_bound(s, _arg(a, k, 0, "iterable", ())),
}
# Results at most three times their input (case mappings) or smaller, or not strings at all.
_BOUNDED = frozenset((
    "upper", "lower", "title", "capitalize", "swapcase", "casefold", "strip", "lstrip", "rstrip",
    "removeprefix", "removesuffix", "startswith", "endswith", "find", "rfind", "index", "rindex",
    "count", "split", "rsplit", "splitlines", "partition", "rpartition", "isalnum", "isalpha",
    "isascii", "isdecimal", "isdigit", "isidentifier", "islower", "isnumeric", "isprintable",
    "isspace", "istitle", "isupper",
))


# --- filters and tests -------------------------------------------------------------------------


def _s(value: Any) -> str:
    _limit("converting to text", _text_size(value))
    return str(value)


def _f_replace(value: Any, old: Any, new: Any, count: int | None = None) -> str:
    s = _s(value)
    _limit("replace", _replace_bound(s, old, new, count))
    return s.replace(str(old), str(new), -1 if count is None else count)


def _f_indent(value: Any, width: int | str = 4, first: bool = False, blank: bool = False) -> str:
    if not isinstance(value, str):
        raise TypeError(f"indent needs a string, not {type(value).__name__}")
    s = value
    pad = len(width) if isinstance(width, str) else max(_int(width, "width"), 0)
    _limit("indent", len(s) + (s.count("\n") + 2) * pad)
    return str(jfilters.do_indent(s, width, first, blank))


def _f_center(value: Any, width: int = 80) -> str:
    s = _s(value)
    _limit("center", max(len(s), _int(width, "width")))
    return s.center(width)


def _f_join(value: Any, d: Any = "", attribute: Any = None) -> str:
    if attribute is not None:
        raise SecurityError("join(attribute=...) is not supported")
    sep = str(d)
    _limit("join", _join_bound(sep, value))
    return sep.join(map(str, value))


def _f_format(value: Any, *args: Any, **kwargs: Any) -> str:
    fmt = _s(value)
    values = kwargs or args
    _limit("format", _percent_bound(fmt, values))
    return fmt % values


def _f_truncate(value: Any, *args: Any, **kwargs: Any) -> Any:
    # The result is at most the input plus the ellipsis: no bound to check before.
    return jfilters.do_truncate(_ENV, value, *args, **kwargs)


def _f_trim(value: Any, chars: str | None = None) -> str:
    return _s(value).strip(chars)


def _seq(value: Any, what: str) -> str | list[Any] | tuple[Any, ...]:
    if not isinstance(value, str | list | tuple):
        raise TypeError(f"{what} needs a string or a list, not {type(value).__name__}")
    return value


def _f_first(value: Any) -> Any:
    seq = _seq(value, "first")
    return seq[0] if seq else StrictUndefined(hint="No first item, sequence was empty.")


def _f_last(value: Any) -> Any:
    seq = _seq(value, "last")
    return seq[-1] if seq else StrictUndefined(hint="No last item, sequence was empty.")


_FILTERS: dict[str, Callable[..., Any]] = {
    "default": jfilters.do_default,
    "d": jfilters.do_default,
    "upper": lambda v: _s(v).upper(),
    "lower": lambda v: _s(v).lower(),
    "capitalize": lambda v: _s(v).capitalize(),
    "title": jfilters.do_title,
    "trim": _f_trim,
    "replace": _f_replace,
    "indent": _f_indent,
    "center": _f_center,
    "truncate": _f_truncate,
    "join": _f_join,
    "format": _f_format,
    "int": jfilters.do_int,
    "float": jfilters.do_float,
    "string": _s,
    "length": len,
    "count": len,
    "abs": abs,
    "round": jfilters.do_round,
    "first": _f_first,
    "last": _f_last,
    "list": lambda v: list(_seq(v, "list")),
    "reverse": lambda v: _seq(v, "reverse")[::-1],
}
_TESTS: dict[str, Any] = {
    name: jtests.TESTS[name]
    for name in (
        "odd", "even", "divisibleby", "defined", "undefined", "none", "boolean", "false", "true",
        "integer", "float", "number", "string", "lower", "upper", "sameas", "in", "==", "eq",
        "equalto", "!=", "ne", ">", "gt", "greaterthan", ">=", "ge", "<", "lt", "lessthan", "<=", "le",
    )
}

# Names the renderer injects; the allowlist check runs before, so a template cannot use them.
_CHARGE, _LOOP = "capstan_charge", "capstan_loop"


@pass_context
def _charge(_context: Context, value: Any) -> Any:
    """Pay for one evaluated expression: a step plus the value's size."""
    _spend(STEP_COST + _measure(value))
    return value


@pass_context
def _loop(_context: Context, value: Any) -> Iterator[Any]:
    """A loop's iterable: a string or a list, each iteration paid for."""
    if not isinstance(value, str | list | tuple):
        raise SecurityError(f"can only loop over a string or a list, not {type(value).__name__}")
    _measure(value)

    def items() -> Iterator[Any]:
        for item in value:
            _spend(STEP_COST)
            yield item

    return items()


def _checked(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with its result measured (and paid for) before the template sees it."""

    @pass_context
    def wrapper(_context: Context, *args: Any, **kwargs: Any) -> Any:
        result = fn(*args, **kwargs)
        _spend(_measure(result))
        return result

    wrapper.__name__ = f"filter_{name}"
    return wrapper


class _ArgsSandbox(ImmutableSandboxedEnvironment):
    """The sandbox with every operation that can grow a value checked before it allocates."""

    intercepted_binops = frozenset(["+", "-", "*", "/", "//", "%", "**"])

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        if operator == "**":
            if isinstance(right, int | float) and abs(right) > 64:
                raise SecurityError("exponent too large")
        elif operator == "*":
            seq, times = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(seq, str | list | tuple) and isinstance(times, int):
                _limit("repetition", _measure(seq) * times)
        elif operator == "%" and isinstance(left, str):
            _limit("% formatting", _percent_bound(left, right))
        elif operator == "+" and isinstance(left, str | list | tuple):
            _limit("+", _measure(left) + _measure(right))
        return self.binop_table[operator](left, right)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        fmt: str = value.__self__
        if value.__name__ == "format_map":
            raise SecurityError("str.format_map is not supported")

        def checked_format(*args: Any, **kwargs: Any) -> str:
            _limit("str.format", _brace_bound(fmt, args, kwargs))
            return wrapped(*args, **kwargs)

        checked_format.capstan_checked = True  # type: ignore[attr-defined]
        return checked_format

    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        # jinja passes its scoping to Context.call; a method must not see it as keyword arguments.
        kwargs.pop("_loop_vars", None)
        kwargs.pop("_block_vars", None)
        if getattr(__obj, "capstan_checked", False):
            return __obj(*args, **kwargs)
        owner = getattr(__obj, "__self__", None)
        name = getattr(__obj, "__name__", type(__obj).__name__)
        if type(owner) is str and (name in _BOUNDED or name in _GROWING):
            bound = _GROWING.get(name)
            if bound is not None:
                _limit(f"str.{name}", bound(owner, args, kwargs))
            return __obj(*args, **kwargs)
        if type(owner) in (list, tuple) and name in ("index", "count"):
            return __obj(*args, **kwargs)
        raise SecurityError(f"calling {name} is not supported")


def _environment() -> _ArgsSandbox:
    env = _ArgsSandbox(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=False)
    # No globals at all (range, lipsum, cycler, dict, namespace...): an args template needs none,
    # and each is a way to generate work or reach objects.
    env.globals.clear()
    env.filters = {name: _checked(name, fn) for name, fn in _FILTERS.items()}
    env.filters[_CHARGE] = _charge
    env.filters[_LOOP] = _loop
    env.tests = dict(_TESTS)
    return env


_ENV = _environment()

# --- static checks -------------------------------------------------------------------------------

_ALLOWED_NODES: tuple[type[nodes.Node], ...] = (
    nodes.Template, nodes.Output, nodes.TemplateData, nodes.If, nodes.For, nodes.Assign,
    nodes.Name, nodes.Const, nodes.Tuple, nodes.List, nodes.CondExpr, nodes.And, nodes.Or,
    nodes.Not, nodes.Neg, nodes.Pos, nodes.Add, nodes.Sub, nodes.Mul, nodes.Div, nodes.FloorDiv,
    nodes.Mod, nodes.Pow, nodes.Concat, nodes.Compare, nodes.Operand, nodes.Filter, nodes.Test,
    nodes.Getattr, nodes.Getitem, nodes.Slice, nodes.Call, nodes.Keyword,
)
_NAMED_BANS = {
    nodes.Macro: "macro blocks", nodes.CallBlock: "call blocks", nodes.Extends: "extends blocks",
    nodes.Include: "include blocks", nodes.Import: "import blocks", nodes.FromImport: "import blocks",
    nodes.Block: "block blocks", nodes.FilterBlock: "filter blocks", nodes.AssignBlock: "set blocks",
    nodes.With: "with blocks", nodes.Dict: "dict literals",
}


def _check_structure(ast: nodes.Template) -> list[str]:
    """Everything outside the allowlist, each with its line; [] if the template may be compiled."""
    errors: list[str] = []

    def bad(node: nodes.Node, what: str) -> None:
        msg = f"{TEMPLATE_FIELD}: {what} (line {node.lineno})"
        if msg not in errors:
            errors.append(msg)

    def walk(node: nodes.Node, loops: int, depth: int) -> None:
        if depth > MAX_EXPR_DEPTH:
            bad(node, f"expressions nest deeper than {MAX_EXPR_DEPTH}")
            return
        if not isinstance(node, _ALLOWED_NODES):
            what = _NAMED_BANS.get(type(node), f"{type(node).__name__.lower()} is")
            bad(node, f"{what} not allowed" if what.endswith(" is") else f"{what} are not allowed")
            return
        dynamic = isinstance(node, nodes.Filter | nodes.Test | nodes.Call) and (
            node.dyn_args is not None or node.dyn_kwargs is not None
        )
        if dynamic:
            bad(node, "*args and **kwargs are not allowed")
        if isinstance(node, nodes.Filter) and node.name not in _FILTERS:
            bad(node, f"filter {node.name!r} is not allowed; allowed: {', '.join(sorted(_FILTERS))}")
        if isinstance(node, nodes.Test) and node.name not in _TESTS:
            bad(node, f"test {node.name!r} is not allowed")
        if isinstance(node, nodes.For):
            loops += 1
            if node.recursive:
                bad(node, "recursive loops are not allowed")
            if loops > MAX_LOOP_DEPTH:
                bad(node, f"loops nest deeper than {MAX_LOOP_DEPTH}")
                return
        nested = depth + 1 if isinstance(node, nodes.Expr) else depth
        for child in node.iter_child_nodes():
            walk(child, loops, nested)

    walk(ast, 0, 0)
    return errors


def _instrument(node: nodes.Node) -> None:
    """Wrap every evaluated expression in the charge, and every loop's iterable in the loop guard."""

    def wrap(expr: Any, filter_name: str = _CHARGE) -> Any:
        if not isinstance(expr, nodes.Expr) or isinstance(expr, nodes.TemplateData | nodes.Slice):
            if isinstance(expr, nodes.Node):
                _instrument(expr)
            return expr
        if getattr(expr, "ctx", "load") != "load":  # assignment targets
            return expr
        _instrument(expr)
        return nodes.Filter(expr, filter_name, [], [], None, None, lineno=expr.lineno)

    for field, value in node.iter_fields():
        if isinstance(node, nodes.For) and field == "iter":
            setattr(node, field, wrap(value, _LOOP))
        elif isinstance(value, list):
            setattr(node, field, [wrap(v) for v in value])
        elif isinstance(value, nodes.Node):
            setattr(node, field, wrap(value))


def _message(exc: BaseException) -> str:
    text = f"{exc}" if isinstance(exc, TemplateError | ArgsTemplateError) else f"{type(exc).__name__}: {exc}"
    text = " ".join(text.split())
    return text if len(text) <= MAX_MESSAGE_CHARS else text[:MAX_MESSAGE_CHARS] + "..."


@lru_cache(maxsize=64)
def _compiled(template: str) -> Any:
    """The compiled template, or the ArgsTemplateError message saying why there is none."""
    if len(template) > MAX_TEMPLATE_CHARS:
        return f"{TEMPLATE_FIELD}: longer than {MAX_TEMPLATE_CHARS} characters"
    try:
        ast = _ENV.parse(template)
    except TemplateError as exc:
        line = getattr(exc, "lineno", None)
        where = f" (line {line})" if line else ""
        return f"{TEMPLATE_FIELD}: syntax error{where}: {_message(exc)}"
    except RecursionError:
        return f"{TEMPLATE_FIELD}: blocks or expressions nest too deeply"
    except Exception as exc:
        return f"{TEMPLATE_FIELD}: cannot parse: {_message(exc)}"
    try:
        errors = _check_structure(ast)
        if errors:  # the first few, so that the message stays readable (and fits a condition)
            more = f"; and {len(errors) - MAX_ERRORS_SHOWN} more" if len(errors) > MAX_ERRORS_SHOWN else ""
            return "; ".join(errors[:MAX_ERRORS_SHOWN]) + more
        unknown = sorted(find_undeclared_variables(ast) - set(TEMPLATE_VARIABLES))
        if unknown:
            names = ", ".join(u[:40] for u in unknown[:10])
            return f"{TEMPLATE_FIELD}: unknown variable(s) {names}; known: {', '.join(TEMPLATE_VARIABLES)}"
        _instrument(ast)
        ast.set_environment(_ENV)
        return _ENV.from_string(ast)
    except RecursionError:
        return f"{TEMPLATE_FIELD}: blocks nest too deeply"
    except Exception as exc:
        return f"{TEMPLATE_FIELD}: cannot compile: {_message(exc)}"


def _render_uncached(template: str, variables: tuple[tuple[str, Any], ...]) -> tuple[str, ...] | str:
    compiled = _compiled(template)
    if isinstance(compiled, str):
        return compiled
    out: list[str] = []
    size = 0
    token = _BUDGET.set(_Budget())
    try:
        # generate() streams, so a runaway template stops at the cap instead of filling memory.
        for chunk in compiled.generate(dict(variables)):
            size += len(chunk)
            if size > MAX_RENDERED_CHARS:
                return f"{TEMPLATE_FIELD}: renders more than {MAX_RENDERED_CHARS} characters"
            out.append(chunk)
    except _OverBudget as exc:
        if exc.timed_out:
            raise ArgsTemplateError(f"{TEMPLATE_FIELD}: {exc}") from None  # load-dependent: not cached
        return f"{TEMPLATE_FIELD}: {exc}"
    except SecurityError as exc:
        return f"{TEMPLATE_FIELD}: not allowed in the sandbox: {_message(exc)}"
    except Exception as exc:  # any other failure of user code is the template's fault, by name
        return f"{TEMPLATE_FIELD}: {_message(exc)}"
    finally:
        _BUDGET.reset(token)
    return tuple(line.strip() for line in "".join(out).splitlines() if line.strip())


class _ResultCache:
    """Recent render results (arguments or error), bounded in entries and in characters held."""

    def __init__(self, entries: int = 512, chars: int = 2_000_000) -> None:
        self.entries, self.chars, self.held = entries, chars, 0
        self._data: OrderedDict[Any, tuple[tuple[str, ...] | str, int]] = OrderedDict()
        self._lock = threading.Lock()  # the webhook renders in worker threads

    def get(self, key: Any) -> tuple[str, ...] | str | None:
        with self._lock:
            hit = self._data.get(key)
            if hit is None:
                return None
            self._data.move_to_end(key)
            return hit[0]

    def put(self, key: Any, value: tuple[str, ...] | str) -> None:
        size = len(key[0]) + (len(value) if isinstance(value, str) else sum(map(len, value)))
        if size > self.chars // 64:
            return  # one huge result would evict dozens of ordinary ones
        with self._lock:
            old = self._data.pop(key, None)
            self.held -= old[1] if old else 0
            self._data[key] = (value, size)
            self.held += size
            while len(self._data) > self.entries or self.held > self.chars:
                _, (_, dropped) = self._data.popitem(last=False)
                self.held -= dropped


_RESULTS = _ResultCache()


def _render_cached(template: str, variables: tuple[tuple[str, Any], ...]) -> tuple[str, ...] | str:
    key = (template, variables)
    hit = _RESULTS.get(key)
    if hit is None:
        hit = _render_uncached(template, variables)
        _RESULTS.put(key, hit)
    return hit


def render_template(template: str, variables: Mapping[str, Any]) -> list[str]:
    """Render ``template``: one argument per non-empty line (surrounding blanks trimmed).

    Raises :class:`ArgsTemplateError` naming ``spec.argsTemplate`` for any reason it cannot:
    syntax, unknown variables, constructs outside the allowlist, sandbox violations, values or
    output beyond the caps, or a render that would take more than its budget.
    """
    key = tuple(sorted(variables.items()))
    result = _render_cached(template, key)
    if isinstance(result, str):
        raise ArgsTemplateError(result)
    return list(result)
