"""HDF5Data: batches of rows from HDF5 files, as Caffe's HDF5DataLayer (read with h5py).

``hdf5_data_param.source`` is a text file listing .h5 files (whitespace-separated, as Caffe reads
it; a relative path is looked up from the working directory, then beside the list). Each top reads
the dataset of its name ("data", "label", ...) from every file: batches are [batch_size, *row shape],
as float. Within a file all of a layer's datasets must have the same number of rows, and each
dataset must have the same row shape in every file.

The rows are visited file after file, in list order. With ``shuffle`` each epoch visits the files
in a new order and each file's rows in a new order, as Caffe reshuffles files and rows whenever it
wraps around; here the orders are drawn from (seed, epoch), so that batch b is a pure function of
(seed, b) and ``set_position``/``set_shard`` work as for the Data layer. As in Caffe a file is read
whole when a batch first needs it; the two most recent files are kept in memory.
"""
import os

import numpy as np

from ..data import read_list_file
from ..data.prefetch import RecordSchedule
from ..errors import DataError
from ..hdf5_io import import_h5py
from ..layer import register
from .data import DataLayer

# Seeds the file-and-row orders apart from the other random streams derived from a layer's seed.
_FILE_ROW_ORDER = 3
_FILES_KEPT_IN_MEMORY = 2


@register("HDF5Data")
class HDF5DataLayer(DataLayer):
    """Tops named like the datasets they read; each [batch_size, *row shape of that dataset]."""

    min_top = 1
    max_top = None

    def _open_source(self, top):
        param = self.param.hdf5_data_param
        if self.param.HasField("transform_param"):
            raise self.error("HDF5Data does not transform data; remove transform_param")
        if param.batch_size == 0:
            raise self.error("hdf5_data_param.batch_size must be a positive number")
        if len(self.param.top) != len(top):
            raise self.error(f"has {len(top)} tops but names {len(self.param.top)}; each top names the "
                             "dataset it reads")
        self.batch_size = param.batch_size
        return HDF5Files(param.source, list(self.param.top), where=f"layer '{self.name}' ({self.type_name})")

    def reshape(self, bottom, top):
        for blob, row_shape in zip(top, self.source.row_shapes):
            blob.reshape((self.batch_size,) + row_shape)

    def forward(self, bottom, top):
        self._prefetcher.fetch_into(tuple(blob.data for blob in top))

    def _new_schedule(self, rank, num_ranks):
        return FileRowSchedule(self.source.rows_per_file, self.batch_size, self.seed,
                               shuffle=self.param.hdf5_data_param.shuffle, rank=rank, num_ranks=num_ranks)

    def _new_buffer(self):
        return tuple(np.empty((self.batch_size,) + row_shape, np.float32)
                     for row_shape in self.source.row_shapes)

    def _load_batch(self, batch_index, buffer):
        self.source.gather(self._schedule.records(batch_index), buffer)


class FileRowSchedule(RecordSchedule):
    """A RecordSchedule over the rows of all files, numbered file after file in list order, whose
    shuffled epochs permute the files and, within each file, its rows."""

    def __init__(self, rows_per_file, batch_size, seed, shuffle, rank, num_ranks):
        super().__init__(int(rows_per_file.sum()), batch_size, seed, shuffle=shuffle, rank=rank,
                         num_ranks=num_ranks)
        self.rows_per_file = rows_per_file
        self.file_starts = np.cumsum(rows_per_file) - rows_per_file
        self._file_row_orders = {}

    def epoch_order(self, epoch):
        order = self._file_row_orders.get(epoch)
        if order is None:
            generator = np.random.default_rng([self.seed, _FILE_ROW_ORDER, epoch])
            order = np.concatenate([self.file_starts[f] + generator.permutation(self.rows_per_file[f])
                                    for f in generator.permutation(len(self.rows_per_file))])
            # A batch usually spans at most two epochs; one that spans more recomputes the orders.
            self._file_row_orders = {e: o for e, o in self._file_row_orders.items() if e == epoch - 1}
            self._file_row_orders[epoch] = order
        return order


