"""Process set-up: stale build locks of torch extensions are cleared, live ones are kept."""

from __future__ import annotations

import os
import time

from rlhf_ray.runtime import clear_stale_extension_locks


def test_only_an_old_lock_of_a_built_extension_is_removed(tmp_path):
    built, building, fresh = (tmp_path / n for n in ("built_op", "building_op", "fresh_op"))
    for d in (built, building, fresh):
        d.mkdir()
        (d / "lock").touch()
    (built / "built_op.so").touch()
    (fresh / "fresh_op.so").touch()
    old = time.time() - 600
    for d in (built, building):
        os.utime(d / "lock", (old, old))

    removed = clear_stale_extension_locks(tmp_path)

    assert removed == [built / "lock"]
    assert not (built / "lock").exists()
    assert (building / "lock").exists()  # no .so yet: a build may still own it
    assert (fresh / "lock").exists()  # too recent: the build may have just finished
    assert clear_stale_extension_locks(tmp_path / "absent") == []
