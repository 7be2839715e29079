"""Load and call a user's criterion given as `MODULE:ATTR` or `MODULE:ATTR(arg=value, ...)`.

`MODULE` is a dotted module or a path to a .py file. `ATTR` is a class (instantiated with no
arguments), a factory taking no arguments (called once), or the criterion itself; `ATTR(k=v, ...)`
calls it with literal arguments and nested calls of MODULE's own names (`nanscope.user_spec`: read
with `ast`, nothing else is evaluated); a parameter `args` left out gets the checkpoint's saved
`argparse.Namespace` (Open-GroundingDino's). A
callable is the criterion itself when its first two parameters can take (outputs, targets) and
every other required parameter is a name nanscope fills (`EXTRA_NAMES`); one whose parameters name
its configuration (`num_classes`, `matcher`, `args`, ...) is a factory and needs `ATTR(...)`.

The criterion is called `criterion(outputs, targets, **extras)`: further parameters of its
`__call__`/`forward` named like an extra are filled by name (`cat_list`, `caption`, `label_map`,
`tokenizer`, ...), so Open-GroundingDino's `forward(outputs, targets, cat_list, caption)` runs as it
is; `call_matcher` does the same for a matcher. Each call gets a fresh copy of the output dicts
(criteria write `one_hot` into them). The user's stdout is captured while `collect_user_stdout` is
active. Errors name the user's own frame (file:line), not nanscope's. A `sys.exit()` in user code
is an error in that code (`CriterionError`, exit 2), never nanscope's exit code.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import io
import sys
import traceback
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch

from nanscope.errors import CriterionError, Interrupt
from nanscope.replay.criterion_inputs import EXTRA_NAMES
from nanscope.user_spec import ArgsProvider, Spec, call_checked, evaluate, parse_spec

Criterion = Callable[..., Mapping[str, torch.Tensor]]

_INTERNAL = (f"{Path(torch.__file__).parent}", f"{Path(__file__).parent}", "<frozen ", "importlib")
# Parameter names that say a callable builds a criterion rather than being one (public trainers' factories).
CONSTRUCTION_NAMES = frozenset({"args", "cfg", "config", "num_classes", "matcher", "weight_dict", "losses",
                                "eos_coef", "focal_alpha", "focal_gamma", "num_queries", "device", "model",
                                "max_txt_len", "max_text_len", "loss_type", "opt", "options", "hparams"})
MAX_STDOUT = 64 * 1024  # characters of the user's output kept for the report

_STDOUT: ContextVar[io.StringIO | None] = ContextVar("nanscope_user_stdout", default=None)
_ISOLATE: ContextVar[bool] = ContextVar("nanscope_isolate_user_code", default=False)
_PROBED: ContextVar[set[int] | None] = ContextVar("nanscope_probed_user_code", default=None)  # ids already probed


class UserStdout:
    """What the user's code printed while `collect_user_stdout()` was active (`.text` once it exits)."""

    def __init__(self) -> None:
        self.buffer = io.StringIO()
        self.text = ""


@contextlib.contextmanager
def collect_user_stdout() -> Iterator[UserStdout]:
    """Capture the stdout of user code run inside (criteria, matchers, their module imports)."""
    out = UserStdout()
    token = _STDOUT.set(out.buffer)
    try:
        yield out
    finally:
        _STDOUT.reset(token)
        out.text = _clipped(out.buffer.getvalue())


@contextlib.contextmanager
def collect_model_stdout() -> Iterator[UserStdout]:
    """Capture what the model's own code prints while nanscope runs it (groundingdino's `output layer_id 0
    is nan`, `num_nan ...`): the library never writes to stdout; reports show it in a block of its own.
    User code inside a `collect_user_stdout` still goes to that collector."""
    out = UserStdout()
    try:
        with contextlib.redirect_stdout(out.buffer):
            yield out
    finally:
        out.text = _clipped(out.buffer.getvalue())


