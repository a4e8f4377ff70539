"""Writing output directories so a crash never leaves a half-written one where a finished one is expected."""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Callable


def replace_directory_atomically(output_dir: str, write: Callable[[str], None], prefix: str = ".staging-") -> None:
    """Call ``write(staging_dir)``, then swap the staging directory into ``output_dir``.

    The staging directory sits next to ``output_dir`` (same filesystem, so the rename is atomic) and is removed
    if ``write`` fails; an existing ``output_dir`` is replaced only once the new one is complete.
    """
    parent = os.path.dirname(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=prefix, dir=parent)
    try:
        write(staging)
        # mkdtemp makes the directory private, and some writers (Paddle's graph saver) their files; an output
        # directory is shared data.
        os.chmod(staging, 0o755)
        for name in os.listdir(staging):
            path = os.path.join(staging, name)
            if os.path.isfile(path):
                os.chmod(path, 0o644)
        if os.path.isdir(output_dir):
            shutil.rmtree(output_dir)
        os.replace(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
