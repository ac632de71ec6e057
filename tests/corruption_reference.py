"""Loads the reference ``imagecorruptions`` package (1.1.2) on today's numpy/scikit-image.

It predates numpy 2 (``np.float_``), scikit-image 0.19 (``multichannel=``) and setuptools
81 (``pkg_resources``); these three removed names are supplied so that its own code runs
unchanged. Returns None when the package is not installed or still does not import.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types
import warnings
from typing import Any


def load_reference() -> Any:
    spec = importlib.util.find_spec("imagecorruptions")
    if spec is None or not spec.submodule_search_locations:
        return None
    import numpy as np

    if not hasattr(np, "float_"):
        np.float_ = np.float64  # type: ignore[attr-defined]
    if importlib.util.find_spec("pkg_resources") is None:  # gone from setuptools 81 on
        shim = types.ModuleType("pkg_resources")
        package_dir = list(spec.submodule_search_locations)[0]
        shim.resource_filename = lambda _pkg, path: os.path.join(package_dir, path)  # type: ignore[attr-defined]
        sys.modules["pkg_resources"] = shim
    try:
        with warnings.catch_warnings():  # its scipy.ndimage.interpolation import is deprecated
            warnings.simplefilter("ignore", DeprecationWarning)
            module = importlib.import_module("imagecorruptions.corruptions")
    except Exception:  # noqa: BLE001 - any import failure means: no reference here
        return None
    from skimage.filters import gaussian

    def gaussian_compat(image: Any, sigma: float = 1.0, multichannel: bool | None = None, **kwargs: Any) -> Any:
        if multichannel:
            kwargs["channel_axis"] = -1
        return gaussian(image, sigma=sigma, **kwargs)

    module.gaussian = gaussian_compat
    return module
