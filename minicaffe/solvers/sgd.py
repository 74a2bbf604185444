"""Stochastic gradient descent with momentum (Caffe's SGDSolver)."""
import numpy as np

from .base import Solver, register_solver


@register_solver("SGD")
class SGDSolver(Solver):
    def compute_update_value(self, i, blob, rate):
        """history = lr * lr_mult * grad + momentum * history; the step applied is history."""
        local_rate = np.float32(rate * self.net.params_lr[i])
        history = self.history[i]
        history *= np.float32(self.param.momentum)
        history += local_rate * blob.diff
        blob.diff[...] = history
