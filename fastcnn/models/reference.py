"""The classic networks in plain torch.nn: the eager PyTorch baseline that
`python -m fastcnn bench` times, and the reference the tests compare
fastcnn.models against.

Written independently of fastcnn's layers (only torch imports) from the papers
and torchvision's published architectures, with the same module names, so that a
fastcnn model's state_dict loads here with strict=True. The torchvision-style
models reproduce torchvision's state_dict keys, order and shapes exactly
(tests/data/torchvision_state_dict_keys.json).
"""

import torch
from torch import nn

__all__ = [
    "lenet5",
    "alexnet",
    "alexnet_original",
    "vgg11",
    "vgg13",
    "vgg16",
    "vgg19",
    "vgg11_bn",
    "vgg13_bn",
    "vgg16_bn",
    "vgg19_bn",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "nin",
    "googlenet",
]


class _FeaturesClassifier(nn.Module):
    """features -> optional pool -> flatten -> classifier (LeNet, AlexNet, VGG)."""

    def __init__(self, features, classifier, avgpool=None):
        super().__init__()
        self.features = features
        if avgpool is not None:
            self.avgpool = avgpool
        self.classifier = classifier

    def forward(self, x):
        x = self.features(x)
        if hasattr(self, "avgpool"):
            x = self.avgpool(x)
        return self.classifier(torch.flatten(x, 1))


# --- LeNet-5 -----------------------------------------------------------------


def lenet5(num_classes=10, activation="tanh"):
    """LeNet-5 for (N, 1, 32, 32) input, average-pooling subsampling."""
    acts = {"tanh": nn.Tanh, "relu": nn.ReLU}
    if activation not in acts:
        raise ValueError(f"activation must be 'tanh' or 'relu', got {activation!r}")
    act = acts[activation]
    features = nn.Sequential(
        nn.Conv2d(1, 6, 5), act(), nn.AvgPool2d(2),
        nn.Conv2d(6, 16, 5), act(), nn.AvgPool2d(2),
    )
    classifier = nn.Sequential(
        nn.Linear(400, 120), act(),
        nn.Linear(120, 84), act(),
        nn.Linear(84, num_classes),
    )
    return _FeaturesClassifier(features, classifier)


# --- AlexNet -----------------------------------------------------------------


def _alexnet_classifier(num_classes):
    return nn.Sequential(
        nn.Dropout(0.5),
        nn.Linear(256 * 6 * 6, 4096),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(4096, 4096),
        nn.ReLU(),
        nn.Linear(4096, num_classes),
    )


def alexnet(num_classes=1000):
    """torchvision's AlexNet (the one-GPU variant of Krizhevsky 2014)."""
    features = nn.Sequential(
        nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2),
    )
    return _FeaturesClassifier(features, _alexnet_classifier(num_classes), nn.AdaptiveAvgPool2d((6, 6)))


def alexnet_original(num_classes=1000, groups=1):
    """AlexNet as in Krizhevsky 2012 (LRN, 227x227 input); groups=2 mimics the two-GPU split."""
    if groups not in (1, 2):
        raise ValueError(f"groups must be 1 or 2, got {groups!r}")

    def lrn():
        return nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=2.0)

    features = nn.Sequential(
        nn.Conv2d(3, 96, 11, stride=4), nn.ReLU(), lrn(), nn.MaxPool2d(3, 2),
        nn.Conv2d(96, 256, 5, padding=2, groups=groups), nn.ReLU(), lrn(), nn.MaxPool2d(3, 2),
        nn.Conv2d(256, 384, 3, padding=1), nn.ReLU(),
        nn.Conv2d(384, 384, 3, padding=1, groups=groups), nn.ReLU(),
        nn.Conv2d(384, 256, 3, padding=1, groups=groups), nn.ReLU(), nn.MaxPool2d(3, 2),
    )
    return _FeaturesClassifier(features, _alexnet_classifier(num_classes))


# --- VGG ---------------------------------------------------------------------

# Channel counts per conv layer; "M" is a 2x2 max pool.
_VGG_CFGS = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
         512, 512, 512, 512, "M"],
}


