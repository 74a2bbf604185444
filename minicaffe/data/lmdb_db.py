"""LMDB databases of Caffe ``Datum`` records, as written by Caffe's convert tools.

A database is a directory holding ``data.mdb`` and ``lock.mdb``; each value is a serialized Datum
(channels, height, width, then the pixels as uint8 ``data`` or as ``float_data``, and the label).
The reader lists the keys once when it opens, so records can be read by index in any order.
"""
import os
import threading
import weakref

import lmdb
import numpy as np
from google.protobuf.message import DecodeError

from ..errors import DataError
from ..proto import minicaffe_pb2 as pb

# Writes are grouped into transactions of this many records, as Caffe's converters do.
_RECORDS_PER_COMMIT = 1000
_INITIAL_MAP_SIZE = 64 << 20


def array_to_datum(image, label):
    """A Datum holding a uint8 [C,H,W] image as ``data`` or a float one as ``float_data``."""
    channels, height, width = image.shape
    datum = pb.Datum(channels=channels, height=height, width=width, label=int(label))
    if image.dtype == np.uint8:
        datum.data = image.tobytes()
    else:
        datum.float_data.extend(image.astype(np.float32).ravel().tolist())
    return datum


def datum_to_array(datum, where="datum"):
    """The pixels of a Datum as uint8 or float32 [C,H,W]."""
    if datum.encoded:
        raise DataError(f"{where}: encoded images (JPEG/PNG Datum) are not supported yet; "
                        "store raw pixels (convert_imageset without --encoded)")
    shape = (datum.channels, datum.height, datum.width)
    size = datum.channels * datum.height * datum.width
    if datum.data:
        pixels = np.frombuffer(datum.data, dtype=np.uint8)
    else:
        pixels = np.asarray(datum.float_data, dtype=np.float32)
    if pixels.size != size or size == 0:
        raise DataError(f"{where}: holds {pixels.size} values, its shape {shape} needs {size}")
    return pixels.reshape(shape)


class LmdbWriter:
    """Writes key/value records to a new LMDB directory, growing the map as it fills."""

    def __init__(self, path):
        self.path = os.fspath(path)
        try:
            self._env = lmdb.open(self.path, map_size=_INITIAL_MAP_SIZE, subdir=True, create=True)
        except lmdb.Error as exc:
            raise DataError(f"{self.path}: cannot create the LMDB database: {exc}") from None
        self._pending = []

    def put(self, key, value):
        self._pending.append((key, value))
        if len(self._pending) >= _RECORDS_PER_COMMIT:
            self.commit()

    def put_datum(self, key, datum):
        self.put(key, datum.SerializeToString())

    def commit(self):
        while True:
            try:
                with self._env.begin(write=True) as txn:
                    for key, value in self._pending:
                        txn.put(key, value)
                break
            except lmdb.MapFullError:
                # The aborted transaction wrote nothing, so the same batch can be retried.
                self._env.set_mapsize(self._env.info()["map_size"] * 2)
        self._pending.clear()

    def close(self):
        if self._env is not None:
            self.commit()
            self._env.close()
            self._env = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self._env.close()
            self._env = None


# lmdb refuses to open one database twice in a process, yet a train and a test net may both read it:
# readers of the same files share one environment, closed when the last of them closes or is
# collected. The lock makes "last reader gone, close" and "new reader, open" never interleave.
_shared_envs = {}  # (st_dev, st_ino) of data.mdb -> [environment, number of readers]
_shared_envs_lock = threading.RLock()


def _acquire_env(path):
    stat = os.stat(os.path.join(path, "data.mdb"))
    key = (stat.st_dev, stat.st_ino)
    with _shared_envs_lock:
        entry = _shared_envs.get(key)
        if entry is None:
            env = lmdb.open(path, readonly=True, lock=False, readahead=False, subdir=True)
            entry = _shared_envs[key] = [env, 0]
        entry[1] += 1
        return key, entry[0]


def _release_env(key):
    with _shared_envs_lock:
        entry = _shared_envs[key]
        entry[1] -= 1
        if entry[1] == 0:
            del _shared_envs[key]
            entry[0].close()


class LmdbReader:
    """Random access to the Datum records of an LMDB database, in key order.

    ``gather`` is the data layer's interface (shared with ``IdxDataset``): it fills preallocated
    image and label arrays with the records at the given indices.
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        if not os.path.isdir(self.path):
            what = "no such directory" if not os.path.exists(self.path) else "not a directory"
            raise DataError(f"{self.path}: {what}; an LMDB database is a directory holding data.mdb")
        if not os.path.exists(os.path.join(self.path, "data.mdb")):
            raise DataError(f"{self.path}: not an LMDB database (no data.mdb in it)")
        try:
            key, self._env = _acquire_env(self.path)
            self._release = weakref.finalize(self, _release_env, key)
            with self._env.begin() as txn:
                self.keys = list(txn.cursor().iternext(keys=True, values=False))
        except lmdb.Error as exc:
            raise DataError(f"{self.path}: cannot read the LMDB database: {exc}") from None
        if not self.keys:
            raise DataError(f"{self.path}: the LMDB database holds no records")
        first, _ = self.read(0)
        self.item_shape = first.shape
        self.dtype = first.dtype

    @property
    def count(self):
        return len(self.keys)

    def close(self):
        """Lets go of the database (also done when the reader is collected); safe to call twice."""
        self._release()

    def read(self, index):
        """Record ``index`` (in key order) as (pixels [C,H,W], label)."""
        with self._env.begin() as txn:
            return self._decode(txn, index)

    def gather(self, indices, images_out, labels_out):
        with self._env.begin() as txn:
            for slot, index in enumerate(indices):
                pixels, label = self._decode(txn, index)
                if pixels.shape != self.item_shape or pixels.dtype != self.dtype:
                    raise DataError(f"{self.path}: record {self.keys[index]!r} is {pixels.dtype} "
                                    f"{pixels.shape}, the first record is {self.dtype} {self.item_shape}; "
                                    "all records must have the same shape and type")
                images_out[slot] = pixels
                labels_out[slot] = label

    def _decode(self, txn, index):
        key = self.keys[index]
        value = txn.get(key)
        where = f"{self.path}: record {key!r}"
        if value is None:
            raise DataError(f"{where}: disappeared while the database was open")
        datum = pb.Datum()
        try:
            datum.ParseFromString(value)
        except DecodeError:
            raise DataError(f"{where}: not a serialized Datum") from None
        return datum_to_array(datum, where), datum.label

