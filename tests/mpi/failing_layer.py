"""A Python layer for the failure tests: on one rank, at one forward, it raises or stops answering.

param_str: "<rank> <forward number> raise|hang"
"""
import os
import time

import minicaffe as caffe
from minicaffe.errors import DataError


class FailOnRank(caffe.Layer):
    def setup(self, bottom, top):
        rank, at, how = self.param_str.split()
        self.fail_rank, self.fail_at, self.how = int(rank), int(at), how
        self.forwards = 0

    def reshape(self, bottom, top):
        top[0].reshape(bottom[0].data.shape)

    def forward(self, bottom, top):
        self.forwards += 1
        if self.forwards == self.fail_at and int(os.environ.get("PMI_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", 0))) == self.fail_rank:
            if self.how == "hang":
                time.sleep(600)
            raise DataError("shard file /data/part-1.idx: no such file")
        top[0].data[...] = bottom[0].data

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            bottom[0].diff[...] = top[0].diff
