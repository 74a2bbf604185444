#!/usr/bin/env python3
"""Writes the model zoo's net prototxts with NetSpec: ``python prototxt/make_zoo.py [--check]``.

Each net is one builder function that makes either the train_val net (synthetic DummyData input at
the net's timing batch, or the real dataset for resnet_fmnist) or the deploy net (an Input blob and
a "prob" Softmax). Layer names are Caffe's classic ones, so weights trained with BVLC Caffe (or
Kaiming He's ResNet-50) load by name. The solvers are hand-written beside the nets.

``--check`` writes nothing and exits 1 if a committed file differs from what this script makes.
"""
import argparse
import io
import sys
from pathlib import Path

from google.protobuf import text_encoding

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minicaffe import net_spec  # noqa: E402
from minicaffe.proto import minicaffe_pb2 as pb  # noqa: E402

L, P = net_spec.layers, net_spec.params
ZOO = Path(__file__).resolve().parent

# lr_mult/decay_mult for (weights, bias), as Caffe's reference nets use them.
LEARN = [dict(lr_mult=1, decay_mult=1), dict(lr_mult=2, decay_mult=0)]
LEARN_NO_BIAS = [dict(lr_mult=1, decay_mult=1)]
# BatchNorm's mean, variance and scale-factor blobs are statistics, not learned.
FROZEN3 = [dict(lr_mult=0, decay_mult=0)] * 3
XAVIER = dict(type="xavier")
MSRA = dict(type="msra")


def constant(value=0.0):
    return dict(type="constant", value=value) if value else dict(type="constant")


def gaussian(std):
    return dict(type="gaussian", std=std)