def _vgg(depth, batch_norm, num_classes):
    layers = []
    in_channels = 3
    for v in _VGG_CFGS[depth]:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
            continue
        layers.append(nn.Conv2d(in_channels, v, 3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(v))
        layers.append(nn.ReLU())
        in_channels = v
    classifier = nn.Sequential(
        nn.Linear(512 * 7 * 7, 4096), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(4096, 4096), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(4096, num_classes),
    )
    return _FeaturesClassifier(nn.Sequential(*layers), classifier, nn.AdaptiveAvgPool2d((7, 7)))


def vgg11(num_classes=1000):
    return _vgg(11, False, num_classes)


def vgg13(num_classes=1000):
    return _vgg(13, False, num_classes)


def vgg16(num_classes=1000):
    return _vgg(16, False, num_classes)


def vgg19(num_classes=1000):
    return _vgg(19, False, num_classes)


def vgg11_bn(num_classes=1000):
    return _vgg(11, True, num_classes)


def vgg13_bn(num_classes=1000):
    return _vgg(13, True, num_classes)


def vgg16_bn(num_classes=1000):
    return _vgg(16, True, num_classes)


def vgg19_bn(num_classes=1000):
    return _vgg(19, True, num_classes)


# --- ResNet ------------------------------------------------------------------


def _conv3x3(in_channels, out_channels, stride=1):
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def _conv1x1(in_channels, out_channels, stride=1):
    return nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)


class _BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_channels, width, stride=1, downsample=None):
        super().__init__()
        self.conv1 = _conv3x3(in_channels, width, stride)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.conv2 = _conv3x3(width, width)
        self.bn2 = nn.BatchNorm2d(width)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class _Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck: the stride sits on the 3x3 conv."""

    expansion = 4

    def __init__(self, in_channels, width, stride=1, downsample=None):
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = _conv1x1(in_channels, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = _conv1x1(width, out_channels)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class _ResNet(nn.Module):
    def __init__(self, block, blocks_per_stage, num_classes):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_channels = 64
        for stage, (width, num_blocks) in enumerate(zip((64, 128, 256, 512), blocks_per_stage)):
            stride = 1 if stage == 0 else 2
            out_channels = width * block.expansion
            downsample = None
            if stride != 1 or in_channels != out_channels:
                downsample = nn.Sequential(_conv1x1(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels))
            layers = [block(in_channels, width, stride, downsample)]
            layers += [block(out_channels, width) for _ in range(1, num_blocks)]
            setattr(self, f"layer{stage + 1}", nn.Sequential(*layers))
            in_channels = out_channels
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes=1000):
    return _ResNet(_BasicBlock, (2, 2, 2, 2), num_classes)


def resnet34(num_classes=1000):
    return _ResNet(_BasicBlock, (3, 4, 6, 3), num_classes)


def resnet50(num_classes=1000):
    return _ResNet(_Bottleneck, (3, 4, 6, 3), num_classes)


def resnet101(num_classes=1000):
    return _ResNet(_Bottleneck, (3, 4, 23, 3), num_classes)


def resnet152(num_classes=1000):
    return _ResNet(_Bottleneck, (3, 8, 36, 3), num_classes)


# --- Network in Network --------------------------------------------------------


def _mlpconv(in_channels, out_channels, kernel_size, stride, padding):
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding), nn.ReLU(),
        nn.Conv2d(out_channels, out_channels, 1), nn.ReLU(),
        nn.Conv2d(out_channels, out_channels, 1), nn.ReLU(),
    )


class _NiN(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.features = nn.Sequential(
            _mlpconv(3, 96, 11, 4, 0), nn.MaxPool2d(3, 2),
            _mlpconv(96, 256, 5, 1, 2), nn.MaxPool2d(3, 2),
            _mlpconv(256, 384, 3, 1, 1), nn.MaxPool2d(3, 2),
            nn.Dropout(0.5),
            _mlpconv(384, num_classes, 3, 1, 1),
        )
        # Global average pooling of the last mlpconv's maps replaces the classifier.
        self.avgpool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return torch.flatten(self.avgpool(self.features(x)), 1)


def nin(num_classes=1000):
    """Network in Network (Lin et al. 2013) for 224x224 RGB input."""
    return _NiN(num_classes)


# --- GoogLeNet ---------------------------------------------------------------


class _BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm(eps=1e-3) -> ReLU, as torchvision's port."""

    def __init__(self, in_channels, out_channels, **conv_kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **conv_kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)))


