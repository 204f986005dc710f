"""A decoder that crashes its process, or hangs, on a marked image, as a faulty native codec would.

On PYTHONPATH this module runs in every Python process; in Ray's worker processes only, Pillow's
``Image.open`` ends the process at once (no exception, no clean-up) when the image's bytes carry
``MARKER``, and never returns (as a decoder stuck in a loop) when they carry ``HANG_MARKER``. The
driver and the test itself decode normally.
"""

import os
import sys
import time

MARKER = b"ray-inspect-test: crash the decoder"
HANG_MARKER = b"ray-inspect-test: hang the decoder"

if sys.argv and "default_worker" in sys.argv[0]:
    from PIL import Image

    _open = Image.open

    def _faulty_open(fp, *args, **kwargs):
        data = fp.getvalue() if hasattr(fp, "getvalue") else b""
        if MARKER in data:
            os._exit(139)
        if HANG_MARKER in data:
            while True:
                time.sleep(60)
        return _open(fp, *args, **kwargs)

    Image.open = _faulty_open