class Builder:
    """A NetSpec plus the helpers every zoo net shares (conv + ReLU, data, loss, accuracy)."""

    def __init__(self, deploy, batch_norm_average=None):
        self.n = net_spec.NetSpec()
        self.deploy = deploy
        # BatchNorm's moving_average_fraction in training (None: Caffe's default, 0.999).
        self.batch_norm_average = batch_norm_average

    def __getitem__(self, name):
        return self.n[name]

    def __setitem__(self, name, top):
        self.n[name] = top

    def inputs(self, batch, shape, classes):
        """Input blob "data" (deploy) or DummyData "data" + "label" (train_val) of the given shape."""
        if self.deploy:
            self.n.data = L.Input(shape=dict(dim=[batch, *shape]))
        else:
            # Labels drawn uniformly in [0, classes) and truncated to integers by the loss layers.
            self.n.data, self.n.label = L.DummyData(
                shape=[dict(dim=[batch, *shape]), dict(dim=[batch])],
                data_filler=[gaussian(1.0), dict(type="uniform", min=0, max=classes - 0.01)], ntop=2)
        return self.n.data

    def conv(self, name, bottom, num_output, kernel, stride=None, pad=0, group=1, weight_filler=XAVIER,
             bias_filler=None, bias=True, relu=None):
        """Convolution ``name``; with ``relu`` also an in-place ReLU of that name."""
        fields = dict(num_output=num_output, kernel_size=kernel, weight_filler=weight_filler)
        if pad:
            fields["pad"] = pad
        if stride is not None:
            fields["stride"] = stride
        if group != 1:
            fields["group"] = group
        if bias:
            fields["bias_filler"] = bias_filler or constant()
        else:
            fields["bias_term"] = False
        self.n[name] = L.Convolution(bottom, param=LEARN if bias else LEARN_NO_BIAS, **fields)
        if relu:
            self.n[relu] = L.ReLU(self.n[name], in_place=True)
        return self.n[name]

    def fc(self, name, bottom, num_output, weight_filler=XAVIER, bias_filler=None, relu=None, dropout=None,
           dropout_ratio=0.5):
        self.n[name] = L.InnerProduct(bottom, num_output=num_output, param=LEARN, weight_filler=weight_filler,
                                      bias_filler=bias_filler or constant())
        if relu:
            self.n[relu] = L.ReLU(self.n[name], in_place=True)
        if dropout:
            self.n[dropout] = L.Dropout(self.n[name], dropout_ratio=dropout_ratio, in_place=True)
        return self.n[name]

    def max_pool(self, name, bottom, kernel, stride, pad=0):
        return self._pool(name, bottom, P.Pooling.MAX, kernel, stride, pad)

    def ave_pool(self, name, bottom, kernel, stride, pad=0):
        return self._pool(name, bottom, P.Pooling.AVE, kernel, stride, pad)

    def _pool(self, name, bottom, pool, kernel, stride, pad):
        fields = dict(pool=pool, kernel_size=kernel, stride=stride)
        if pad:
            fields["pad"] = pad
        self.n[name] = L.Pooling(bottom, **fields)
        return self.n[name]

    def lrn(self, name, bottom, local_size=5, alpha=1e-4, beta=0.75, within_channel=False):
        fields = dict(local_size=local_size, alpha=alpha, beta=beta)
        if within_channel:
            fields["norm_region"] = P.LRN.WITHIN_CHANNEL
        self.n[name] = L.LRN(bottom, **fields)
        return self.n[name]

    def classifier_outputs(self, scores, loss=("loss", "loss"), accuracy="accuracy", top5=None, loss_weight=None,
                           loss_first=False):
        """Softmax "prob" in deploy; SoftmaxWithLoss + TEST-phase Accuracy layers in train_val.

        ``loss`` is (layer name, top name): GoogLeNet's differ ("loss1/loss" writes "loss1/loss1").
        """
        if self.deploy:
            self.n.prob = L.Softmax(scores)
            return
        loss_name, loss_top = loss
        extra = {} if loss_weight is None else dict(loss_weight=loss_weight)
        if loss_first:
            self.n[loss_top] = L.SoftmaxWithLoss(scores, self.n.label, name=loss_name, **extra)
        self.n[accuracy] = L.Accuracy(scores, self.n.label, include=dict(phase=pb.TEST))
        if top5:
            self.n[top5] = L.Accuracy(scores, self.n.label, top_k=5, include=dict(phase=pb.TEST))
        if not loss_first:
            self.n[loss_top] = L.SoftmaxWithLoss(scores, self.n.label, name=loss_name, **extra)

    def to_proto(self, name):
        net = self.n.to_proto()
        net.name = name
        return net


# ------------------------------------------------------------------------------------------------
# CIFAR-10 full (Caffe's examples/cifar10, the 18% error net)
# ------------------------------------------------------------------------------------------------

def cifar10_full(deploy, batch=100):
    b = Builder(deploy)
    data = b.inputs(batch, (3, 32, 32), classes=10)
    b.conv("conv1", data, 32, 5, stride=1, pad=2, weight_filler=gaussian(0.0001))
    b.max_pool("pool1", b["conv1"], 3, 2)
    b["relu1"] = L.ReLU(b["pool1"], in_place=True)
    b.lrn("norm1", b["pool1"], local_size=3, alpha=5e-5, within_channel=True)
    b.conv("conv2", b["norm1"], 32, 5, stride=1, pad=2, weight_filler=gaussian(0.01), relu="relu2")
    b.ave_pool("pool2", b["conv2"], 3, 2)
    b.lrn("norm2", b["pool2"], local_size=3, alpha=5e-5, within_channel=True)
    b.conv("conv3", b["norm2"], 64, 5, stride=1, pad=2, weight_filler=gaussian(0.01), relu="relu3")
    b.ave_pool("pool3", b["conv3"], 3, 2)
    # Caffe's recipe: a strong weight decay on the classifier only.
    b["ip1"] = L.InnerProduct(b["pool3"], num_output=10, weight_filler=gaussian(0.01),
                              bias_filler=constant(), param=[dict(lr_mult=1, decay_mult=250),
                                                             dict(lr_mult=2, decay_mult=0)])
    b.classifier_outputs(b["ip1"])
    return b.to_proto("CIFAR10_full")


