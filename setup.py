"""Package discovery (the metadata is in setup.cfg).

Every package under incremental/ is found, and strategies/ and protocols/ (with any
subpackages) install as incremental.strategies and incremental.protocols through setup.cfg's
package_dir; a hand-written list once left incremental.probes out of the wheel."""

from setuptools import find_packages, setup


def packages() -> list[str]:
    found = find_packages(include=["incremental", "incremental.*"])
    for folder in ("strategies", "protocols"):
        found += [f"incremental.{folder}"] + [f"incremental.{folder}.{sub}" for sub in find_packages(folder)]
    return found


setup(packages=packages())
