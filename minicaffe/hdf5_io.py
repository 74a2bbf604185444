"""Caffe's HDF5 weights and solver-state files, read and written with h5py (``pip install h5py``).

Weights, as Caffe's ``Net::ToHDF5`` writes them (``*.caffemodel.h5``): group ``data`` holds one group
per layer of the net, named like the layer and in net order (Split layers included, as Caffe's nets
have them). A layer's group holds its parameter blobs as float32 datasets ``0``, ``1``, ... of the
blobs' shapes; a parameter shared with an earlier layer (ParamSpec ``name``) is written only by its
owner. With ``write_diff`` a group ``diff`` holds the gradients in the same layout, shared ones too.
A layer name with '/' (GoogLeNet's ``inception_3a/1x1``) becomes nested groups, which this module
reads back; Caffe itself cannot write such names. Diffs are not read back, as in Caffe.

Solver states, as Caffe's ``SGDSolver::SnapshotSolverStateToHDF5`` writes them
(``*.solverstate.h5``): scalar int32 datasets ``iter`` and ``current_step``, the string
``learned_net`` (the weights file written with the state), and group ``history`` with one float32
dataset per learnable parameter, ``0``, ``1``, ... In Python a state is a dict with those four keys.

Files are written to a temporary file beside the target and renamed over it, so a crash never
leaves a half-written snapshot.
"""
import contextlib
import os
import secrets

import numpy as np

from .errors import MinicaffeError

# An HDF5 file starts with this signature, at byte 0 or, after a user block, at 512 * 2**k.
_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_SIGNATURE_OFFSETS = [0] + [512 << k for k in range(12)]


def import_h5py(what):
    """The h5py module; a one-line MinicaffeError saying how to install it when it is missing."""
    try:
        import h5py
    except ImportError:
        raise MinicaffeError(f"{what} needs h5py, which is not installed: pip install h5py") from None
    return h5py


def is_hdf5_file(path):
    """True when ``path`` is an HDF5 file (Caffe's H5Fis_hdf5 test); False when missing or other."""
    try:
        with open(path, "rb") as stream:
            for offset in _SIGNATURE_OFFSETS:
                stream.seek(offset)
                if stream.read(len(_SIGNATURE)) == _SIGNATURE:
                    return True
    except OSError:
        return False
    return False


# -- weights ---------------------------------------------------------------------------------------
def save_net_hdf5(net, path, write_diff=False):
    """Writes ``net``'s parameters to ``path`` in Caffe's HDF5 weights layout, atomically."""
    h5py = import_h5py(f"{os.fspath(path)}: writing HDF5 weights")
    owned = {id(blob) for blob in net.learnable_params}
    with _written_atomically(h5py, path) as hdf5_file:
        data_group = hdf5_file.create_group("data")
        diff_group = hdf5_file.create_group("diff") if write_diff else None
        for name, layer in zip(net.layer_names, net.layers):
            layer_data = data_group.create_group(name)
            layer_diff = diff_group.create_group(name) if write_diff else None
            for j, blob in enumerate(layer.blobs):
                if id(blob) in owned:
                    layer_data.create_dataset(str(j), data=blob.data, dtype=np.float32)
                if write_diff:
                    layer_diff.create_dataset(str(j), data=blob.diff, dtype=np.float32)


def load_net_hdf5(net, path, require_all=False):
    """Loads parameters from a Caffe HDF5 weights file, matching layers by name.

    Layers of the file that the net lacks are ignored and layers of the net that the file lacks keep
    their values, as in Caffe; with ``require_all`` (resuming) the latter is an error instead.
    """
    path = os.fspath(path)
    h5py = import_h5py(f"{path}: reading HDF5 weights")
    owned = {id(blob) for blob in net.learnable_params}
    missing = []
    with _opened(h5py, path, "weights") as hdf5_file:
        data_group = hdf5_file.get("data")
        if not isinstance(data_group, h5py.Group):
            raise MinicaffeError(f"{path}: not a Caffe HDF5 weights file (it has no group 'data')")
        for name, layer in zip(net.layer_names, net.layers):
            if not layer.blobs:
                continue
            layer_group = data_group.get(name)
            if not isinstance(layer_group, h5py.Group):
                if any(id(blob) in owned for blob in layer.blobs):
                    missing.append(name)
                continue
            datasets = {key: item for key, item in layer_group.items() if isinstance(item, h5py.Dataset)}
            mismatch = MinicaffeError(f"{path}: layer '{name}' has {len(datasets)} blobs in the file but "
                                      f"{len(layer.blobs)} in the net")
            if len(datasets) > len(layer.blobs):
                raise mismatch
            for j, blob in enumerate(layer.blobs):
                dataset = datasets.get(str(j))
                if dataset is None:
                    # Only the owner of a shared parameter is in the file.
                    if id(blob) in owned:
                        raise mismatch
                    continue
                _read_dataset(dataset, blob.data, f"{path}: layer '{name}' blob {j}")
    if require_all and missing:
        raise MinicaffeError(f"{path}: has no weights for layer(s) {', '.join(missing)}")