# ------------------------------------------------------------------------------------------------
# AlexNet and CaffeNet (Krizhevsky et al. 2012; CaffeNet swaps pooling and normalization)
# ------------------------------------------------------------------------------------------------

def _alexnet_family(deploy, batch, pool_before_norm, name):
    b = Builder(deploy)
    data = b.inputs(batch, (3, 227, 227), classes=1000)
    # CaffeNet starts its ReLU-fed biases at 1, AlexNet at 0.1.
    warm = constant(1.0 if pool_before_norm else 0.1)

    def pool_and_norm(i, bottom):
        if pool_before_norm:
            b.max_pool(f"pool{i}", bottom, 3, 2)
            return b.lrn(f"norm{i}", b[f"pool{i}"])
        b.lrn(f"norm{i}", bottom)
        return b.max_pool(f"pool{i}", b[f"norm{i}"], 3, 2)

    b.conv("conv1", data, 96, 11, stride=4, weight_filler=gaussian(0.01), relu="relu1")
    top = pool_and_norm(1, b["conv1"])
    b.conv("conv2", top, 256, 5, pad=2, group=2, weight_filler=gaussian(0.01), bias_filler=warm, relu="relu2")
    top = pool_and_norm(2, b["conv2"])
    b.conv("conv3", top, 384, 3, pad=1, weight_filler=gaussian(0.01), relu="relu3")
    b.conv("conv4", b["conv3"], 384, 3, pad=1, group=2, weight_filler=gaussian(0.01), bias_filler=warm,
           relu="relu4")
    b.conv("conv5", b["conv4"], 256, 3, pad=1, group=2, weight_filler=gaussian(0.01), bias_filler=warm,
           relu="relu5")
    b.max_pool("pool5", b["conv5"], 3, 2)
    b.fc("fc6", b["pool5"], 4096, weight_filler=gaussian(0.005), bias_filler=warm, relu="relu6", dropout="drop6")
    b.fc("fc7", b["fc6"], 4096, weight_filler=gaussian(0.005), bias_filler=warm, relu="relu7", dropout="drop7")
    b.fc("fc8", b["fc7"], 1000, weight_filler=gaussian(0.01))
    b.classifier_outputs(b["fc8"])
    return b.to_proto(name)


def alexnet(deploy, batch=16):
    return _alexnet_family(deploy, batch, pool_before_norm=False, name="AlexNet")


def caffenet(deploy, batch=16):
    return _alexnet_family(deploy, batch, pool_before_norm=True, name="CaffeNet")


# ------------------------------------------------------------------------------------------------
# GoogLeNet (Szegedy et al. 2015, Caffe's bvlc_googlenet names)
# ------------------------------------------------------------------------------------------------

# name: (1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool projection), from the paper's Table 1.
INCEPTION = {
    "3a": (64, 96, 128, 16, 32, 32),
    "3b": (128, 128, 192, 32, 96, 64),
    "4a": (192, 96, 208, 16, 48, 64),
    "4b": (160, 112, 224, 24, 64, 64),
    "4c": (128, 128, 256, 24, 64, 64),
    "4d": (112, 144, 288, 32, 64, 64),
    "4e": (256, 160, 320, 32, 128, 128),
    "5a": (256, 160, 320, 32, 128, 128),
    "5b": (384, 192, 384, 48, 128, 128),
}


