"""Glue shared by every topic: the model folders the pack registers with ``folder_paths`` and the one lookup of model
names in them, and the checks every node of the pack gets from its schema (``guard``).

``guard(node)`` (applied to every node the extension lists) derives from the node's schema, with no code in the node:

* at queue time (the V3 ``validate_inputs`` hook, so a bad prompt is an HTTP 400 with ``node_errors`` on the node):
  every float is a finite number inside its range, every dropdown value is one of its options (ComfyUI 0.3.75 does
  not check V3 dropdowns itself), every model name resolves inside its model folders (``ModelCombo``), and every
  start/end pair (``start_percent``/``end_percent``, ``start_x``/``end_x``, ``x_start``/``x_end``) is in order;
* when the node runs: the same value checks for values that arrived over links, the pack's own custom types
  (``custom_type``) hold what their type says rather than a raw value from the prompt, every IMAGE input is a
  usable RGB batch (RGBA and grayscale converted), and a ``DreaMovingError`` raised inside reaches the user as one
  message prefixed with the node's display name.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import math
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import comfy.model_management
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io

from dreamoving_core import paths
from dreamoving_core.errors import DreaMovingError, InputMismatchError
from dreamoving_core.images import rgb_frames

# name -> sub-folder of ComfyUI's models dir. Folders other packs already registered (AnimateDiff-Evolved,
# IPAdapter_plus) are extended rather than replaced, so users' existing files show up in our loaders.
MODEL_FOLDERS = {
    "animatediff_models": "animatediff_models",
    "dreamoving_motion": os.path.join("dreamoving", "motion"),
    "dreamoving_video_controlnet": os.path.join("dreamoving", "video_controlnet"),
    "dreamoving_content_guider": os.path.join("dreamoving", "content_guider"),
    "dreamoving_preprocess": os.path.join("dreamoving", "preprocess"),
    "dreamoving_eval": os.path.join("dreamoving", "eval"),
    "ipadapter": "ipadapter",
    "insightface": "insightface",
}
WEIGHT_EXTENSIONS = {".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".onnx"}


def progress(total: int | None = None) -> Callable[..., None]:
    """A ``progress(done, total=None)`` callback for the core's long loops: ComfyUI's progress bar of the running node
    (made at the first call, so a ``total`` known only then can come with it) and the user's interrupt, honoured at
    every call."""
    bar = None

    def update(done: int, of: int | None = None) -> None:
        nonlocal bar
        comfy.model_management.throw_exception_if_processing_interrupted()
        count = total if of is None else of
        bar = bar or comfy.utils.ProgressBar(count)
        bar.update_absolute(done, count)

    return update


def register_model_folders() -> None:
    for name, sub in MODEL_FOLDERS.items():
        path = os.path.join(folder_paths.models_dir, sub)
        if name in folder_paths.folder_names_and_paths:
            registered = folder_paths.folder_names_and_paths[name][0]
            if path not in registered:
                registered.append(path)
        else:
            folder_paths.folder_names_and_paths[name] = ([path], set(WEIGHT_EXTENSIONS))


class NodeError(DreaMovingError):
    """A DreaMovingError prefixed with the node's display name, as users see it in the UI."""


def node_error(node: str, err: Exception | str) -> NodeError:
    """``NodeError("Load Motion Module: <message>")``; keeps the original as the cause."""
    return NodeError(f"{node}: {err}")


@contextlib.contextmanager
def reporting(node: str) -> Iterator[None]:
    """A DreaMovingError raised inside reaches the user as one message prefixed with the display name ``node``
    (messages already prefixed pass through unchanged)."""
    try:
        yield
    except NodeError:
        raise
    except DreaMovingError as err:
        raise node_error(node, err) from err


# ------------------------------------------------------------------------------------------ model names -> paths


