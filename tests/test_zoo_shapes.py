"""GoogLeNet and ResNet-50 blob shapes against tables written from the papers' architecture tables.

Szegedy et al. 2015, Table 1 (GoogLeNet) and He et al. 2016, Table 1 (ResNet-50, with the layer names
of Kaiming He's ResNet-50-deploy.prototxt). Shapes are (channels, height, width) after the batch N;
every blob of the net must appear in its table, so a missing or extra layer fails too.
"""
from conftest import REPO
from minicaffe import Net, TEST, TRAIN, prototxt

N = 2

GOOGLENET = {
    "data": (3, 224, 224),
    "label": (),
    "conv1/7x7_s2": (64, 112, 112),
    "pool1/3x3_s2": (64, 56, 56),
    "pool1/norm1": (64, 56, 56),
    "conv2/3x3_reduce": (64, 56, 56),
    "conv2/3x3": (192, 56, 56),
    "conv2/norm2": (192, 56, 56),
    "pool2/3x3_s2": (192, 28, 28),
    "inception_3a/1x1": (64, 28, 28),
    "inception_3a/3x3_reduce": (96, 28, 28),
    "inception_3a/3x3": (128, 28, 28),
    "inception_3a/5x5_reduce": (16, 28, 28),
    "inception_3a/5x5": (32, 28, 28),
    "inception_3a/pool": (192, 28, 28),
    "inception_3a/pool_proj": (32, 28, 28),
    "inception_3a/output": (256, 28, 28),
    "inception_3b/1x1": (128, 28, 28),
    "inception_3b/3x3_reduce": (128, 28, 28),
    "inception_3b/3x3": (192, 28, 28),
    "inception_3b/5x5_reduce": (32, 28, 28),
    "inception_3b/5x5": (96, 28, 28),
    "inception_3b/pool": (256, 28, 28),
    "inception_3b/pool_proj": (64, 28, 28),
    "inception_3b/output": (480, 28, 28),
    "pool3/3x3_s2": (480, 14, 14),
    "inception_4a/1x1": (192, 14, 14),
    "inception_4a/3x3_reduce": (96, 14, 14),
    "inception_4a/3x3": (208, 14, 14),
    "inception_4a/5x5_reduce": (16, 14, 14),
    "inception_4a/5x5": (48, 14, 14),
    "inception_4a/pool": (480, 14, 14),
    "inception_4a/pool_proj": (64, 14, 14),
    "inception_4a/output": (512, 14, 14),
    "loss1/ave_pool": (512, 4, 4),
    "loss1/conv": (128, 4, 4),
    "loss1/fc": (1024,),
    "loss1/classifier": (1000,),
    "loss1/loss1": None,
    "inception_4b/1x1": (160, 14, 14),
    "inception_4b/3x3_reduce": (112, 14, 14),
    "inception_4b/3x3": (224, 14, 14),
    "inception_4b/5x5_reduce": (24, 14, 14),
    "inception_4b/5x5": (64, 14, 14),
    "inception_4b/pool": (512, 14, 14),
    "inception_4b/pool_proj": (64, 14, 14),
    "inception_4b/output": (512, 14, 14),
    "inception_4c/1x1": (128, 14, 14),
    "inception_4c/3x3_reduce": (128, 14, 14),
    "inception_4c/3x3": (256, 14, 14),
    "inception_4c/5x5_reduce": (24, 14, 14),
    "inception_4c/5x5": (64, 14, 14),
    "inception_4c/pool": (512, 14, 14),
    "inception_4c/pool_proj": (64, 14, 14),
    "inception_4c/output": (512, 14, 14),
    "inception_4d/1x1": (112, 14, 14),
    "inception_4d/3x3_reduce": (144, 14, 14),
    "inception_4d/3x3": (288, 14, 14),
    "inception_4d/5x5_reduce": (32, 14, 14),
    "inception_4d/5x5": (64, 14, 14),
    "inception_4d/pool": (512, 14, 14),
    "inception_4d/pool_proj": (64, 14, 14),
    "inception_4d/output": (528, 14, 14),
    "loss2/ave_pool": (528, 4, 4),
    "loss2/conv": (128, 4, 4),
    "loss2/fc": (1024,),
    "loss2/classifier": (1000,),
    "loss2/loss2": None,
    "inception_4e/1x1": (256, 14, 14),
    "inception_4e/3x3_reduce": (160, 14, 14),
    "inception_4e/3x3": (320, 14, 14),
    "inception_4e/5x5_reduce": (32, 14, 14),
    "inception_4e/5x5": (128, 14, 14),
    "inception_4e/pool": (528, 14, 14),
    "inception_4e/pool_proj": (128, 14, 14),
    "inception_4e/output": (832, 14, 14),
    "pool4/3x3_s2": (832, 7, 7),
    "inception_5a/1x1": (256, 7, 7),
    "inception_5a/3x3_reduce": (160, 7, 7),
    "inception_5a/3x3": (320, 7, 7),
    "inception_5a/5x5_reduce": (32, 7, 7),
    "inception_5a/5x5": (128, 7, 7),
    "inception_5a/pool": (832, 7, 7),
    "inception_5a/pool_proj": (128, 7, 7),
    "inception_5a/output": (832, 7, 7),
    "inception_5b/1x1": (384, 7, 7),
    "inception_5b/3x3_reduce": (192, 7, 7),
    "inception_5b/3x3": (384, 7, 7),
    "inception_5b/5x5_reduce": (48, 7, 7),
    "inception_5b/5x5": (128, 7, 7),
    "inception_5b/pool": (832, 7, 7),
    "inception_5b/pool_proj": (128, 7, 7),
    "inception_5b/output": (1024, 7, 7),
    "pool5/7x7_s1": (1024, 1, 1),
    "loss3/classifier": (1000,),
    "loss3/loss3": None,
}

