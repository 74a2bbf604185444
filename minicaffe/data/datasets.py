"""Finding (and, when asked, downloading) the public datasets: Fashion-MNIST and MNIST.

A dataset's four IDX files are looked for, in this order, in:
  1. ``$MINICAFFE_DATA/<name>/``, then ``$MINICAFFE_DATA`` itself;
  2. the per-user cache, ``${XDG_CACHE_HOME:-~/.cache}/minicaffe/<name>``;
  3. the system directory of a distribution package (Debian's dataset-fashion-mnist);
  4. with ``download=True``: the dataset's public mirrors, saved into the cache.
Each file may be gzip-compressed or not. A candidate is accepted by its content (magic numbers,
dimensions, the full decompressed length), never by its compressed size, which differs between
packagers. A reference such as ``fashion-mnist:train`` names a split and can be a Data layer source.
"""
import http.client
import os
import re
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError
from .idx import inspect_file


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    mirrors: tuple            # base URLs, tried in order; a file's URL is base + file name
    system_dir: str = None    # where a distribution package installs it
    apt_package: str = None
    image_size: tuple = (28, 28)
    # split -> (images file, labels file, number of examples)
    splits: tuple = (("train", "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60000),
                     ("test", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10000))

    def split(self, split):
        for name, images, labels, count in self.splits:
            if name == split:
                return images, labels, count
        known = ", ".join(s[0] for s in self.splits)
        raise DataError(f"dataset '{self.name}' has no split '{split}' (it has: {known})")


DATASETS = {
    "fashion-mnist": DatasetSpec(
        name="fashion-mnist",
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        system_dir="/usr/share/datasets/fashion-mnist",
        apt_package="dataset-fashion-mnist"),
    "mnist": DatasetSpec(
        name="mnist",
        mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/",
                 "https://storage.googleapis.com/cvdf-datasets/mnist/")),
}

_REFERENCE = re.compile(r"^(?P<name>[A-Za-z][\w-]*):(?P<split>\w+)$")


def dataset_spec(name):
    spec = DATASETS.get(name)
    if spec is None:
        raise DataError(f"unknown dataset '{name}' (known: {', '.join(sorted(DATASETS))})")
    return spec


def cache_dir(name):
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "minicaffe" / name


def candidate_dirs(spec):
    """The directories to look in, in order of preference."""
    dirs = []
    env = os.environ.get("MINICAFFE_DATA")
    if env:
        dirs += [Path(env) / spec.name, Path(env)]
    dirs.append(cache_dir(spec.name))
    if spec.system_dir:
        dirs.append(Path(spec.system_dir))
    return dirs


def locate(name, splits=None, download=False, fetch=None, progress=None):
    """Valid copies of the dataset's files for ``splits`` (all by default), all from one directory.

    Returns a dict: file name (as in the spec, .gz) -> the path of the copy. Raises a
    DataError that tells the user what to do when no copy is found. Download progress goes to the
    text stream ``progress`` (none by default).
    """
    spec = dataset_spec(name)
    wanted = _wanted_files(spec, splits)
    problems = []
    for directory in candidate_dirs(spec):
        found = _valid_files_in(directory, wanted, problems)
        if len(found) == len(wanted):
            return found
    if download:
        return _download(spec, wanted, fetch or fetch_url, progress)
    raise DataError(_not_found_message(spec, problems))


def find(name, download=False, fetch=None, progress=None):
    """The directory that holds all of the dataset's files (see ``locate``)."""
    found = locate(name, download=download, fetch=fetch, progress=progress)
    return next(iter(found.values())).parent


def is_reference(source):
    """True for a source shaped like ``fashion-mnist:train`` that is not an existing path."""
    return bool(_REFERENCE.match(source)) and not os.path.exists(source)


def resolve_reference(source):
    """The (images, labels) paths of a reference ``<dataset>:<split>``, without downloading."""
    match = _REFERENCE.match(source)
    if not match:
        raise DataError(f"'{source}' is not a dataset reference like 'fashion-mnist:train'")
    spec = dataset_spec(match["name"])
    images, labels, _ = spec.split(match["split"])
    found = locate(spec.name, splits=[match["split"]])
    return found[images], found[labels]


def fetch_url(url, out, report):
    """Copies ``url`` into the binary file ``out``, calling ``report(done, total)`` (total may be None)."""
    with urllib.request.urlopen(url, timeout=60) as response:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        done = 0
        while chunk := response.read(1 << 16):
            out.write(chunk)
            done += len(chunk)
            report(done, total)


