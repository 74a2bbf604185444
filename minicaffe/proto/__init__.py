"""The schema (minicaffe.proto) and its generated module: `from minicaffe.proto import minicaffe_pb2`."""
