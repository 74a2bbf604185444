"""Glog-style log lines, as Caffe prints them, so existing Caffe log parsers keep working.

    I1121 19:50:00.123456  4242 solver.py:121] Iteration 100 (45.1 iter/s, 2.21s/100 iters), loss = 0.31

Lines go to stderr. While a progress bar is shown (stderr is a terminal), lines are written above it.
Under mpiexec only rank 0 logs information; the other ranks report warnings and errors only.
"""
import logging
import os
import sys
import time

LOGGER_NAME = "minicaffe"
_LEVEL_LETTER = {logging.DEBUG: "I", logging.INFO: "I", logging.WARNING: "W", logging.ERROR: "E",
                 logging.CRITICAL: "F"}


class GlogFormatter(logging.Formatter):
    def format(self, record):
        t = record.created
        stamp = time.strftime("%m%d %H:%M:%S", time.localtime(t)) + f".{int((t % 1) * 1e6):06d}"
        letter = _LEVEL_LETTER.get(record.levelno, "I")
        where = f"{os.path.basename(record.pathname)}:{record.lineno}"
        return f"{letter}{stamp} {record.process:5d} {where}] {record.getMessage()}"


class _ProgressAwareHandler(logging.StreamHandler):
    """Writes through tqdm while a bar is active so the bar is redrawn below the line."""

    bar = None

    def emit(self, record):
        # Follow sys.stderr as it is now (pytest and callers may replace it).
        self.stream = sys.stderr
        if self.bar is None:
            return super().emit(record)
        from tqdm import tqdm
        tqdm.write(self.format(record), file=self.stream)


_handler = None


def get_logger():
    global _handler
    logger = logging.getLogger(LOGGER_NAME)
    if _handler is None:
        _handler = _ProgressAwareHandler(sys.stderr)
        _handler.setFormatter(GlogFormatter())
        logger.addHandler(_handler)
        logger.setLevel(logging.INFO if _is_rank_zero() else logging.WARNING)
        logger.propagate = False
    return logger


def _is_rank_zero():
    from .comm.environment import launched_rank
    return launched_rank() == 0


def progress_bar(total, initial=0, desc="train"):
    """A tqdm bar on stderr when stderr is a terminal (rank 0 only); otherwise None (logs stay clean)."""
    if not sys.stderr.isatty() or not _is_rank_zero():
        return None
    from tqdm import tqdm
    get_logger()
    bar = tqdm(total=total, initial=initial, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)
    _handler.bar = bar
    return bar


def close_progress_bar(bar):
    if bar is not None:
        bar.close()
        _handler.bar = None


def fmt(x):
    """Formats a number as C++ streams do by default (6 significant digits), as in Caffe's logs."""
    return f"{x:.6g}"


def output_line(name, value, loss_weight):
    """``name = value``, with Caffe's ``(* weight = weighted loss)`` suffix for loss outputs."""
    suffix = f" (* {fmt(loss_weight)} = {fmt(loss_weight * value)} loss)" if loss_weight else ""
    return f"{name} = {fmt(value)}{suffix}"