def _wanted_files(spec, splits):
    """(file name, kind, expected dims) for every file of the requested splits."""
    rows, cols = spec.image_size
    wanted = []
    for split in splits or [s[0] for s in spec.splits]:
        images, labels, count = spec.split(split)
        wanted += [(images, "images", (count, rows, cols)), (labels, "labels", (count,))]
    return wanted


# Files already checked in this process, by (path, size, modification time): a test net and a train
# net naming the same dataset should not decompress it twice just to look it up.
_checked = set()


def _check_file(path, kind, dims):
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _checked:
        found = inspect_file(path, kind)
        if tuple(found) != tuple(dims):
            raise DataError(f"{path}: holds {kind} of shape {tuple(found)}, expected {tuple(dims)}")
        _checked.add(key)


def _valid_files_in(directory, wanted, problems):
    found = {}
    for file_name, kind, dims in wanted:
        # Accept the file compressed or not: some users unpack the archives.
        for path in (directory / file_name, directory / file_name.removesuffix(".gz")):
            if not path.is_file():
                continue
            try:
                _check_file(path, kind, dims)
            except DataError as exc:
                problems.append(str(exc))
                continue
            found[file_name] = path
            break
        else:
            return found
    return found


def _download(spec, wanted, fetch, progress):
    target = cache_dir(spec.name)
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create the cache directory {target}: {exc.strerror}") from None
    found = {}
    for file_name, kind, dims in wanted:
        path = target / file_name
        try:
            _check_file(path, kind, dims)
        except (DataError, OSError):
            _download_file(spec, file_name, kind, dims, path, fetch, progress)
        found[file_name] = path
    return found


def _download_file(spec, file_name, kind, dims, path, fetch, progress):
    failures = []
    for base in spec.mirrors:
        url = base + file_name
        # Written beside its final place and renamed when whole, so no reader sees half a file.
        fd, partial = tempfile.mkstemp(prefix=f".{file_name}.", suffix=".part", dir=path.parent)
        report = _ProgressLine(url, progress)
        try:
            with os.fdopen(fd, "wb") as out:
                fetch(url, out, report)
            _check_file(Path(partial), kind, dims)
            os.replace(partial, path)
            report.finish("done")
            return
        except (OSError, ValueError, http.client.HTTPException, DataError) as exc:
            report.finish("failed")
            failures.append(f"{url}: {getattr(exc, 'reason', None) or exc}")
        finally:
            if os.path.exists(partial):
                os.unlink(partial)
    raise DataError(f"could not download {spec.name} file {file_name} ({'; '.join(failures)}); "
                    + _what_to_do(spec))


class _ProgressLine:
    """'downloading URL: 3.1 MB of 26.4 MB', redrawn in place on a terminal, written once otherwise."""

    def __init__(self, url, stream):
        self.url = url
        self.stream = stream
        self.live = stream is not None and stream.isatty()
        self.done = 0
        self._write(f"downloading {url}")

    def __call__(self, done, total):
        self.done = done
        if self.live:
            of_total = f" of {total / 1e6:.1f} MB" if total else ""
            self._write(f"\rdownloading {self.url}: {done / 1e6:.1f} MB{of_total}")

    def finish(self, outcome):
        redraw = f"\rdownloading {self.url}" if self.live else ""
        self._write(f"{redraw}: {self.done / 1e6:.1f} MB, {outcome}\n")

    def _write(self, text):
        if self.stream is not None:
            self.stream.write(text)
            self.stream.flush()


def _what_to_do(spec):
    ways = [f"run `tools/get_data {spec.name}` (downloads it)"]
    if spec.apt_package:
        ways.append(f"`apt-get install {spec.apt_package}`")
    files = ", ".join(f for split in spec.splits for f in split[1:3])
    ways.append(f"set MINICAFFE_DATA to a directory holding its four files ({files})")
    ways.append(f"put those files in {cache_dir(spec.name)}")
    return "to get it: " + ", or ".join(ways)


def _not_found_message(spec, problems):
    looked = ", ".join(str(d) for d in candidate_dirs(spec))
    if not os.environ.get("MINICAFFE_DATA"):
        looked += " (MINICAFFE_DATA is not set)"
    bad = f"; rejected {problems[0]}" if problems else ""
    return f"dataset {spec.name} not found (looked in {looked}{bad}); {_what_to_do(spec)}"
