"""The torch attnzoo was built against, and the check ``import attnzoo`` makes
before it loads the C++ extension (importing this module runs it).

The CMake build writes ``lib/build_info.json`` beside libattnzoo (in place:
python/attnzoo/lib/; in a wheel or a ``pip install``: the installed package)
with the full ``torch.__version__`` it compiled against, local tag included
("2.15.0+cu132"). Torch promises no C++ ABI between releases, and the local
tag names the build variant (the CUDA version libattnzoo links, or a source
build's commit), so any other torch is refused here, with a message, rather
than failing later with an undefined symbol or a crash.
"""
import json
import os

import torch

BUILD_INFO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib", "build_info.json")


def built_with_torch() -> str:
    """The torch version string this attnzoo was built against."""
    try:
        with open(BUILD_INFO, encoding="utf-8") as f:
            return json.load(f)["torch_version"]
    except (OSError, ValueError, KeyError) as error:
        raise ImportError(f"attnzoo: cannot read {BUILD_INFO} ({error}): the C++ extension is not built, or was "
                          "built by an older attnzoo. Build it (tools/build.sh for PYTHONPATH=python use) or "
                          "reinstall attnzoo.") from None


def check_torch() -> None:
    """Raises ImportError unless the running torch is the one attnzoo was built against."""
    built, running = built_with_torch(), str(torch.__version__)
    if built != running:
        raise ImportError(
            f"attnzoo was built against torch {built}, but this Python has torch {running} "
            f"({os.path.dirname(torch.__file__)}). Its C++ extension works only with the torch it was compiled "
            f"against (torch's C++ ABI changes between releases and build variants). Rebuild attnzoo with this "
            f"torch (tools/build.sh in a checkout, then `pip install --no-build-isolation .` or tools/build-wheel), "
            f"or install torch=={built}.")


check_torch()