@dataclass(frozen=True)
class ModelFolder:
    """Where a name-taking input looks up its model, and what to tell a user whose name is not there.

    ``folders``: ``folder_paths`` names, searched in order. ``holds``: for models that are folders (InsightFace
    packs, ZoeDepth), a glob a usable folder matches (``"config.json"``, ``"*.onnx"``); ``None``: the names are
    files (``suffixes``: only these extensions). ``subfolder``: also look in this sub-folder of every registered
    folder (InsightFace keeps packs in ``insightface/models``). ``extra_roots``: more folders, e.g. another pack's
    download folder. ``hint``: what to put where.
    """

    folders: tuple[str, ...]
    what: str
    hint: str
    holds: str | None = None
    suffixes: tuple[str, ...] = ()
    subfolder: str = ""
    extra_roots: Callable[[], list[str]] = field(default=lambda: [])

    def roots(self) -> list[str]:
        registered = [p for f in self.folders for p in folder_paths.get_folder_paths(f)]
        nested = [os.path.join(p, self.subfolder) for p in registered] if self.subfolder else []
        return nested + registered + self.extra_roots()

    def _usable(self, folder: Path) -> bool:
        return any(folder.glob(self.holds))

    def names(self) -> list[str]:
        """The names a dropdown offers: what the folders hold, without anything that resolves outside them."""
        roots = self.roots()
        if self.holds is not None:
            return paths.list_folders(roots, self._usable)
        listed = {n for f in self.folders for n in folder_paths.get_filename_list(f)}
        listed |= {e.name for r in self.extra_roots() if os.path.isdir(r) for e in os.scandir(r) if e.is_file()}
        if self.suffixes:
            listed = {n for n in listed if n.lower().endswith(self.suffixes)}
        return sorted(paths.resolvable(sorted(listed), roots))

    def where(self) -> str:
        return " or ".join(f"'{r}'" for r in self.roots() if not self.subfolder or r.endswith(self.subfolder))

    def path(self, name: str, input_name: str) -> Path:
        """The real path of ``name``; ``InputMismatchError`` naming ``input_name`` for a name that is not in the
        folders or leads out of them (nothing is opened for those)."""
        try:
            found = paths.find(name, self.roots(), folder=self.holds is not None)
        except InputMismatchError as err:
            raise InputMismatchError(f"{input_name}: {err}") from err
        if found is None or (self.holds is not None and not self._usable(found)):
            raise InputMismatchError(f"{input_name}: {self.what} '{name}' is not in {self.where()}; {self.hint}")
        return found


class ModelCombo(io.Combo.Input):
    """A dropdown of the names in a ``ModelFolder``; ``guard`` checks the value against the folder when the prompt
    is queued. ``choices`` are values besides the names (e.g. ``"none"``); a ``default`` is listed even when absent
    so a shipped workflow opens without an invalid widget and is refused with our message if the file is missing."""

    def __init__(self, id: str, folder: ModelFolder, *, tooltip: str, default: str | None = None,
                 choices: tuple[str, ...] = (), optional: bool = False):
        names = folder.names()
        if default is not None and default not in names and default not in choices:
            names = sorted([default, *names])
        super().__init__(id, options=[*choices, *names], default=default, tooltip=tooltip, optional=optional)
        self.folder = folder
        self.choices = choices


# ------------------------------------------------------------------------------------------ checks from the schema

# Custom io type -> the Python type its values have, for the pack's own types (see custom_type).
CUSTOM_TYPES: dict[str, type | tuple[type, ...]] = {}


def custom_type(io_type: str, python_type: type | tuple[type, ...]):
    """``io.Custom(io_type)``, remembering that its values are ``python_type`` so ``guard`` can refuse others."""
    CUSTOM_TYPES[io_type] = python_type
    return io.Custom(io_type)


def _display(schema: io.Schema) -> str:
    return schema.display_name or schema.node_id


def _range_pairs(inputs: list) -> list[tuple[str, str]]:
    """``(start, end)`` input ids of the schema's numeric ranges, by name: ``start_x``/``end_x``, ``x_start``/
    ``x_end``."""
    ids = {i.id for i in inputs if isinstance(i, (io.Float.Input, io.Int.Input))}
    pairs = []
    for start in ids:
        for prefix, suffix in (("start_", ""), ("", "_start")):
            if start.startswith(prefix) and start.endswith(suffix) and start != prefix + suffix:
                stem = start[len(prefix):len(start) - len(suffix)]
                end = f"end_{stem}" if prefix else f"{stem}_end"
                if end in ids:
                    pairs.append((start, end))
    return sorted(pairs)


def queue_checked(schema: io.Schema) -> list[str]:
    """Ids of the inputs ``validate_inputs`` takes: floats, dropdowns and range ends (ComfyUI then leaves their
    range and option checks to us)."""
    in_pairs = {name for pair in _range_pairs(schema.inputs) for name in pair}
    return [i.id for i in schema.inputs
            if isinstance(i, (io.Float.Input, io.Combo.Input)) or i.id in in_pairs]