# -- solver state ----------------------------------------------------------------------------------
def save_solver_state_hdf5(state, path):
    """Writes a solver state dict (iter, learned_net, current_step, history) in Caffe's layout."""
    h5py = import_h5py(f"{os.fspath(path)}: writing an HDF5 solver state")
    with _written_atomically(h5py, path) as hdf5_file:
        hdf5_file.create_dataset("iter", data=np.int32(state["iter"]))
        _write_string(h5py, hdf5_file, "learned_net", state.get("learned_net", ""))
        hdf5_file.create_dataset("current_step", data=np.int32(state.get("current_step", 0)))
        history = hdf5_file.create_group("history")
        for i, values in enumerate(state["history"]):
            history.create_dataset(str(i), data=values, dtype=np.float32)


def load_solver_state_hdf5(path):
    """Reads a Caffe HDF5 solver state into a dict: iter, learned_net ('' when absent), current_step
    (0 when absent, as in old files) and history (a list of float32 arrays)."""
    path = os.fspath(path)
    h5py = import_h5py(f"{path}: reading an HDF5 solver state")
    with _opened(h5py, path, "solver state") as hdf5_file:
        iteration = hdf5_file.get("iter")
        history = hdf5_file.get("history")
        if not isinstance(iteration, h5py.Dataset) or not isinstance(history, h5py.Group):
            raise MinicaffeError(f"{path}: not a Caffe HDF5 solver state (it needs dataset 'iter' and "
                                 "group 'history')")
        names = sorted(history, key=lambda key: (len(key), key))
        if names != [str(i) for i in range(len(names))]:
            raise MinicaffeError(f"{path}: group 'history' must hold datasets 0, 1, ..., got "
                                 f"{', '.join(names)}")
        learned_net = hdf5_file.get("learned_net")
        current_step = hdf5_file.get("current_step")
        return {
            "iter": int(iteration[()]),
            "learned_net": _string_value(learned_net[()]) if learned_net is not None else "",
            "current_step": int(current_step[()]) if current_step is not None else 0,
            "history": [np.asarray(history[name][()], dtype=np.float32) for name in names],
        }


# -- helpers ---------------------------------------------------------------------------------------
def _read_dataset(dataset, target, what):
    if dataset.dtype.kind not in "fiu":
        raise MinicaffeError(f"{what}: holds {dataset.dtype} values, not numbers")
    if tuple(dataset.shape) != target.shape:
        raise MinicaffeError(f"{what}: shape mismatch, the file has {tuple(dataset.shape)} and the net "
                             f"has {target.shape}")
    target[...] = dataset[()]


def _write_string(h5py, group, name, text):
    """A scalar fixed-length, NUL-terminated string dataset, as HDF5's H5LTmake_dataset_string."""
    encoded = text.encode("utf-8")
    string_type = h5py.h5t.C_S1.copy()
    string_type.set_size(len(encoded) + 1)
    string_type.set_strpad(h5py.h5t.STR_NULLTERM)
    dataset = h5py.h5d.create(group.id, name.encode(), string_type, h5py.h5s.create(h5py.h5s.SCALAR))
    dataset.write(h5py.h5s.ALL, h5py.h5s.ALL, np.array(encoded, dtype=f"S{len(encoded) + 1}"))


def _string_value(value):
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


@contextlib.contextmanager
def _opened(h5py, path, what):
    if not os.path.exists(path):
        raise MinicaffeError(f"{path}: no such file")
    try:
        hdf5_file = h5py.File(path, "r")
    except OSError as exc:
        raise MinicaffeError(f"{path}: cannot read it as an HDF5 {what} ({_one_line(exc)})") from None
    with hdf5_file:
        yield hdf5_file


@contextlib.contextmanager
def _written_atomically(h5py, path):
    """An h5py file open for writing whose content replaces ``path`` only when the block succeeds."""
    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    temporary = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with h5py.File(temporary, "x") as hdf5_file:
            yield hdf5_file
        with open(temporary, "rb+") as stream:
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        if isinstance(exc, OSError):
            raise MinicaffeError(f"{path}: cannot write ({_one_line(exc)})") from None
        raise


def _one_line(exc):
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return text.splitlines()[0]