def _inception(b, module, bottom):
    c1, r3, c3, r5, c5, proj = INCEPTION[module]
    p = f"inception_{module}"
    warm = constant(0.2)
    b.conv(f"{p}/1x1", bottom, c1, 1, bias_filler=warm, relu=f"{p}/relu_1x1")
    b.conv(f"{p}/3x3_reduce", bottom, r3, 1, bias_filler=warm, relu=f"{p}/relu_3x3_reduce")
    b.conv(f"{p}/3x3", b[f"{p}/3x3_reduce"], c3, 3, pad=1, bias_filler=warm, relu=f"{p}/relu_3x3")
    b.conv(f"{p}/5x5_reduce", bottom, r5, 1, bias_filler=warm, relu=f"{p}/relu_5x5_reduce")
    b.conv(f"{p}/5x5", b[f"{p}/5x5_reduce"], c5, 5, pad=2, bias_filler=warm, relu=f"{p}/relu_5x5")
    b.max_pool(f"{p}/pool", bottom, 3, 1, pad=1)
    b.conv(f"{p}/pool_proj", b[f"{p}/pool"], proj, 1, bias_filler=warm, relu=f"{p}/relu_pool_proj")
    b[f"{p}/output"] = L.Concat(b[f"{p}/1x1"], b[f"{p}/3x3"], b[f"{p}/5x5"], b[f"{p}/pool_proj"])
    return b[f"{p}/output"]


def _auxiliary_classifier(b, i, bottom):
    """The paper's side classifier: 5x5/3 average pool, 1x1 conv, fc 1024, dropout 0.7, loss x 0.3."""
    p = f"loss{i}"
    b.ave_pool(f"{p}/ave_pool", bottom, 5, 3)
    b.conv(f"{p}/conv", b[f"{p}/ave_pool"], 128, 1, bias_filler=constant(0.2), relu=f"{p}/relu_conv")
    b.fc(f"{p}/fc", b[f"{p}/conv"], 1024, bias_filler=constant(0.2), relu=f"{p}/relu_fc", dropout=f"{p}/drop_fc",
         dropout_ratio=0.7)
    b.fc(f"{p}/classifier", b[f"{p}/fc"], 1000)
    b.classifier_outputs(b[f"{p}/classifier"], loss=(f"{p}/loss", f"{p}/loss{i}"), accuracy=f"{p}/top-1",
                         top5=f"{p}/top-5", loss_weight=0.3, loss_first=True)


def googlenet(deploy, batch=8):
    b = Builder(deploy)
    data = b.inputs(batch, (3, 224, 224), classes=1000)
    warm = constant(0.2)
    b.conv("conv1/7x7_s2", data, 64, 7, stride=2, pad=3, bias_filler=warm, relu="conv1/relu_7x7")
    b.max_pool("pool1/3x3_s2", b["conv1/7x7_s2"], 3, 2)
    b.lrn("pool1/norm1", b["pool1/3x3_s2"])
    b.conv("conv2/3x3_reduce", b["pool1/norm1"], 64, 1, bias_filler=warm, relu="conv2/relu_3x3_reduce")
    b.conv("conv2/3x3", b["conv2/3x3_reduce"], 192, 3, pad=1, bias_filler=warm, relu="conv2/relu_3x3")
    b.lrn("conv2/norm2", b["conv2/3x3"])
    top = b.max_pool("pool2/3x3_s2", b["conv2/norm2"], 3, 2)
    for module in ("3a", "3b"):
        top = _inception(b, module, top)
    top = b.max_pool("pool3/3x3_s2", top, 3, 2)
    for module in ("4a", "4b", "4c", "4d", "4e"):
        top = _inception(b, module, top)
        # The side classifiers train only; the deploy net has the main classifier alone.
        if module in ("4a", "4d") and not deploy:
            _auxiliary_classifier(b, 1 if module == "4a" else 2, top)
    top = b.max_pool("pool4/3x3_s2", top, 3, 2)
    for module in ("5a", "5b"):
        top = _inception(b, module, top)
    b.ave_pool("pool5/7x7_s1", top, 7, 1)
    b["pool5/drop_7x7_s1"] = L.Dropout(b["pool5/7x7_s1"], dropout_ratio=0.4, in_place=True)
    b.fc("loss3/classifier", b["pool5/7x7_s1"], 1000)
    b.classifier_outputs(b["loss3/classifier"], loss=("loss3/loss3", "loss3/loss3"), accuracy="loss3/top-1",
                         top5="loss3/top-5", loss_weight=1, loss_first=True)
    return b.to_proto("GoogleNet")


