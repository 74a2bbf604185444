"""The data path: sources (IDX files, LMDB databases of Datum, named datasets), the transformer and
the prefetching thread that the Data layer puts together.

``open_source`` turns a DataParameter into a source: an object with ``count``, ``item_shape``
(C, H, W), ``dtype`` and ``gather(indices, images_out, labels_out)``.
"""
import os

from ..errors import DataError
from ..proto import minicaffe_pb2 as pb
from .datasets import is_reference, resolve_reference
from .idx import open_idx_stream, read_header, read_pair
from .lmdb_db import LmdbReader

LEVELDB_MESSAGE = ("LEVELDB is not supported; convert the data to LMDB "
                   "(tools/convert_mnist IMAGES LABELS OUTPUT_DB --backend=lmdb)")


def read_list_file(path, where, field, expected):
    """The text of the list file a data layer names in ``field`` (``image_data_param.source``, say).

    Errors name the layer and the field; ``expected`` ("of 'path label' lines") completes the hint
    when a directory or a binary file is named instead.
    """
    try:
        with open(path, encoding="utf-8") as stream:
            return stream.read()
    except FileNotFoundError:
        raise DataError(f"{where}: {field} '{path}': no such file ({os.path.abspath(path)})") from None
    except IsADirectoryError:
        raise DataError(f"{where}: {field} '{path}' is a directory; name a text file {expected}") from None
    except OSError as exc:
        raise DataError(f"{where}: {field} '{path}': cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise DataError(f"{where}: {field} '{path}' is not a text file (name a text file {expected})") from None


def open_source(data_param, where):
    """Opens ``data_param.source``; errors are DataErrors that start with ``where`` (the layer)."""
    source = data_param.source
    if not source:
        raise DataError(f"{where}: data_param.source is not set")
    if data_param.HasField("backend"):
        backend = data_param.backend
    else:
        backend = detect_backend(source, where)
    if backend == pb.DataParameter.LEVELDB:
        raise DataError(f"{where}: {LEVELDB_MESSAGE}")
    if not is_reference(source) and not os.path.exists(source):
        raise DataError(f"{where}: data_param.source '{source}': no such file or directory "
                        f"({os.path.abspath(source)})")
    try:
        if backend == pb.DataParameter.LMDB:
            return LmdbReader(source)
        return read_pair(*_idx_paths(data_param))
    except DataError as exc:
        raise DataError(f"{where}: {exc}") from None


def detect_backend(source, where):
    """The backend of a source whose DataParameter does not name one."""
    if is_reference(source):
        return pb.DataParameter.IDX
    if not os.path.exists(source):
        raise DataError(f"{where}: data_param.source '{source}': no such file or directory "
                        f"({os.path.abspath(source)})")
    if os.path.isdir(source):
        if os.path.exists(os.path.join(source, "data.mdb")):
            return pb.DataParameter.LMDB
        if os.path.exists(os.path.join(source, "CURRENT")):
            raise DataError(f"{where}: data_param.source '{source}' looks like a LevelDB database; "
                            f"{LEVELDB_MESSAGE}")
        raise DataError(f"{where}: data_param.source '{source}' is a directory but not an LMDB "
                        "database (no data.mdb in it)")
    try:
        with open_idx_stream(source) as stream:
            kind, _ = read_header(stream, source)
    except (DataError, OSError, EOFError):
        raise DataError(f"{where}: data_param.source '{source}' is neither an LMDB directory, an IDX "
                        "images file nor a dataset reference like 'fashion-mnist:train'") from None
    if kind != "images":
        raise DataError(f"{where}: data_param.source '{source}' is an IDX {kind} file; name the images "
                        "file there (and the labels in data_param.label_source)")
    return pb.DataParameter.IDX


def _idx_paths(data_param):
    source = data_param.source
    if is_reference(source):
        images, labels = resolve_reference(source)
    else:
        images, labels = source, None
    if data_param.label_source:
        labels = data_param.label_source
    return images, labels or _derived_labels_path(images)


def _derived_labels_path(images_path):
    directory, name = os.path.split(images_path)
    if "images-idx3" not in name:
        raise DataError(f"cannot tell the labels file of '{images_path}' (its name has no "
                        "'images-idx3' to replace by 'labels-idx1'); set data_param.label_source")
    return os.path.join(directory, name.replace("images-idx3", "labels-idx1"))
