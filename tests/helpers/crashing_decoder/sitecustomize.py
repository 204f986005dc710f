"""A decoder that crashes its process on one marked image, as a faulty native codec would.

On PYTHONPATH this module runs in every Python process; in Ray's worker processes only, Pillow's
``Image.open`` ends the process at once (no exception, no clean-up) when the image's bytes carry
the marker below. The driver and the test itself decode normally.
"""

import os
import sys

MARKER = b"ray-inspect-test: crash the decoder"

if sys.argv and "default_worker" in sys.argv[0]:
    from PIL import Image

    _open = Image.open

    def _crashing_open(fp, *args, **kwargs):
        data = fp.getvalue() if hasattr(fp, "getvalue") else b""
        if MARKER in data:
            os._exit(139)
        return _open(fp, *args, **kwargs)

    Image.open = _crashing_open