# ------------------------------------------------------------------------------------------------
# VGG-16 (Simonyan & Zisserman 2015, configuration D, names of the public VGG_ILSVRC_16_layers)
# ------------------------------------------------------------------------------------------------

def vgg16(deploy, batch=4):
    b = Builder(deploy)
    top = b.inputs(batch, (3, 224, 224), classes=1000)
    for stage, (convs, width) in enumerate(((2, 64), (2, 128), (3, 256), (3, 512), (3, 512)), start=1):
        for i in range(1, convs + 1):
            top = b.conv(f"conv{stage}_{i}", top, width, 3, pad=1, relu=f"relu{stage}_{i}")
        top = b.max_pool(f"pool{stage}", top, 2, 2)
    b.fc("fc6", top, 4096, relu="relu6", dropout="drop6")
    b.fc("fc7", b["fc6"], 4096, relu="relu7", dropout="drop7")
    b.fc("fc8", b["fc7"], 1000)
    b.classifier_outputs(b["fc8"])
    return b.to_proto("VGG_ILSVRC_16_layers")


# ------------------------------------------------------------------------------------------------
# ResNets (He et al. 2016): conv + BatchNorm + Scale, Eltwise sums, names of ResNet-50-deploy
# ------------------------------------------------------------------------------------------------

def _conv_bn(b, bottom, conv_name, bn_name, scale_name, num_output, kernel, stride=1, pad=0, relu=None):
    """Convolution without bias, then in-place BatchNorm, Scale (with bias) and optional ReLU."""
    b.conv(conv_name, bottom, num_output, kernel, stride=stride if stride != 1 else None, pad=pad,
           weight_filler=MSRA, bias=False)
    top = b[conv_name]
    # Deploy nets use the stored statistics; train_val leaves it to the phase (TEST uses them too).
    if b.deploy:
        bn = dict(batch_norm_param=dict(use_global_stats=True))
    elif b.batch_norm_average is not None:
        bn = dict(batch_norm_param=dict(moving_average_fraction=b.batch_norm_average))
    else:
        bn = {}
    b[bn_name] = L.BatchNorm(top, param=FROZEN3, in_place=True, **bn)
    b[scale_name] = L.Scale(top, bias_term=True, in_place=True)
    if relu:
        b[relu] = L.ReLU(top, in_place=True)
    return top


def _residual_block(b, name, bottom, branches, project, stride):
    """Block ``res{name}``: the branch2 convolutions plus an identity or projected shortcut.

    ``branches`` lists (suffix, num_output, kernel, pad) for branch2a, 2b(, 2c); the stride sits on
    the first branch2 convolution and on the projection, as in the original ResNet.
    """
    if project:
        shortcut = _conv_bn(b, bottom, f"res{name}_branch1", f"bn{name}_branch1", f"scale{name}_branch1",
                            branches[-1][1], 1, stride=stride)
    else:
        shortcut = bottom
    top = bottom
    for i, (suffix, num_output, kernel, pad) in enumerate(branches):
        last = i == len(branches) - 1
        top = _conv_bn(b, top, f"res{name}_branch{suffix}", f"bn{name}_branch{suffix}",
                       f"scale{name}_branch{suffix}", num_output, kernel, stride=stride if i == 0 else 1, pad=pad,
                       relu=None if last else f"res{name}_branch{suffix}_relu")
    b[f"res{name}"] = L.Eltwise(shortcut, top)
    b[f"res{name}_relu"] = L.ReLU(b[f"res{name}"], in_place=True)
    return b[f"res{name}"]