class HDF5Files:
    """The files of a list and the row counts and row shapes of their datasets, checked on opening."""

    def __init__(self, list_path, dataset_names, where):
        self.where = where
        self.h5py = import_h5py(f"{where}: reading HDF5 files")
        self.dataset_names = dataset_names
        self.paths = read_file_list(list_path, where)
        self.row_shapes = None
        self.rows_per_file = np.array([self._check_file(path) for path in self.paths], dtype=np.int64)
        if self.rows_per_file.sum() == 0:
            raise DataError(f"{where}: the files listed in hdf5_data_param.source '{list_path}' hold no rows")
        self.file_starts = np.cumsum(self.rows_per_file) - self.rows_per_file
        self._loaded = {}

    def gather(self, records, outputs):
        """Writes the rows numbered ``records`` (over all files, in list order) into ``outputs``."""
        # side="right" skips files with no rows, whose start equals the next file's.
        files = np.searchsorted(self.file_starts, records, side="right") - 1
        for file_index in np.unique(files):
            in_file = files == file_index
            rows = records[in_file] - self.file_starts[file_index]
            for output, dataset in zip(outputs, self._datasets(file_index)):
                output[in_file] = dataset[rows]

    def _datasets(self, file_index):
        datasets = self._loaded.get(file_index)
        if datasets is None:
            with self._open(self.paths[file_index]) as hdf5_file:
                datasets = [np.asarray(hdf5_file[name][()], dtype=np.float32) for name in self.dataset_names]
            if len(self._loaded) >= _FILES_KEPT_IN_MEMORY:
                del self._loaded[next(iter(self._loaded))]
            self._loaded[file_index] = datasets
        return datasets

    def _check_file(self, path):
        """The file's row count; checks its datasets against the layer's tops and the first file."""
        h5py = self.h5py
        with self._open(path) as hdf5_file:
            shapes = []
            for name in self.dataset_names:
                dataset = hdf5_file.get(name)
                if not isinstance(dataset, h5py.Dataset):
                    present = ", ".join(sorted(hdf5_file)) or "none"
                    raise DataError(f"{self.where}: {path}: has no dataset '{name}' for the top of that name "
                                    f"(its datasets: {present})")
                if dataset.ndim == 0 or dataset.dtype.kind not in "fiub":
                    raise DataError(f"{self.where}: {path}: dataset '{name}' must be an array of numbers "
                                    f"with rows along its first axis, it is {dataset.dtype} {dataset.shape}")
                shapes.append(dataset.shape)
        if len({shape[0] for shape in shapes}) > 1:
            counts = ", ".join(f"'{name}' {shape[0]}" for name, shape in zip(self.dataset_names, shapes))
            raise DataError(f"{self.where}: {path}: the datasets have different numbers of rows ({counts}); "
                            "they must have the same first dimension")
        row_shapes = [shape[1:] for shape in shapes]
        if self.row_shapes is None:
            self.row_shapes, self._first_path = row_shapes, path
        for name, mine, first in zip(self.dataset_names, row_shapes, self.row_shapes):
            if mine != first:
                raise DataError(f"{self.where}: {path}: dataset '{name}' has rows of shape {mine}, but "
                                f"{first} in {self._first_path}")
        return shapes[0][0]

    def _open(self, path):
        try:
            return self.h5py.File(path, "r")
        except FileNotFoundError:
            raise DataError(f"{self.where}: HDF5 file '{path}': no such file") from None
        except OSError as exc:
            reason = (str(exc) or type(exc).__name__).splitlines()[0]
            raise DataError(f"{self.where}: HDF5 file '{path}': cannot read it ({reason})") from None


def read_file_list(list_path, where):
    """The files a list names (whitespace-separated tokens, as Caffe reads them)."""
    names = read_list_file(list_path, where, "hdf5_data_param.source",
                           "listing .h5 files, not an .h5 file").split()
    if not names:
        raise DataError(f"{where}: hdf5_data_param.source '{list_path}' lists no HDF5 files")
    beside_list = os.path.dirname(os.path.abspath(list_path))
    return [_resolved(name, beside_list) for name in names]


def _resolved(name, beside_list):
    """Caffe opens a relative path from the working directory; failing that, this tries beside the list."""
    candidate = os.path.join(beside_list, name)
    if not os.path.isabs(name) and not os.path.exists(name) and os.path.exists(candidate):
        return candidate
    return name