RESNET50 = {
    "data": (3, 224, 224),
    "conv1": (64, 112, 112),
    "pool1": (64, 56, 56),
    "res2a_branch1": (256, 56, 56),
    "res2a_branch2a": (64, 56, 56),
    "res2a_branch2b": (64, 56, 56),
    "res2a_branch2c": (256, 56, 56),
    "res2a": (256, 56, 56),
    "res2b_branch2a": (64, 56, 56),
    "res2b_branch2b": (64, 56, 56),
    "res2b_branch2c": (256, 56, 56),
    "res2b": (256, 56, 56),
    "res2c_branch2a": (64, 56, 56),
    "res2c_branch2b": (64, 56, 56),
    "res2c_branch2c": (256, 56, 56),
    "res2c": (256, 56, 56),
    "res3a_branch1": (512, 28, 28),
    "res3a_branch2a": (128, 28, 28),
    "res3a_branch2b": (128, 28, 28),
    "res3a_branch2c": (512, 28, 28),
    "res3a": (512, 28, 28),
    "res3b_branch2a": (128, 28, 28),
    "res3b_branch2b": (128, 28, 28),
    "res3b_branch2c": (512, 28, 28),
    "res3b": (512, 28, 28),
    "res3c_branch2a": (128, 28, 28),
    "res3c_branch2b": (128, 28, 28),
    "res3c_branch2c": (512, 28, 28),
    "res3c": (512, 28, 28),
    "res3d_branch2a": (128, 28, 28),
    "res3d_branch2b": (128, 28, 28),
    "res3d_branch2c": (512, 28, 28),
    "res3d": (512, 28, 28),
    "res4a_branch1": (1024, 14, 14),
    "res4a_branch2a": (256, 14, 14),
    "res4a_branch2b": (256, 14, 14),
    "res4a_branch2c": (1024, 14, 14),
    "res4a": (1024, 14, 14),
    "res4b_branch2a": (256, 14, 14),
    "res4b_branch2b": (256, 14, 14),
    "res4b_branch2c": (1024, 14, 14),
    "res4b": (1024, 14, 14),
    "res4c_branch2a": (256, 14, 14),
    "res4c_branch2b": (256, 14, 14),
    "res4c_branch2c": (1024, 14, 14),
    "res4c": (1024, 14, 14),
    "res4d_branch2a": (256, 14, 14),
    "res4d_branch2b": (256, 14, 14),
    "res4d_branch2c": (1024, 14, 14),
    "res4d": (1024, 14, 14),
    "res4e_branch2a": (256, 14, 14),
    "res4e_branch2b": (256, 14, 14),
    "res4e_branch2c": (1024, 14, 14),
    "res4e": (1024, 14, 14),
    "res4f_branch2a": (256, 14, 14),
    "res4f_branch2b": (256, 14, 14),
    "res4f_branch2c": (1024, 14, 14),
    "res4f": (1024, 14, 14),
    "res5a_branch1": (2048, 7, 7),
    "res5a_branch2a": (512, 7, 7),
    "res5a_branch2b": (512, 7, 7),
    "res5a_branch2c": (2048, 7, 7),
    "res5a": (2048, 7, 7),
    "res5b_branch2a": (512, 7, 7),
    "res5b_branch2b": (512, 7, 7),
    "res5b_branch2c": (2048, 7, 7),
    "res5b": (2048, 7, 7),
    "res5c_branch2a": (512, 7, 7),
    "res5c_branch2b": (512, 7, 7),
    "res5c_branch2c": (2048, 7, 7),
    "res5c": (2048, 7, 7),
    "pool5": (2048, 1, 1),
    "fc1000": (1000,),
    "prob": (1000,),
}

