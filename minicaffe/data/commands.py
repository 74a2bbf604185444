"""The data commands: ``convert_mnist`` (Caffe's convert_mnist_data) and ``get_data``.

Each ``*_main(argv)`` takes the arguments after the command name and returns an exit status; a user
error prints one line, ``<command>: <message>``, to stderr.
"""
import argparse
import os
import shutil
import sys

from ..errors import MinicaffeError
from ..log import get_logger
from .datasets import DATASETS, find
from .idx import read_pair
from .lmdb_db import LmdbWriter, array_to_datum


class _UsageError(MinicaffeError):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise _UsageError(f"{message} (see --help)")


def convert_mnist_main(argv=None):
    parser = _Parser(prog="convert_mnist", description=(
        "Converts an MNIST-format IDX image file and its label file into an LMDB database of Datum "
        "records keyed by the 8-digit item index, as Caffe's convert_mnist_data does."))
    parser.add_argument("images", metavar="IMAGES", help="IDX images file (gzip or raw)")
    parser.add_argument("labels", metavar="LABELS", help="IDX labels file (gzip or raw)")
    parser.add_argument("output_db", metavar="OUTPUT_DB", help="the database directory to create")
    parser.add_argument("--backend", "-backend", default="lmdb", help="db backend; only lmdb is supported")
    return _run(parser, argv, _convert_mnist)


def get_data_main(argv=None):
    parser = _Parser(prog="get_data", description=(
        "Finds a dataset ($MINICAFFE_DATA, the user cache, the system's dataset packages), downloads "
        "it into the user cache if it is not there, and prints the directory that holds it."))
    parser.add_argument("dataset", choices=sorted(DATASETS))
    parser.add_argument("--no-download", action="store_true", help="only look, never download")
    return _run(parser, argv, _get_data)


def _run(parser, argv, command):
    try:
        command(parser.parse_args(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:  # --help
        return exc.code
    except MinicaffeError as exc:
        print(f"{parser.prog}: {exc}", file=sys.stderr)
        return 1
    return 0


def _convert_mnist(args):
    if args.backend.lower() == "leveldb":
        raise _UsageError("--backend=leveldb is not supported, use lmdb (the default)")
    if args.backend.lower() != "lmdb":
        raise _UsageError(f"unknown --backend={args.backend}; use lmdb")
    if os.path.lexists(args.output_db):
        raise _UsageError(f"{args.output_db} already exists; remove it or choose another OUTPUT_DB")
    dataset = read_pair(args.images, args.labels)
    _, rows, cols = dataset.item_shape
    log = get_logger()
    log.info(f"A total of {dataset.count} items.")
    log.info(f"Rows: {rows} Cols: {cols}")
    # Built under a temporary name and renamed when complete, so a failure leaves no half database.
    partial = f"{args.output_db.rstrip(os.sep)}.partial-{os.getpid()}"
    try:
        with LmdbWriter(partial) as writer:
            for index in range(dataset.count):
                datum = array_to_datum(dataset.images[index], dataset.labels[index])
                writer.put_datum(b"%08d" % index, datum)
        os.rename(partial, args.output_db)
    finally:
        if os.path.exists(partial):
            shutil.rmtree(partial)
    log.info(f"Processed {dataset.count} files.")


def _get_data(args):
    print(find(args.dataset, download=not args.no_download, progress=sys.stderr))
