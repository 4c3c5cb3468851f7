"""Write torchvision_state_dict_keys.json: torchvision's state_dict keys and shapes.

Run it with torchvision installed to regenerate the file:

    python tests/data/make_torchvision_state_dict_keys.py

The fastcnn.models tests compare their state_dicts against this file, so that
torchvision itself is not a test dependency. The torchvision version used is
recorded under "_torchvision_version".
"""

import json
from pathlib import Path

import torchvision
from torchvision import models

MODELS = {
    "alexnet": lambda: models.alexnet(),
    **{name: getattr(models, name) for name in (
        "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn",
        "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    )},
    # init_weights=False: skips the slow truncated-normal init and its warning.
    "googlenet": lambda: models.googlenet(aux_logits=True, init_weights=False),
    "googlenet_no_aux": lambda: models.googlenet(aux_logits=False, init_weights=False),
}


def main():
    table = {"_torchvision_version": torchvision.__version__}
    for name, build in MODELS.items():
        state = build().state_dict()
        table[name] = [[key, list(tensor.shape)] for key, tensor in state.items()]
    out = Path(__file__).with_name("torchvision_state_dict_keys.json")
    # One [key, shape] pair per line keeps diffs of the file readable.
    lines = ["{"]
    for i, (name, value) in enumerate(table.items()):
        end = "," if i + 1 < len(table) else ""
        if isinstance(value, str):
            lines.append(f"  {json.dumps(name)}: {json.dumps(value)}{end}")
            continue
        lines.append(f"  {json.dumps(name)}: [")
        lines += [f"    {json.dumps(pair)}" + ("," if j + 1 < len(value) else "") for j, pair in enumerate(value)]
        lines.append(f"  ]{end}")
    lines.append("}")
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out} ({len(table) - 1} models, torchvision {torchvision.__version__})")


if __name__ == "__main__":
    main()
