"""Stochastic gradient descent with momentum (Caffe's SGDSolver)."""
import numpy as np

from ..kernels.parallel import num_threads
from ..kernels.solver_update import sgd_step
from .base import Solver, register_solver


@register_solver("SGD")
class SGDSolver(Solver):
    def _update_param(self, i, rate):
        """The base class's normalize, regularize, update and apply, fused into one pass over the blob.

        The values are the same bit for bit (see minicaffe/kernels/solver_update.pyx).
        """
        blob = self.net.learnable_params[i]
        history = self.history[i]
        if history.dtype != blob.dtype:
            # History is float32 even for a float64 net; the NumPy steps handle the mixed types.
            super()._update_param(i, rate)
            return
        decay, kind = self.local_decay(i)
        sgd_step(blob.data.reshape(-1), blob.diff.reshape(-1), history.reshape(-1),
                 np.float32(1.0 / self.param.iter_size), kind, decay, np.float32(self.param.momentum),
                 self._local_rate(i, rate), num_threads())

    def compute_update_value(self, i, blob, rate):
        """history = lr * lr_mult * grad + momentum * history; the step applied is history."""
        history = self.history[i]
        history *= np.float32(self.param.momentum)
        history += self._local_rate(i, rate) * blob.diff
        blob.diff[...] = history

    def _local_rate(self, i, rate):
        return np.float32(rate * self.net.params_lr[i])