def _clipped(text: str) -> str:
    return text if len(text) <= MAX_STDOUT else text[:MAX_STDOUT] + f"\n... ({len(text) - MAX_STDOUT} more characters)\n"


def user_io() -> contextlib.AbstractContextManager[Any]:
    """Redirect stdout into the active collector (a no-op without one)."""
    buf = _STDOUT.get()
    return contextlib.redirect_stdout(buf) if buf is not None else contextlib.nullcontext()


@contextlib.contextmanager
def user_call(what: str) -> Iterator[None]:
    """Run user code (`what` names it): its stdout goes to the active collector, and a `SystemExit` it raises
    (`sys.exit(0)` in a criterion) or any other `BaseException` that is not an `Exception` becomes a
    `CriterionError`: user code never chooses nanscope's exit code. KeyboardInterrupt passes through
    unchanged (Ctrl-C: the CLI exits 130). `os._exit` is only caught by `isolated_user_code`."""
    try:
        with user_io():
            yield
    except (KeyboardInterrupt, Interrupt):  # Ctrl-C, or nanscope's own signal through the user's code
        raise
    except SystemExit as exc:
        raise CriterionError(f"your {what} exited: it raised SystemExit({exc.code!r}) (sys.exit) at "
                             f"{user_frame(exc)}; user code cannot choose nanscope's exit code, so this is an "
                             "error in that code") from None
    except Exception:
        raise
    except BaseException as exc:  # GeneratorExit, a user's own BaseException subclass, ...
        raise CriterionError(f"your {what} raised {type(exc).__name__}: {exc} (a BaseException, not an Exception) "
                             f"at {user_frame(exc)}; user code cannot end nanscope, so this is an error in that "
                             "code") from None


@contextlib.contextmanager
def isolated_user_code(on: bool = True) -> Iterator[None]:
    """While active, user code (criterion imports, criteria, matchers) first runs in a forked child process
    (`--isolate`, the CLI's default): a child that ends without answering (`os._exit`, a signal, a C-level
    abort) becomes a `CriterionError` in the parent, which then never runs that call. A child that answers
    (returned or raised) lets the parent run the call itself, so gradients and errors are the parent's own.
    Costs one more run of the first call of each user callable (later calls of it run directly: an exit that
    depends on the data of a later call is not caught); skipped for CUDA tensors (a forked child cannot use
    CUDA) and outside the main thread."""
    token = _ISOLATE.set(on)
    probed = _PROBED.set(set())
    try:
        yield
    finally:
        _PROBED.reset(probed)
        _ISOLATE.reset(token)


def _ends_process(call: Callable[[], Any], what: str, tensors: Any = (), key: Any = None) -> None:
    """Run `call()` in a forked child; raise CriterionError when the child ends without answering.
    With `key` (the user's callable), only its first call is probed: later calls run directly."""
    import os
    import signal
    import threading

    if not _ISOLATE.get() or not hasattr(os, "fork") or threading.current_thread() is not threading.main_thread():
        return
    seen = _PROBED.get()
    if key is not None and seen is not None:
        if id(key) in seen:
            return
        seen.add(id(key))
    if any(isinstance(t, torch.Tensor) and t.is_cuda for t in _leaves(tensors)):
        return
    r, w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: answer b"r" (returned) or b"e" (raised), never run anything else
        answer = b"e"
        try:
            os.close(r)
            torch.set_num_threads(1)
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                call()
            answer = b"r"
        except BaseException:  # noqa: BLE001 (the parent runs the call again and reports what it raises)
            pass
        finally:
            try:
                os.write(w, answer)
            finally:
                os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        answer = f.read()
    _, status = os.waitpid(pid, 0)
    if answer in (b"r", b"e"):
        return
    if os.WIFSIGNALED(status):
        how = f"was killed by signal {signal.Signals(os.WTERMSIG(status)).name}"
    else:
        how = f"ended the process itself with exit code {os.WEXITSTATUS(status)} (os._exit, or a C-level exit)"
    raise CriterionError(f"your {what} {how} when nanscope ran it in a child process (--isolate); it never "
                         "returned, so nanscope did not run it in its own process. User code cannot end nanscope "
                         "or choose its exit code: this is an error in that code")