def _block_letters(count):
    # ResNet-50 names its blocks a, b, c, ...
    return "abcdefghijklmnopqrstuvwxyz"[:count]


def resnet50(deploy, batch=8):
    b = Builder(deploy)
    data = b.inputs(batch, (3, 224, 224), classes=1000)
    _conv_bn(b, data, "conv1", "bn_conv1", "scale_conv1", 64, 7, stride=2, pad=3, relu="conv1_relu")
    top = b.max_pool("pool1", b["conv1"], 3, 2)
    for stage, (blocks, width) in enumerate(((3, 64), (4, 128), (6, 256), (3, 512)), start=2):
        for i, letter in enumerate(_block_letters(blocks)):
            branches = [("2a", width, 1, 0), ("2b", width, 3, 1), ("2c", 4 * width, 1, 0)]
            stride = 2 if i == 0 and stage > 2 else 1
            top = _residual_block(b, f"{stage}{letter}", top, branches, project=i == 0, stride=stride)
    b.ave_pool("pool5", top, 7, 1)
    b.fc("fc1000", b["pool5"], 1000, weight_filler=gaussian(0.01))
    b.classifier_outputs(b["fc1000"])
    return b.to_proto("ResNet-50")


# Channels of the three stages of the Fashion-MNIST ResNet (ResNet-20's 16/32/64).
FMNIST_WIDTHS = (16, 32, 64)


def _fashion_mnist_data(phase, split, batch):
    """Fashion-MNIST scaled to [0, 1); training images are shuffled and flipped left-right at random."""
    training = phase == pb.TRAIN
    transform = dict(scale=1 / 256, mirror=True) if training else dict(scale=1 / 256)
    return L.Data(name="fashion_mnist", ntop=2, include=dict(phase=phase), transform_param=transform,
                  data_param=dict(source=f"fashion-mnist:{split}", batch_size=batch, backend=P.Data.IDX,
                                  shuffle=training))


def resnet_fmnist(deploy, batch=128, test_batch=100):
    """ResNet-20 for 28x28 Fashion-MNIST: 3 stages of 3 basic blocks at 28, 14 and 7 pixels.

    BatchNorm averages its statistics over ~100 iterations (0.99) rather than Caffe's ~1000: at lr 0.1
    the weights move fast enough that a 1000-iteration average describes a net long gone, and the
    TEST-phase accuracy (which uses the averages) then lags far behind training.
    """
    b = Builder(deploy, batch_norm_average=0.99)
    if deploy:
        data = b.inputs(test_batch, (1, 28, 28), classes=10)
    else:
        # A NetSpec holds one producer per top name, so the TRAIN-phase twin is made apart.
        train = net_spec.NetSpec()
        train.data, train.label = _fashion_mnist_data(pb.TRAIN, "train", batch)
        b.n.data, b.n.label = _fashion_mnist_data(pb.TEST, "test", test_batch)
        data = b.n.data
    _conv_bn(b, data, "conv1", "bn_conv1", "scale_conv1", FMNIST_WIDTHS[0], 3, pad=1, relu="conv1_relu")
    top = b["conv1"]
    for stage, width in enumerate(FMNIST_WIDTHS, start=2):
        for i, letter in enumerate(_block_letters(3)):
            downsample = i == 0 and stage > 2
            top = _residual_block(b, f"{stage}{letter}", top, [("2a", width, 3, 1), ("2b", width, 3, 1)],
                                  project=downsample, stride=2 if downsample else 1)
    b["pool5"] = L.Pooling(top, pool=P.Pooling.AVE, global_pooling=True)
    b.fc("fc10", b["pool5"], 10, weight_filler=MSRA)
    b.classifier_outputs(b["fc10"])
    net = b.to_proto("ResNet-20-FashionMNIST")
    if not deploy:
        layers = [*train.to_proto().layer, *net.layer]
        del net.layer[:]
        net.layer.extend(layers)
    return net