# Parameter blobs as ResNet-50's public caffemodel stores them, so it loads by name.
RESNET50_PARAMS = {
    "conv1": [(64, 3, 7, 7)],
    "bn_conv1": [(64,), (64,), (1,)],
    "scale_conv1": [(64,), (64,)],
    "res2a_branch1": [(256, 64, 1, 1)],
    "bn2a_branch1": [(256,), (256,), (1,)],
    "scale2a_branch1": [(256,), (256,)],
    "res3a_branch2a": [(128, 256, 1, 1)],
    "res3a_branch2b": [(128, 128, 3, 3)],
    "res5c_branch2c": [(2048, 512, 1, 1)],
    "scale5c_branch2c": [(2048,), (2048,)],
    "fc1000": [(1000, 2048), (1000,)],
}


def net_at_batch(path, phase):
    param = prototxt.read_net_param(path)
    for layer in param.layer:
        for shape in [*layer.dummy_data_param.shape, *layer.input_param.shape]:
            shape.dim[0] = N
    return Net(param, phase=phase)


def check_blob_shapes(net, table):
    # Split layers' copies (named *_split_*) share their source's shape and are not architecture.
    blobs = {name: blob.shape for name, blob in net.blobs.items() if "_split_" not in name}
    assert sorted(blobs) == sorted(table)
    wrong = {name: (blobs[name], (N, *shape) if shape is not None else ())
             for name, shape in table.items() if blobs[name] != ((N, *shape) if shape is not None else ())}
    assert not wrong, f"blob: (got, expected) {wrong}"


def test_googlenet_train_val_shapes_per_layer():
    net = net_at_batch(REPO / "prototxt" / "googlenet" / "googlenet_train_val.prototxt", TRAIN)
    check_blob_shapes(net, GOOGLENET)
    assert [round(w, 6) for w in (net.layer_dict[n].loss_weights[0]
                                  for n in ("loss1/loss", "loss2/loss", "loss3/loss3"))] == [0.3, 0.3, 1.0]


def test_googlenet_deploy_has_the_main_classifier_only():
    net = net_at_batch(REPO / "prototxt" / "googlenet" / "googlenet_deploy.prototxt", TEST)
    table = {name: shape for name, shape in GOOGLENET.items()
             if not name.startswith(("loss1/", "loss2/")) and name not in ("label", "loss3/loss3")}
    check_blob_shapes(net, {**table, "prob": (1000,)})


def test_resnet50_deploy_shapes_per_layer():
    net = net_at_batch(REPO / "prototxt" / "resnet50" / "resnet50_deploy.prototxt", TEST)
    check_blob_shapes(net, RESNET50)
    for layer, shapes in RESNET50_PARAMS.items():
        assert [blob.shape for blob in net.params[layer]] == shapes, layer
    # Every residual block's layers, in ResNet-50-deploy's names and order.
    names = net.layer_names
    block = ["res4c_branch2a", "bn4c_branch2a", "scale4c_branch2a", "res4c_branch2a_relu",
             "res4c_branch2b", "bn4c_branch2b", "scale4c_branch2b", "res4c_branch2b_relu",
             "res4c_branch2c", "bn4c_branch2c", "scale4c_branch2c", "res4c", "res4c_relu"]
    start = names.index("res4c_branch2a")
    assert names[start:start + len(block)] == block
    assert names[:6] == ["data", "conv1", "bn_conv1", "scale_conv1", "conv1_relu", "pool1"]
    assert sum(net.layer_dict[n].type_name == "Eltwise" for n in names) == 16


def test_resnet50_deploy_batch_norm_uses_stored_statistics():
    param = prototxt.read_net_param(REPO / "prototxt" / "resnet50" / "resnet50_deploy.prototxt")
    batch_norms = [layer for layer in param.layer if layer.type == "BatchNorm"]
    assert len(batch_norms) == 53
    assert all(layer.batch_norm_param.use_global_stats for layer in batch_norms)
