"""``python dev.py models``: check a ComfyUI ``models`` folder against what the shipped workflows need; download what
is missing (``--download``), with a progress bar, resume, and a final check by our own loaders.

Also runs without dev.py from any Python that has torch (e.g. ComfyUI's own): ``python -m devtools.models
--models /path/to/ComfyUI/models --download``, from the pack's folder.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from devtools.server import PACK_DIR
from dreamoving_core.catalog import BY_NAME, FOLDERS, ModelFile, check_model, download, required_models
from dreamoving_core.errors import DreaMovingError

API_DIR = PACK_DIR / "workflows" / "api"
PRESENT, MISSING, WRONG, UNKNOWN = "present", "missing", "WRONG KIND", "unknown"


@dataclass
class Status:
    """What the models folder holds for one model a workflow names."""

    folder: str
    name: str
    state: str
    detail: str
    model: ModelFile | None = None

    @property
    def where(self) -> str:
        return f"{FOLDERS.get(self.folder, (self.folder,))[0]}/{self.name}"


def shipped_workflows() -> dict[str, dict]:
    """Template title -> API graph of every shipped workflow (titles from the canvas files that name a twin)."""
    from devtools.workflow_ui import UI_DIR, api_twin

    graphs = {}
    for ui_file in sorted(UI_DIR.glob("*.json")):
        twin = api_twin(ui_file)
        if twin.exists():
            graphs[ui_file.stem] = json.loads(twin.read_text())
    return graphs


def status_of(models_dir: Path, folder: str, name: str) -> Status:
    """Whether ``folder``/``name`` is in ``models_dir`` and is the kind of model its loader needs."""
    model = BY_NAME.get((folder, name))
    if model is None:
        return Status(folder, name, UNKNOWN, "not in the pack's catalogue: get it where its workflow says")
    path = model.find(models_dir)
    if path is None:
        return Status(folder, name, MISSING, model.page, model)
    try:
        return Status(folder, name, PRESENT, check_model(model, path), model)
    except DreaMovingError as err:
        return Status(folder, name, WRONG, str(err), model)


def progress_bar(label: str):
    """A tqdm bar for one download (tqdm comes with ComfyUI)."""
    from tqdm import tqdm

    bar = tqdm(desc=label, unit="B", unit_scale=True, unit_divisor=1024, leave=True)

    def update(done: int, total: int | None) -> None:
        if total is not None and bar.total != total:
            bar.total = total
        bar.update(done - bar.n)
        if total is not None and done >= total:
            bar.close()

    return update


def mirror(base: str | None):
    """A URL mapper that fetches from ``base`` + the original URL's path (a local or institutional mirror)."""
    if not base:
        return lambda url: url
    from urllib.parse import urlsplit

    return lambda url: base.rstrip("/") + urlsplit(url).path


def main(argv: list[str] | None = None, comfy_dir: Path | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dev.py models", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path,
                        help="the ComfyUI models folder (default: $DREAMOVING_MODELS, else the ComfyUI host's)")
    parser.add_argument("--workflow", action="append", default=[],
                        help="check only the workflows whose title contains this text (repeatable)")
    parser.add_argument("--download", action="store_true", help="download what is missing, then check it")
    parser.add_argument("--mirror", help="fetch from this base URL + each file's original path")
    args = parser.parse_args(argv)
    models_dir = args.models or (Path(os.environ["DREAMOVING_MODELS"]) if os.environ.get("DREAMOVING_MODELS")
                                 else (comfy_dir / "models" if comfy_dir else None))
    if models_dir is None:
        parser.error("give --models /path/to/ComfyUI/models")
    models_dir = models_dir.expanduser()
    workflows = {title: graph for title, graph in shipped_workflows().items()
                 if not args.workflow or any(w.lower() in title.lower() for w in args.workflow)}
    if not workflows:
        parser.error(f"no shipped workflow matches {args.workflow}")
    needed: list[tuple[str, str]] = []
    for graph in workflows.values():
        needed += [m for m in required_models(graph) if m not in needed]
    print(f"models folder: {models_dir}")
    status = {key: status_of(models_dir, *key) for key in needed}
    if args.download:
        for key, st in status.items():
            if st.state != MISSING:
                continue
            try:
                download(st.model, models_dir, progress_bar, mirror(args.mirror))
            except DreaMovingError as err:
                print(f"  download of {st.name} failed: {err}", file=sys.stderr)
            status[key] = status_of(models_dir, *key)
    width = max(len(st.where) for st in status.values())
    for st in status.values():
        detail = st.model.url if st.state == MISSING and st.model.is_single_file else st.detail
        print(f"  {st.state:<10} {st.where:<{width}}  {detail}")
    print("workflows:")
    for title, graph in workflows.items():
        lacking = [status[key].name for key in required_models(graph) if status[key].state != PRESENT]
        print(f"  {title}: " + ("ready" if not lacking else f"needs {', '.join(lacking)}"))
    bad = [st for st in status.values() if st.state != PRESENT]
    if bad and not args.download and any(st.state == MISSING for st in bad):
        print("run again with --download to fetch the missing files")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