# ------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------

NETS = {
    "cifar10_full": (cifar10_full, "CIFAR-10 full (Caffe's examples/cifar10 18% net)", "batch 100"),
    "alexnet": (alexnet, "AlexNet (Krizhevsky et al. 2012) with grouped convolutions and LRN", "batch 16"),
    "caffenet": (caffenet, "CaffeNet (AlexNet with pooling before normalization)", "batch 16"),
    "googlenet": (googlenet, "GoogLeNet (Szegedy et al. 2015) with both auxiliary classifiers", "batch 8"),
    "vgg16": (vgg16, "VGG-16 (Simonyan & Zisserman 2015, configuration D)", "batch 4"),
    "resnet50": (resnet50, "ResNet-50 (He et al. 2016), layer names of ResNet-50-deploy", "batch 8"),
    "resnet_fmnist": (resnet_fmnist, "ResNet-20 style net for 28x28 Fashion-MNIST", None),
}


# Floats are float32 in the schema: 7 significant digits give back the same value, and print 1 as "1".
FLOAT = ".7g"


def format_net(net, max_width=100):
    """Prototxt text with short sub-messages on one line, as people write them by hand."""
    out = io.StringIO()
    _write_message(net, out, 0, max_width)
    return out.getvalue()


def _write_message(message, out, indent, max_width):
    pad = " " * indent
    for field, value in message.ListFields():
        values = value if net_spec.is_repeated(field) else [value]
        for item in values:
            if field.message_type is None:
                out.write(f"{pad}{field.name}: {_scalar_text(field, item)}\n")
                continue
            one_line = _one_line(item)
            if len(pad) + len(field.name) + len(one_line) + 5 <= max_width and field.name != "layer":
                out.write(f"{pad}{field.name} {{ {one_line} }}\n")
            else:
                out.write(f"{pad}{field.name} {{\n")
                _write_message(item, out, indent + 2, max_width)
                out.write(f"{pad}}}\n")


def _one_line(message):
    parts = []
    for field, value in message.ListFields():
        for item in (value if net_spec.is_repeated(field) else [value]):
            if field.message_type is None:
                parts.append(f"{field.name}: {_scalar_text(field, item)}")
            else:
                parts.append(f"{field.name} {{ {_one_line(item)} }}")
    return " ".join(parts)


def _scalar_text(field, value):
    if field.enum_type is not None:
        return field.enum_type.values_by_number[value].name
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{text_encoding.CEscape(value, as_utf8=True)}"'
    if isinstance(value, float):
        return format(value, FLOAT)
    return str(value)


def header(key, deploy):
    _, title, timing = NETS[key]
    if deploy:
        use = "for inference: feed \"data\"; \"prob\" holds the class probabilities"
    elif timing:
        use = f"with synthetic DummyData input ({timing}), for training-speed timing and tests"
    else:
        use = "on Fashion-MNIST (the Data layers find it as `tools/get_data fashion-mnist` leaves it)"
    return f"# {title},\n# {use}.\n# Generated by prototxt/make_zoo.py; edit that script, not this file.\n"


def outputs():
    """{path: text} for every generated prototxt."""
    files = {}
    for key, (build, _, _) in NETS.items():
        for deploy, suffix in ((False, "train_val"), (True, "deploy")):
            files[ZOO / key / f"{key}_{suffix}.prototxt"] = header(key, deploy) + format_net(build(deploy))
    return files


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report files that differ")
    args = parser.parse_args(argv)
    stale = []
    for path, text in outputs().items():
        current = path.read_text() if path.exists() else None
        if current == text:
            continue
        stale.append(path)
        if not args.check:
            path.parent.mkdir(exist_ok=True)
            path.write_text(text)
    for path in stale:
        print(f"{'differs' if args.check else 'wrote'}: {path.relative_to(ZOO.parent)}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
