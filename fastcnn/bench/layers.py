"""Every distinct convolution and fully connected layer of the classic networks
(LeNet-5, AlexNet, VGG-16, ResNet-18, ResNet-50, GoogLeNet), at the batch size
each is run with: the layer set the conv/GEMM tests and benchmarks cover.

Layouts follow torchvision (AlexNet's 64-192-384-256-256 channels, ResNet v1.5
with the stride on the 3x3 convolution, GoogLeNet's 3x3 kernel in the branch the
paper gives 5x5); GoogLeNet's auxiliary classifiers, which only run in training,
are left out. A layer shared by several networks (the ResNet stem) appears once,
under the first network that has it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class ConvLayer:
    net: str
    name: str
    batch: int
    in_channels: int
    size: tuple[int, int]  # input H, W
    out_channels: int
    kernel: int
    stride: int = 1
    padding: int = 0
    groups: int = 1
    # The residual add (+ ReLU) of a ResNet block happens in this layer's epilogue.
    residual: bool = False

    @property
    def key(self) -> tuple:
        return ("conv", self.in_channels, self.size, self.out_channels, self.kernel, self.stride, self.padding,
                self.groups, self.residual)

    @property
    def out_size(self) -> tuple[int, int]:
        return tuple((s + 2 * self.padding - self.kernel) // self.stride + 1 for s in self.size)

    @property
    def macs(self) -> int:
        oh, ow = self.out_size
        return (self.batch * oh * ow * self.out_channels * self.in_channels // self.groups
                * self.kernel * self.kernel)

    @property
    def label(self) -> str:
        h, w = self.size
        return (f"{self.net} {self.name}: {self.in_channels}->{self.out_channels} {self.kernel}x{self.kernel}"
                f"/{self.stride} at {h}x{w}")


@dataclass(frozen=True)
class LinearLayer:
    net: str
    name: str
    batch: int
    in_features: int
    out_features: int

    @property
    def key(self) -> tuple:
        return ("linear", self.in_features, self.out_features)

    @property
    def macs(self) -> int:
        return self.batch * self.in_features * self.out_features

    @property
    def label(self) -> str:
        return f"{self.net} {self.name}: {self.in_features}->{self.out_features}"


BATCH = 8
LENET_BATCH = 256


def lenet5() -> list:
    b = LENET_BATCH
    return [ConvLayer("lenet5", "conv1", b, 1, (32, 32), 6, 5), ConvLayer("lenet5", "conv2", b, 6, (14, 14), 16, 5),
            LinearLayer("lenet5", "fc1", b, 400, 120), LinearLayer("lenet5", "fc2", b, 120, 84),
            LinearLayer("lenet5", "fc3", b, 84, 10)]


def alexnet() -> list:
    b = BATCH
    return [ConvLayer("alexnet", "conv1", b, 3, (224, 224), 64, 11, 4, 2),
            ConvLayer("alexnet", "conv2", b, 64, (27, 27), 192, 5, 1, 2),
            ConvLayer("alexnet", "conv3", b, 192, (13, 13), 384, 3, 1, 1),
            ConvLayer("alexnet", "conv4", b, 384, (13, 13), 256, 3, 1, 1),
            ConvLayer("alexnet", "conv5", b, 256, (13, 13), 256, 3, 1, 1),
            LinearLayer("alexnet", "fc6", b, 9216, 4096), LinearLayer("alexnet", "fc7", b, 4096, 4096),
            LinearLayer("alexnet", "fc8", b, 4096, 1000)]


def vgg16() -> list:
    plan = [(3, 64, 224), (64, 64, 224), (64, 128, 112), (128, 128, 112), (128, 256, 56), (256, 256, 56),
            (256, 512, 28), (512, 512, 28), (512, 512, 14)]
    layers = [ConvLayer("vgg16", f"conv {c}->{k} at {s}", BATCH, c, (s, s), k, 3, 1, 1) for c, k, s in plan]
    return layers + [LinearLayer("vgg16", "fc6", BATCH, 25088, 4096), LinearLayer("vgg16", "fc7", BATCH, 4096, 4096),
                     LinearLayer("vgg16", "fc8", BATCH, 4096, 1000)]


def _stem(net: str) -> ConvLayer:
    return ConvLayer(net, "stem", BATCH, 3, (224, 224), 64, 7, 2, 3)


def resnet18() -> list:
    layers = [_stem("resnet18")]
    channels, size = 64, 56
    for stage, width in enumerate((64, 128, 256, 512)):
        stride = 1 if stage == 0 else 2
        layers.append(ConvLayer("resnet18", f"layer{stage + 1} conv1", BATCH, channels, (size, size), width, 3,
                                stride, 1))
        if stride != 1:
            layers.append(ConvLayer("resnet18", f"layer{stage + 1} downsample", BATCH, channels, (size, size), width,
                                    1, stride))
        size //= stride
        layers.append(ConvLayer("resnet18", f"layer{stage + 1} conv2", BATCH, width, (size, size), width, 3, 1, 1,
                                residual=True))
        channels = width
    return layers + [LinearLayer("resnet18", "fc", BATCH, 512, 1000)]


def resnet50() -> list:
    layers = [_stem("resnet50")]
    channels, size = 64, 56
    for stage, width in enumerate((64, 128, 256, 512)):
        stride = 1 if stage == 0 else 2
        s = f"layer{stage + 1}"
        out = width * 4
        # First block (with the projection shortcut), then the repeated block.
        layers += [ConvLayer("resnet50", f"{s}.0 conv1", BATCH, channels, (size, size), width, 1),
                   ConvLayer("resnet50", f"{s}.0 conv2", BATCH, width, (size, size), width, 3, stride, 1),
                   ConvLayer("resnet50", f"{s}.0 downsample", BATCH, channels, (size, size), out, 1, stride)]
        size //= stride
        layers += [ConvLayer("resnet50", f"{s}.0 conv3", BATCH, width, (size, size), out, 1, residual=True),
                   ConvLayer("resnet50", f"{s}.1 conv1", BATCH, out, (size, size), width, 1),
                   ConvLayer("resnet50", f"{s}.1 conv2", BATCH, width, (size, size), width, 3, 1, 1)]
        channels = out
    return layers + [LinearLayer("resnet50", "fc", BATCH, 2048, 1000)]


# torchvision's GoogLeNet: (name, in, 1x1, 3x3 reduce, 3x3, "5x5" reduce, "5x5" (3x3 kernel), pool proj, size)
INCEPTION = [("3a", 192, 64, 96, 128, 16, 32, 32, 28), ("3b", 256, 128, 128, 192, 32, 96, 64, 28),
             ("4a", 480, 192, 96, 208, 16, 48, 64, 14), ("4b", 512, 160, 112, 224, 24, 64, 64, 14),
             ("4c", 512, 128, 128, 256, 24, 64, 64, 14), ("4d", 512, 112, 144, 288, 32, 64, 64, 14),
             ("4e", 528, 256, 160, 320, 32, 128, 128, 14), ("5a", 832, 256, 160, 320, 32, 128, 128, 7),
             ("5b", 832, 384, 192, 384, 48, 128, 128, 7)]


def googlenet() -> list:
    g = "googlenet"
    layers = [ConvLayer(g, "conv1", BATCH, 3, (224, 224), 64, 7, 2, 3), ConvLayer(g, "conv2", BATCH, 64, (56, 56), 64, 1),
              ConvLayer(g, "conv3", BATCH, 64, (56, 56), 192, 3, 1, 1)]
    for name, cin, c1, r3, c3, r5, c5, proj, s in INCEPTION:
        hw = (s, s)
        layers += [ConvLayer(g, f"{name} branch1", BATCH, cin, hw, c1, 1),
                   ConvLayer(g, f"{name} branch2 reduce", BATCH, cin, hw, r3, 1),
                   ConvLayer(g, f"{name} branch2", BATCH, r3, hw, c3, 3, 1, 1),
                   ConvLayer(g, f"{name} branch3 reduce", BATCH, cin, hw, r5, 1),
                   ConvLayer(g, f"{name} branch3", BATCH, r5, hw, c5, 3, 1, 1),
                   ConvLayer(g, f"{name} branch4 proj", BATCH, cin, hw, proj, 1)]
    return layers + [LinearLayer(g, "fc", BATCH, 1024, 1000)]


GPU_BATCH = 32


def on_device(layer, device):
    """The layer at the batch it is benchmarked with on `device`: a GPU runs the
    ImageNet networks at batch 32 (LeNet-5 stays at 256)."""
    if device.type == "cuda" and layer.batch < GPU_BATCH:
        return replace(layer, batch=GPU_BATCH)
    return layer


NETWORKS = {"lenet5": lenet5, "alexnet": alexnet, "vgg16": vgg16, "resnet18": resnet18, "resnet50": resnet50,
            "googlenet": googlenet}


def distinct_layers(nets=None) -> list:
    """Each layer shape once, in network order."""
    seen, out = set(), []
    for net in nets or NETWORKS:
        for layer in NETWORKS[net]():
            if layer.key not in seen:
                seen.add(layer.key)
                out.append(layer)
    return out


def conv_layers(nets=None) -> list[ConvLayer]:
    return [layer for layer in distinct_layers(nets) if isinstance(layer, ConvLayer)]


def linear_layers(nets=None) -> list[LinearLayer]:
    return [layer for layer in distinct_layers(nets) if isinstance(layer, LinearLayer)]
