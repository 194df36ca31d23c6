"""One registry for every kind of component: models, datasets, triggers, defenses.

Built-ins and plugins use the same door, :func:`register`. A component is a factory (a class or a
function); its keyword parameters, with their type hints and defaults, *are* its schema: the registry
builds a pydantic model from the signature, so a scenario is checked against it before any work starts
(unknown keys, wrong types) and ``bench plugins`` can list parameters with types and defaults.

Parameters that the engine supplies (``CONTEXT_PARAMS``: a model's input shape and class count) are not
part of the user-facing schema.

First use loads the built-ins and every installed package's ``pmoe_bench.plugins`` entry point
(:func:`load_builtins`). Plugin files and folders are :mod:`bench.plugins`, which builds on this module;
this module never imports it.
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
import inspect
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

from pydantic import BaseModel, ConfigDict, PydanticUserError, TypeAdapter, ValidationError, create_model

from bench.errors import BenchError, ComponentParamsError, PluginError, UnknownComponentError

KINDS: tuple[str, ...] = ("model", "dataset", "trigger", "defense")

#: Installed packages declare their plugin modules as entry points in this group.
ENTRY_POINT_GROUP = "pmoe_bench.plugins"

# Arguments the engine passes itself; never set from a scenario.
CONTEXT_PARAMS: dict[str, frozenset[str]] = {
    "model": frozenset({"input_shape", "num_classes", "mean", "std"}),
    "dataset": frozenset(),
    "trigger": frozenset(),
    "defense": frozenset(),
}


@dataclass(frozen=True)
class Param:
    """One user-facing parameter of a component, for listings and validation."""

    name: str
    annotation: str
    default: Any
    required: bool


@dataclass(frozen=True)
class Component:
    """A registered component: its factory, where it came from, and its parameter schema."""

    kind: str
    name: str
    factory: Callable[..., Any]
    source: str
    doc: str
    schema: type[BaseModel] = field(repr=False)
    params: tuple[Param, ...] = ()

    def validate(self, params: dict[str, Any], where: str = "") -> dict[str, Any]:
        """Check ``params`` against the schema; return them with defaults filled in.

        ``None`` values are dropped first, so an unset YAML value never overrides a default.
        """
        given = {k: v for k, v in params.items() if v is not None}
        try:
            model = self.schema.model_validate(given)
        except ValidationError as exc:
            raise ComponentParamsError(_format_validation(exc, self, where)) from None
        return model.model_dump()

    def create(self, /, **kwargs: Any) -> Any:
        """Build the component; user parameters are validated, context parameters passed through."""
        context = {k: v for k, v in kwargs.items() if k in CONTEXT_PARAMS[self.kind]}
        user = {k: v for k, v in kwargs.items() if k not in CONTEXT_PARAMS[self.kind]}
        return self.factory(**self.validate(user), **context)


def _format_validation(exc: ValidationError, comp: Component, where: str) -> str:
    allowed = ", ".join(p.name for p in comp.params) or "(none)"
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        path = f"{where}.{loc}" if where else loc
        if err["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(err["loc"][-1]), [p.name for p in comp.params], n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            lines.append(f"{path}: unknown parameter of {comp.kind} '{comp.name}'{hint}; allowed: {allowed}")
        else:
            lines.append(f"{path}: {err['msg']}, got {err.get('input')!r}")
    return "; ".join(lines)


def _schema_from_signature(
    kind: str, name: str, factory: Callable[..., Any]
) -> tuple[type[BaseModel], tuple[Param, ...]]:
    target = factory.__init__ if inspect.isclass(factory) else factory
    try:
        sig = inspect.signature(target)
        hints = _type_hints(target)
    except (TypeError, ValueError, NameError) as exc:
        raise PluginError(f"{kind} '{name}': cannot read the parameters of its factory: {exc}") from None
    fields: dict[str, Any] = {}
    params: list[Param] = []
    for pname, p in sig.parameters.items():
        if pname == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if pname in CONTEXT_PARAMS[kind]:
            continue
        annotation = hints.get(pname, Any)
        _check_param(kind, name, pname, annotation, p.default)
        required = p.default is inspect.Parameter.empty
        default = ... if required else p.default
        fields[pname] = (annotation, default)
        params.append(Param(pname, _annotation_name(annotation), None if required else p.default, required))
    try:
        schema = create_model(  # type: ignore[call-overload]
            f"{kind.title()}_{name.replace('-', '_')}_Params",
            __config__=ConfigDict(extra="forbid", arbitrary_types_allowed=True),
            **fields,
        )
    except Exception as exc:  # pydantic raises several unrelated types for schemas it cannot build
        raise PluginError(f"{kind} '{name}': cannot build its parameter schema: {_first_line(exc)}") from None
    return schema, tuple(params)


def _check_param(kind: str, name: str, pname: str, annotation: Any, default: Any) -> None:
    """A parameter pydantic can validate, whose default (if any, None aside) passes its own annotation."""
    where = f"{kind} '{name}': parameter '{pname}'"
    shown = _annotation_name(annotation)
    config = ConfigDict(arbitrary_types_allowed=True)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                adapter: TypeAdapter[Any] = TypeAdapter(annotation, config=config)
            except PydanticUserError:  # models, dataclasses and TypedDicts carry their own config
                adapter = TypeAdapter(annotation)
        unchecked = [w for w in caught if w.category.__name__ == "ArbitraryTypeWarning"]  # "not a type"
        if unchecked:
            raise TypeError(str(unchecked[0].message).split(" (")[0])
    except Exception as exc:  # SchemaError, PydanticUserError, RecursionError... all mean "cannot validate"
        raise PluginError(
            f"{where}: its annotation {shown} cannot be validated ({_first_line(exc)}); annotate it with a "
            "type a scenario value can take: int, float, str, bool, Literal[...], or a list, dict or "
            "Optional of them"
        ) from None
    if default is inspect.Parameter.empty or default is None:
        return
    try:
        adapter.validate_python(default)
    except ValidationError as exc:
        raise PluginError(
            f"{where}: its default {default!r} does not pass its own annotation {shown} "
            f"({exc.errors()[0]['msg']})"
        ) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _type_hints(target: Callable[..., Any]) -> dict[str, Any]:
    import typing

    return typing.get_type_hints(target, include_extras=True)


def _annotation_name(annotation: Any) -> str:
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


class Registry:
    """Components by kind and name. ``register`` is the one door for built-ins and plugins alike."""

    def __init__(self) -> None:
        self._items: dict[str, dict[str, Component]] = {k: {} for k in KINDS}

    def register(
        self, kind: str, name: str | None = None, *, source: str | None = None, replace: bool = False
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator registering a factory under ``kind``/``name`` (default: the factory's name).

        ``source`` defaults to where the registration happens: "built-in", or the plugin file or package
        being loaded (see :func:`registering_from`).
        """
        source = source or _CURRENT_SOURCE[-1]
        if kind not in self._items:
            raise PluginError(f"unknown component kind '{kind}'; kinds are: {', '.join(KINDS)}")

        def decorator(factory: Callable[..., Any]) -> Callable[..., Any]:
            cname = name or factory.__name__.lower()
            if inspect.isclass(factory) and inspect.isabstract(factory):
                missing = ", ".join(sorted(factory.__abstractmethods__))
                raise PluginError(
                    f"{kind} '{cname}': class {factory.__name__} does not implement {missing}, which its "
                    f"base class requires; define {missing} before registering it"
                )
            existing = self._items[kind].get(cname)
            if existing is not None and not replace and existing.factory is not factory:
                raise PluginError(
                    f"{kind} '{cname}' from {source} is already registered (by {existing.source}); "
                    "choose another name"
                )
            schema, params = _schema_from_signature(kind, cname, factory)
            doc = inspect.cleandoc(factory.__doc__ or "").splitlines()  # its own, not a base class's
            self._items[kind][cname] = Component(
                kind, cname, factory, source, doc[0] if doc else "", schema, params
            )
            return factory

        return decorator

    def get(self, kind: str, name: str) -> Component:
        """The component, or an error that lists the closest registered names."""
        load_builtins()
        items = self._items.get(kind)
        if items is None:
            raise UnknownComponentError(f"unknown component kind '{kind}'; kinds are: {', '.join(KINDS)}")
        if name not in items:
            close = difflib.get_close_matches(name, list(items), n=3, cutoff=0.5)
            hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            known = ", ".join(sorted(items)) or "(none)"
            raise UnknownComponentError(f"unknown {kind} '{name}'.{hint} Known {kind}s: {known}")
        return items[name]

    def names(self, kind: str) -> list[str]:
        load_builtins()
        return sorted(self._items[kind])

    def list(self, kind: str | None = None, pattern: str = "*") -> Iterator[Component]:
        """Every component of ``kind`` (or all kinds) whose name matches the glob ``pattern``."""
        load_builtins()
        for k in [kind] if kind else list(KINDS):
            for cname in sorted(self._items[k]):
                if fnmatch.fnmatch(cname, pattern):
                    yield self._items[k][cname]

    def unregister(self, kind: str, name: str) -> None:
        """Remove a component (tests and plugin reloads)."""
        self._items[kind].pop(name, None)