def _leaves(x: Any) -> Iterator[Any]:
    if isinstance(x, Mapping):
        for v in x.values():
            yield from _leaves(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _leaves(v)
    else:
        yield x


def user_frame(exc: BaseException) -> str:
    """'file.py:12 in fn: line text' for the innermost frame outside torch and nanscope."""
    frames = traceback.extract_tb(exc.__traceback__)
    mine = [f for f in frames if not f.filename.startswith(_INTERNAL)]
    f = (mine or frames or [None])[-1]
    if f is None:
        return "<unknown>"
    return f"{f.filename}:{f.lineno} in {f.name}: {(f.line or '').strip()}"


def defined_at(obj: Any) -> str:
    """'file.py:12' where a user's class or function is defined ('<unknown>' for builtins)."""
    try:
        target = inspect.unwrap(obj)
        return f"{inspect.getsourcefile(target)}:{inspect.getsourcelines(target)[1]}"
    except (TypeError, OSError):
        return "<unknown>"


def _import(module: str) -> Any:
    if module.endswith(".py") or "/" in module or "\\" in module:
        path = Path(module)
        if not path.is_file():
            raise CriterionError(f"criterion file {module!r} does not exist")
        name = f"nanscope_user_{path.stem}_{abs(hash(str(path.resolve())))}"
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise CriterionError(f"criterion file {module!r} cannot be imported as Python")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        return mod
    return importlib.import_module(module)


def load_criterion(spec: str, *, saved_args: ArgsProvider | None = None) -> tuple[Criterion, str]:
    """`'pkg.losses:SetCriterion'`, `'path/losses.py:make'`, `'losses.py:build(num_classes=3)'` or
    `'main.py:SetCriterion(matcher=HungarianMatcher(cost_class=2.0), ...)'` -> (callable criterion, display name).

    saved_args: () -> the checkpoint's saved `argparse.Namespace` (or None), given to any callable of the
    spec that takes a parameter named `args` the spec leaves out (`nanscope.user_spec`)."""
    parsed = parse_spec(spec)
    module, attr = parsed.module, parsed.attr
    try:
        with user_call(f"criterion module {module!r}"):
            _ends_process(lambda: _import(module), f"criterion module {module!r} (while being imported)")
            mod = _import(module)
    except CriterionError:
        raise
    except Exception as exc:
        raise CriterionError(f"criterion module {module!r} failed to import: {type(exc).__name__}: {exc} "
                             f"(at {user_frame(exc)})") from None
    obj: Any = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = sorted(n for n in dir(mod) if not n.startswith("_"))[:20]
            raise CriterionError(f"criterion module {module!r} has no attribute {attr!r}; it has {', '.join(names)}")
        obj = getattr(obj, part)
    try:
        with user_call(f"criterion {spec!r} (while being created)"):
            _ends_process(lambda: _create(obj, parsed, mod, saved_args), f"criterion {spec!r} (while being created)")
            crit = _create(obj, parsed, mod, saved_args)
    except CriterionError:
        raise
    except Exception as exc:
        raise CriterionError(f"criterion {spec!r} raised while being created: {type(exc).__name__}: {exc} "
                             f"(at {user_frame(exc)})") from None
    if not callable(crit):
        raise CriterionError(f"criterion {spec!r} gave a {type(crit).__name__}, which is not callable")
    return crit, spec


def _create(obj: Any, parsed: Spec, module: Any, saved_args: ArgsProvider | None) -> Any:
    spec = parsed.text
    if parsed.call is not None:
        return evaluate(parsed, obj, module, defined_at, saved_args)
    if saved_args is not None and _required(obj) == ["args"] and (inspect.isclass(obj) or not _is_criterion(obj)):
        return call_checked(obj, [], {}, spec, defined_at(obj), saved_args)  # build_criterion(args)
    if inspect.isclass(obj):
        need = _required(obj)
        if need:
            raise CriterionError(
                f"criterion {spec!r} is class {obj.__name__} (defined at {defined_at(obj)}), whose constructor needs "
                f"{', '.join(need)}; pass them as '{spec}({', '.join(f'{n}=...' for n in need)})' with literal "
                "values, or point at a factory that builds it")
        return obj()
    if not callable(obj):
        return obj
    need = _required(obj)
    if not need:
        return obj() if _signature(obj) is not None else obj  # a factory with no arguments (builtins: as is)
    if _is_criterion(obj):
        return obj
    raise CriterionError(
        f"criterion {spec!r} is {getattr(obj, '__name__', type(obj).__name__)} (defined at {defined_at(obj)}), "
        f"which takes {', '.join(need)}: a factory, not a criterion called as (outputs, targets); pass them as "
        f"'{spec}({', '.join(f'{n}=...' for n in need)})' with literal values, or point at the criterion itself")


def _signature(fn: Any) -> inspect.Signature | None:
    target = fn.forward if isinstance(fn, torch.nn.Module) else fn
    try:
        return inspect.signature(target)
    except (TypeError, ValueError):
        return None


def _positional(sig: inspect.Signature) -> list[inspect.Parameter]:
    return [p for p in sig.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _required(fn: Any) -> list[str]:
    sig = _signature(fn)
    if sig is None:
        return []
    return [p.name for p in sig.parameters.values() if p.default is p.empty
            and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _is_criterion(fn: Any) -> bool:
    """Its first two parameters take (outputs, targets) and nanscope fills every other required one."""
    sig = _signature(fn)
    if sig is None:
        return True
    pos = _positional(sig)
    varargs = any(p.kind is p.VAR_POSITIONAL for p in sig.parameters.values())
    if len(pos) < 2 and not varargs:
        return False
    if any(p.name in CONSTRUCTION_NAMES for p in pos[:2]):
        return False
    rest = [p for p in sig.parameters.values() if p not in pos[:2] and p.default is p.empty
            and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    return all(p.name in EXTRA_NAMES for p in rest)


def bind_extras(fn: Any, extras: Mapping[str, Any], n_args: int = 2) -> tuple[list[Any], dict[str, Any], list[str]]:
    """(extra positional args, keyword args, missing required names) for `fn(*first n_args, ...)`."""
    sig = _signature(fn)
    if sig is None:
        return [], {}, []
    params = list(sig.parameters.values())
    pos = _positional(sig)
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    missing: list[str] = []
    for p in params:
        if p in pos[:n_args] or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.name in extras:
            if p.kind is p.POSITIONAL_ONLY:
                args.append(extras[p.name])
            else:
                kwargs[p.name] = extras[p.name]
        elif p.default is p.empty:
            missing.append(p.name)
    return args, kwargs, missing


def fresh_outputs(outputs: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of the output dicts (same tensors): a criterion that writes into them does not change ours."""
    out = dict(outputs)
    for k, v in out.items():
        if isinstance(v, dict):
            out[k] = dict(v)
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            out[k] = [dict(x) for x in v]
    return out


def _keys_note(outputs: Mapping[str, Any], targets: Any, extras: Mapping[str, Any]) -> str:
    tkeys = sorted({str(k) for t in targets if isinstance(t, Mapping) for k in t})
    return (f"nanscope's targets carry {', '.join(tkeys) or 'nothing'}; its outputs carry "
            f"{', '.join(sorted(map(str, outputs)))}; parameters it fills by name: "
            f"{', '.join(sorted(extras)) or 'none'} (docs/criterion-protocol.md)")


def _invoke(fn: Any, outputs: Mapping[str, Any], targets: Any, extras: Mapping[str, Any] | None,
            name: str, what: str) -> Any:
    extras = dict(extras or {})
    args, kwargs, missing = bind_extras(fn, extras)
    if missing:
        raise CriterionError(
            f"{name}: its {what} needs {', '.join(missing)}, which nanscope cannot fill (defined at "
            f"{defined_at(fn.forward if isinstance(fn, torch.nn.Module) else fn)}); it fills "
            f"{', '.join(sorted(extras)) or 'nothing'} by name. Give them defaults, or wrap it")
    outputs = fresh_outputs(outputs)
    targets = [dict(t) if isinstance(t, Mapping) else t for t in targets]
    label = f"{what} {name!r}" if name != what else what
    _ends_process(lambda: fn(fresh_outputs(outputs), [dict(t) if isinstance(t, Mapping) else t for t in targets],
                             *args, **kwargs), label, (outputs, targets), key=fn)
    try:
        with user_call(label):
            return fn(outputs, targets, *args, **kwargs)
    except KeyError as exc:
        raise CriterionError(f"{name} raised KeyError {exc} (at {user_frame(exc)}): "
                             f"{_keys_note(outputs, targets, extras)}") from None


def call_criterion(crit: Criterion, outputs: Mapping[str, Any], targets: list[Mapping[str, Any]], *,
                   name: str = "criterion", extras: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """Run the criterion (extras filled by name); its exceptions become `CriterionError` naming the user's frame."""
    try:
        terms = _invoke(crit, outputs, targets, extras, name, "criterion")
    except CriterionError:
        raise
    except Exception as exc:
        raise CriterionError(f"{name} raised {type(exc).__name__}: {exc} (at {user_frame(exc)})") from None
    if isinstance(terms, torch.Tensor):
        terms = {"loss": terms}
    if isinstance(terms, tuple) and terms and isinstance(terms[0], Mapping):  # (losses, indices), return_indices
        terms = terms[0]
    if not isinstance(terms, Mapping):
        raise CriterionError(f"{name} returned a {type(terms).__name__}; expected a dict of loss tensors")
    out = {str(k): v for k, v in terms.items() if isinstance(v, torch.Tensor)}
    meta = [k for k, v in out.items() if v.device.type == "meta"]
    if meta:
        raise CriterionError(f"{name} returned {', '.join(meta)} on the meta device (a tensor with no values); "
                             "expected loss tensors computed from the outputs")
    if not out:
        raise CriterionError(f"{name} returned no tensor loss terms (keys: {', '.join(map(str, terms))})")
    return out


def call_matcher(matcher: Any, outputs: Mapping[str, Any], targets: list[Mapping[str, Any]], *,
                 extras: Mapping[str, Any] | None = None) -> list[tuple[Any, Any]]:
    """`matcher(outputs, targets, **extras by name)` -> its [(query_idx, box_idx)] per image.

    A matcher that returns `(indices, something)` (e.g. the positive maps it built) gives its indices.
    Exceptions propagate as they are (a matcher refusing non-finite costs is a finding, not a bug).
    """
    result = _invoke(matcher, outputs, targets, extras, "matcher", "matcher")
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], (list, tuple)) \
            and not isinstance(result[1], (list, tuple)):
        result = result[0]
    return list(result)


def per_image_matcher(matcher: Any, extras: Mapping[str, Any] | None) -> Callable[..., list[tuple[Any, Any]]]:
    """`fn(outputs, targets)` -> the user's matcher run image by image, each with its own extras
    (`label_map` of that image, ...): what a batch-level caller needs for a 3-argument matcher.
    For a DETR matcher the result is the batched one (matching is per image)."""
    from nanscope.replay.criterion_inputs import image_extras

    def call(outputs: Mapping[str, Any], targets: list[Mapping[str, Any]]) -> list[tuple[Any, Any]]:
        out: list[tuple[Any, Any]] = []
        for i, t in enumerate(targets):
            one = {k: (v[i:i + 1] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == len(targets)
                       else v) for k, v in outputs.items() if not isinstance(v, (dict, list))}
            out += call_matcher(matcher, one, [t], extras=image_extras(extras or {}, i))
        return out

    return call
