"""Test helper (see tests/conftest.py): with PAUSE_AFTER_IMAGES=N set, the image reader of this
process (`images.apply`, called once per image) stops for good after N images and prints
"paused"; without it, this file does nothing."""

import os

if os.environ.get("PAUSE_AFTER_IMAGES"):
    import sys
    import time

    from pipeline import images

    _limit, _calls, _load = int(os.environ["PAUSE_AFTER_IMAGES"]), [0], images.apply

    def _pausing_load(*args, **kwargs):
        _calls[0] += 1
        if _calls[0] > _limit:
            print("paused", flush=True, file=sys.stdout)
            while True:
                time.sleep(3600)
        return _load(*args, **kwargs)

    images.apply = _pausing_load