def _value_problem(inp, value, queued: bool) -> str | None:
    """What is wrong with one widget value (None: nothing); ``queued``: also its range (ComfyUI checks it itself
    only for inputs ``validate_inputs`` does not take, and never for values that arrive over links)."""
    if isinstance(inp, (io.Float.Input, io.Int.Input)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{inp.id} must be a number, got {value!r}"
        if not math.isfinite(value):
            bounds = f" between {inp.min} and {inp.max}" if inp.min is not None and inp.max is not None else ""
            return f"{inp.id} is {value}; it must be a finite number{bounds}"
        if queued and inp.min is not None and value < inp.min:
            return f"{inp.id} is {value}, below its minimum {inp.min}"
        if queued and inp.max is not None and value > inp.max:
            return f"{inp.id} is {value}, above its maximum {inp.max}"
    elif isinstance(inp, ModelCombo):
        if value not in inp.choices:
            try:
                inp.folder.path(value, inp.id)
            except InputMismatchError as err:
                return str(err)
    elif isinstance(inp, io.Combo.Input) and value not in (inp.options or []):
        shown = ", ".join(map(str, inp.options[:12])) + (", ..." if len(inp.options) > 12 else "")
        return f"{inp.id} is {value!r}, not one of its options ({shown})"
    return None


def _link_problem(inp, value) -> str | None:
    """What is wrong with the value a non-widget input received when the node runs (None: nothing)."""
    io_type = str(inp.get_io_type())
    expected = CUSTOM_TYPES.get(io_type)
    if isinstance(value, (str, int, float, bool)) or (expected is not None and not isinstance(value, expected)):
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        return (f"{inp.id} must be connected to the {io_type} output of another node, but it received "
                f"{shown} ({type(value).__name__})")
    return None


def problems(schema: io.Schema, values: Mapping, *, queued: bool) -> list[str]:
    """Everything wrong with ``values`` (input id -> value; absent or None: linked or not given) for ``schema``.
    ``queued``: checking a prompt being queued (widget values only, ranges included); else the values a node is
    about to run with."""
    found = []
    for inp in schema.inputs:
        value = values.get(inp.id)
        if value is None:
            continue
        problem = (_value_problem(inp, value, queued) if isinstance(inp, io.WidgetInput)
                   else None if queued else _link_problem(inp, value))
        if problem:
            found.append(problem)
    for start, end in _range_pairs(schema.inputs):
        low, high = values.get(start), values.get(end)
        numbers = all(isinstance(v, (int, float)) and math.isfinite(v) for v in (low, high))
        if numbers and low > high:
            found.append(f"{start} ({low}) is after {end} ({high}); {start} must not be larger than {end}")
    return found


def _prepare_images(schema: io.Schema, values: dict) -> dict:
    """``values`` with every IMAGE input as an RGB batch (``rgb_frames``: RGBA and grayscale converted)."""
    for inp in schema.inputs:
        if isinstance(inp, io.Image.Input) and isinstance(values.get(inp.id), torch.Tensor):
            values[inp.id] = rgb_frames(values[inp.id], inp.id)
    return values


def guard(node: type[io.ComfyNode]) -> type[io.ComfyNode]:
    """Install the schema-derived checks (module docstring) on ``node``: a ``validate_inputs`` for queue time (a
    node's own ``validate_inputs`` still runs after ours) and a wrapper around ``execute``. Idempotent."""
    if getattr(node, "_dreamoving_guarded", False):
        return node
    schema = node.define_schema()
    display = _display(schema)
    own_validate = node.__dict__.get("validate_inputs")
    own_args = inspect.getfullargspec(own_validate.__func__) if own_validate is not None else None
    names = queue_checked(schema)
    if own_args is not None:
        names += [a for a in own_args.args[1:] if a not in names]

    def validate_inputs(cls, **values):
        current = cls.define_schema()  # options follow the model folders as they are now
        found = problems(current, values, queued=True)
        if found:
            return f"{display}: {'; '.join(found)}"
        if own_validate is not None:
            wanted = values if own_args.varkw else {k: v for k, v in values.items() if k in own_args.args}
            return own_validate.__func__(cls, **wanted)
        return True

    parameters = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None)
                  for n in ["cls", *names]]
    if own_args is not None and own_args.varkw:  # the node's own check wants every input: so do we
        parameters.append(inspect.Parameter("values", inspect.Parameter.VAR_KEYWORD))
    validate_inputs.__signature__ = inspect.Signature(parameters)  # ComfyUI passes exactly these inputs
    execute = node.execute.__func__

    def checked(cls, kwargs: dict) -> dict:
        current = cls.define_schema()
        found = problems(current, kwargs, queued=False)
        if found:
            raise node_error(display, "; ".join(found))
        try:
            return _prepare_images(current, kwargs)
        except DreaMovingError as err:
            raise node_error(display, err) from err

    if inspect.iscoroutinefunction(execute):
        @functools.wraps(execute)
        async def guarded_execute(cls, *args, **kwargs):
            with reporting(display):
                return await execute(cls, *args, **checked(cls, kwargs))
    else:
        @functools.wraps(execute)
        def guarded_execute(cls, *args, **kwargs):
            with reporting(display):
                return execute(cls, *args, **checked(cls, kwargs))

    node.validate_inputs = classmethod(validate_inputs)
    node.execute = classmethod(guarded_execute)
    node._dreamoving_guarded = True
    return node


register_model_folders()