_CURRENT_SOURCE: list[str] = ["built-in"]


@contextlib.contextmanager
def registering_from(source: str) -> Iterator[None]:
    """Attribute every registration inside the block to ``source`` (a plugin file or package)."""
    _CURRENT_SOURCE.append(source)
    try:
        yield
    finally:
        _CURRENT_SOURCE.pop()


REGISTRY = Registry()
register = REGISTRY.register
get = REGISTRY.get


def register_model(name: str | None = None, **kw: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return REGISTRY.register("model", name, **kw)


def register_dataset(name: str | None = None, **kw: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return REGISTRY.register("dataset", name, **kw)


def register_trigger(name: str | None = None, **kw: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return REGISTRY.register("trigger", name, **kw)


def register_defense(name: str | None = None, **kw: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return REGISTRY.register("defense", name, **kw)


_BUILTINS_LOADED = False


def load_builtins() -> None:
    """Import the built-in component modules once (they register themselves on import)."""
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    _BUILTINS_LOADED = True
    import importlib

    for module in ("bench.models", "bench.data", "bench.attacks", "bench.defenses"):
        importlib.import_module(module)
    load_entry_points()


_ENTRY_POINTS_LOADED = False


def load_entry_points() -> None:
    """Import every installed package's ``pmoe_bench.plugins`` entry point (once)."""
    global _ENTRY_POINTS_LOADED
    if _ENTRY_POINTS_LOADED:
        return
    _ENTRY_POINTS_LOADED = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist.name if ep.dist is not None else ep.value
        try:
            with registering_from(f"package:{dist}"):
                ep.load()
        except BenchError as exc:
            raise PluginError(f"plugin package '{dist}' (entry point {ep.value}): {exc}") from None
        except Exception as exc:  # report the package and the reason instead of a traceback
            raise PluginError(
                f"plugin package '{dist}' (entry point {ep.value}): failed to import: {type(exc).__name__}: {exc}"
            ) from None