class _Inception(nn.Module):
    def __init__(self, in_channels, ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj):
        super().__init__()
        self.branch1 = _BasicConv2d(in_channels, ch1x1, kernel_size=1)
        self.branch2 = nn.Sequential(
            _BasicConv2d(in_channels, ch3x3red, kernel_size=1),
            _BasicConv2d(ch3x3red, ch3x3, kernel_size=3, padding=1),
        )
        # torchvision's "5x5" branch really uses a 3x3 conv (a known quirk of its port).
        self.branch3 = nn.Sequential(
            _BasicConv2d(in_channels, ch5x5red, kernel_size=1),
            _BasicConv2d(ch5x5red, ch5x5, kernel_size=3, padding=1),
        )
        self.branch4 = nn.Sequential(
            nn.MaxPool2d(3, stride=1, padding=1, ceil_mode=True),
            _BasicConv2d(in_channels, pool_proj, kernel_size=1),
        )

    def forward(self, x):
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


class _InceptionAux(nn.Module):
    def __init__(self, in_channels, num_classes):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d((4, 4))
        self.conv = _BasicConv2d(in_channels, 128, kernel_size=1)
        self.fc1 = nn.Linear(2048, 1024)
        self.relu = nn.ReLU()
        self.dropout = nn.Dropout(0.7)
        self.fc2 = nn.Linear(1024, num_classes)

    def forward(self, x):
        x = torch.flatten(self.conv(self.pool(x)), 1)
        return self.fc2(self.dropout(self.relu(self.fc1(x))))


class _GoogLeNet(nn.Module):
    def __init__(self, num_classes, aux_logits):
        super().__init__()
        self.aux_logits = aux_logits
        self.conv1 = _BasicConv2d(3, 64, kernel_size=7, stride=2, padding=3)
        self.maxpool1 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.conv2 = _BasicConv2d(64, 64, kernel_size=1)
        self.conv3 = _BasicConv2d(64, 192, kernel_size=3, padding=1)
        self.maxpool2 = nn.MaxPool2d(3, stride=2, ceil_mode=True)

        self.inception3a = _Inception(192, 64, 96, 128, 16, 32, 32)
        self.inception3b = _Inception(256, 128, 128, 192, 32, 96, 64)
        self.maxpool3 = nn.MaxPool2d(3, stride=2, ceil_mode=True)

        self.inception4a = _Inception(480, 192, 96, 208, 16, 48, 64)
        self.inception4b = _Inception(512, 160, 112, 224, 24, 64, 64)
        self.inception4c = _Inception(512, 128, 128, 256, 24, 64, 64)
        self.inception4d = _Inception(512, 112, 144, 288, 32, 64, 64)
        self.inception4e = _Inception(528, 256, 160, 320, 32, 128, 128)
        self.maxpool4 = nn.MaxPool2d(2, stride=2, ceil_mode=True)

        self.inception5a = _Inception(832, 256, 160, 320, 32, 128, 128)
        self.inception5b = _Inception(832, 384, 192, 384, 48, 128, 128)

        # Registered here (after inception5b, before fc) to match torchvision's key order.
        if aux_logits:
            self.aux1 = _InceptionAux(512, num_classes)
            self.aux2 = _InceptionAux(528, num_classes)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(1024, num_classes)

    def forward(self, x):
        with_aux = self.training and self.aux_logits
        x = self.maxpool1(self.conv1(x))
        x = self.maxpool2(self.conv3(self.conv2(x)))
        x = self.maxpool3(self.inception3b(self.inception3a(x)))
        x = self.inception4a(x)
        aux1 = self.aux1(x) if with_aux else None
        x = self.inception4d(self.inception4c(self.inception4b(x)))
        aux2 = self.aux2(x) if with_aux else None
        x = self.maxpool4(self.inception4e(x))
        x = self.inception5b(self.inception5a(x))
        x = self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))
        if with_aux:
            return x, aux2, aux1
        return x


def googlenet(num_classes=1000, aux_logits=True):
    """torchvision's GoogLeNet (transform_input=False). Training mode with aux_logits
    returns the plain tuple (logits, aux2, aux1); otherwise the logits tensor."""
    return _GoogLeNet(num_classes, aux_logits)
