"""Data by name: CIFAR-100 fetched through torchvision's downloader with its md5 checked (served
here from a file:// URL: an archive the test builds in the official layout), and the named
image-folder datasets, whose missing folders say the layout and where they are published."""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path

import pytest

from conftest import write_cifar100, write_image_folder

from incremental.data import build_dataset
from incremental.errors import DataError


def cifar_archive(tmp_path: Path) -> tuple[Path, str]:
    """cifar-100-python.tar.gz with the official archive's layout (one cifar-100-python folder),
    and its md5."""
    source = write_cifar100(tmp_path / "source", n_train=120, n_test=60)
    archive = tmp_path / "served" / "cifar-100-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source, arcname="cifar-100-python")
    return archive, hashlib.md5(archive.read_bytes()).hexdigest()


def cifar_config(root: Path, url: str, md5: str):
    from incremental.data.options import Cifar100Config

    return Cifar100Config(root=str(root), download=True, url=url, md5=md5)


def test_the_defaults_are_torchvisions_cifar100() -> None:
    from torchvision.datasets import CIFAR100

    from incremental.data.options import Cifar100Config

    assert (Cifar100Config.url, Cifar100Config.md5) == (CIFAR100.url, CIFAR100.tgz_md5)


@pytest.fixture
def http_server(tmp_path):
    """A local HTTP server over ``tmp_path/served``: torchvision's downloader fetching for real."""
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "served"))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_download_fetches_checks_and_unpacks_then_reuses_the_folder(tmp_path) -> None:
    archive, md5 = cifar_archive(tmp_path)
    root = tmp_path / "data"
    splits = build_dataset("cifar100", cifar_config(root, archive.as_uri(), md5))
    assert len(splits.train) == 120 and len(splits.test) == 60
    assert (root / "cifar-100-python" / "meta").is_file() and (root / archive.name).is_file()
    archive.unlink()  # the unpacked folder is used from now on: nothing is fetched again
    assert len(build_dataset("cifar100", cifar_config(root, archive.as_uri(), md5)).train) == 120


def test_an_http_download_goes_through_torchvisions_downloader(tmp_path, http_server) -> None:
    archive, md5 = cifar_archive(tmp_path)
    root = tmp_path / "data"
    splits = build_dataset("cifar100", cifar_config(root, f"{http_server}/{archive.name}", md5))
    assert len(splits.train) == 120 and (root / archive.name).read_bytes() == archive.read_bytes()
    with pytest.raises(DataError) as caught:  # the same archive under a wrong md5 is refused
        build_dataset("cifar100", cifar_config(tmp_path / "other", f"{http_server}/{archive.name}", "1" * 32))
    assert caught.value.key == "dataset.md5" and md5 in caught.value.message


def test_a_corrupted_archive_is_refused_and_removed(tmp_path) -> None:
    archive, md5 = cifar_archive(tmp_path)
    data = bytearray(archive.read_bytes())
    data[len(data) // 2] ^= 0xFF
    archive.write_bytes(bytes(data))
    root = tmp_path / "data"
    with pytest.raises(DataError) as caught:
        build_dataset("cifar100", cifar_config(root, archive.as_uri(), md5))
    assert caught.value.key == "dataset.md5" and hashlib.md5(bytes(data)).hexdigest() in caught.value.message
    assert not (root / archive.name).exists() and not (root / "cifar-100-python").exists()


def test_an_unreachable_url_is_one_error_naming_it(tmp_path) -> None:
    missing = (tmp_path / "nowhere.tar.gz").as_uri()
    with pytest.raises(DataError, match="cannot download") as caught:
        build_dataset("cifar100", cifar_config(tmp_path / "data", missing, "0" * 32))
    assert caught.value.key == "dataset.url" and missing in caught.value.message


@pytest.mark.parametrize("name", ["imagenet", "imagenet_r", "imagenet_a", "cub200", "objectnet", "omnibenchmark",
                                  "vtab"])
def test_a_named_folder_that_is_missing_says_its_layout_and_where_it_is_published(tmp_path, name) -> None:
    from incremental.data.options import PUBLISHED_FOLDERS
    from incremental.registry import DATASETS

    publication = PUBLISHED_FOLDERS[name]
    config = DATASETS.get(name).config_cls(root=str(tmp_path / name))
    with pytest.raises(DataError) as caught:
        build_dataset(name, config)
    assert f"ROOT/train/<class>/<image> and ROOT/{publication.val_dir}/<class>/<image>" in caught.value.message
    assert publication.where in caught.value.message and caught.value.key == "dataset.root"
    with pytest.raises(DataError, match="not set: pass --set dataset.root=.*is published at"):
        build_dataset(name, DATASETS.get(name).config_cls())


def test_a_named_folder_reads_its_test_split(tmp_path) -> None:
    from incremental.registry import DATASETS

    root = write_image_folder(tmp_path / "imagenet-r")
    (root / "val").rename(root / "test")  # PILOT's layout
    splits = build_dataset("imagenet_r", DATASETS.get("imagenet_r").config_cls(root=str(root), image_size=16))
    assert splits.class_names == ["n01", "n02", "n03"] and len(splits.test) == 9
