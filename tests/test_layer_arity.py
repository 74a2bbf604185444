"""Every registered layer type rejects a wrong number of bottoms or tops with a one-line error naming it."""
import pytest

from minicaffe.blob import Blob
from minicaffe.errors import LayerError
from minicaffe.layer import layer_class, layer_type_list
from minicaffe.proto import minicaffe_pb2 as pb


def wrong_count(exact, low, high):
    """A count the declared arity refuses, or None when every count is allowed."""
    if exact is not None:
        return exact + 1
    if high is not None:
        return high + 1
    if low is not None and low > 0:
        return low - 1
    return None


CASES = []
for type_name in layer_type_list():
    cls = layer_class(type_name)
    bottoms = wrong_count(cls.exact_num_bottom, cls.min_bottom, cls.max_bottom)
    tops = wrong_count(cls.exact_num_top, cls.min_top, cls.max_top)
    if bottoms is not None:
        CASES.append((type_name, bottoms, 1 if cls.exact_num_top is None else cls.exact_num_top))
    elif tops is not None:
        CASES.append((type_name, 1 if cls.exact_num_bottom is None else cls.exact_num_bottom, tops))


def test_most_layer_types_declare_their_arity():
    assert len(CASES) >= len(layer_type_list()) - 2, sorted(set(layer_type_list()) - {c[0] for c in CASES})


@pytest.mark.parametrize("type_name,num_bottoms,num_tops", CASES)
def test_wrong_blob_counts_name_the_layer(type_name, num_bottoms, num_tops):
    param = pb.LayerParameter(name="the_layer", type=type_name)
    layer = layer_class(type_name)(param, pb.TRAIN)
    bottoms = [Blob((2, 3, 4, 4), name=f"b{i}") for i in range(num_bottoms)]
    tops = [Blob(name=f"t{i}") for i in range(num_tops)]
    with pytest.raises(LayerError, match=rf"layer 'the_layer' \({type_name}\): takes (exactly|at least|at most) "
                                         rf"\d+ (bottom|top) blob\(s\), got \d+"):
        layer.layer_setup(bottoms, tops)
