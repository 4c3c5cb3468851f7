"""`python -m fastcnn train`: the digits run reaches 97% (the acceptance test of the
training command), --resume after an interruption ends with the weights of an
uninterrupted run, two DistributedDataParallel processes end with identical weights
that match one process with twice the batch, and image folders, --freeze, --ten-crop,
--ensemble and --augment run."""

import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from fastcnn import train as fastcnn_train
from fastcnn.__main__ import main, parse_args

pytest.importorskip("sklearn", reason="the digits data set comes from scikit-learn (the 'data' extra)")

ACCURACY = re.compile(r"^test accuracy: (\d\.\d{3})$", re.MULTILINE)


def train(capsys, *argv):
    """Runs `fastcnn train ARGV` in this process; returns the accuracy it printed."""
    assert main(["train", "--no-progress", *argv]) == 0
    found = ACCURACY.findall(capsys.readouterr().out)
    assert len(found) == 1, "expected one final 'test accuracy: 0.xxx' line"
    return float(found[0])


def checkpoint(path):
    return torch.load(path, weights_only=True)


def test_digits_reach_97_percent_with_the_defaults(tmp_path, capsys):
    accuracy = train(capsys, "--model", "lenet5", "--data", "digits", "--out", str(tmp_path))
    assert accuracy >= 0.97
    epochs = parse_args(["train"]).epochs
    assert sorted(p.name for p in tmp_path.glob("epoch_*.pt")) == [f"epoch_{e:03d}.pt" for e in range(1, epochs + 1)]
    state = checkpoint(tmp_path / f"epoch_{epochs:03d}.pt")
    assert state["epoch"] == epochs and {"model", "optimizer", "schedule", "rng", "args"} <= set(state)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
def test_resume_after_an_interruption_matches_an_uninterrupted_run(device, tmp_path, capsys, monkeypatch):
    """On CUDA too: the checkpoint's random-generator states must be restored from the CPU."""
    common = ["--epochs", "4", "--batch-size", "64", "--seed", "3", "--device", device]
    train(capsys, *common, "--out", str(tmp_path / "whole"))

    save = fastcnn_train._save_checkpoint

    def save_then_stop_after_epoch_2(out, epoch, *args):
        save(out, epoch, *args)
        if epoch == 2:
            raise KeyboardInterrupt  # as a Ctrl-C between epochs

    monkeypatch.setattr(fastcnn_train, "_save_checkpoint", save_then_stop_after_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        main(["train", "--no-progress", *common, "--out", str(tmp_path / "parts")])
    monkeypatch.setattr(fastcnn_train, "_save_checkpoint", save)
    assert fastcnn_train.last_checkpoint(tmp_path / "parts").name == "epoch_002.pt"
    # Something else uses the global RNG in between: the checkpoint's RNG state wins.
    torch.manual_seed(12345)
    train(capsys, *common, "--out", str(tmp_path / "parts"), "--resume")

    whole, parts = checkpoint(tmp_path / "whole" / "epoch_004.pt"), checkpoint(tmp_path / "parts" / "epoch_004.pt")
    for key, value in whole["model"].items():
        assert torch.equal(parts["model"][key], value), key
    for a, b in zip(whole["optimizer"]["state"].values(), parts["optimizer"]["state"].values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    assert whole["optimizer"]["param_groups"][0]["lr"] == parts["optimizer"]["param_groups"][0]["lr"]
    assert torch.equal(whole["rng"]["torch"], parts["rng"]["torch"])


RANK_SCRIPT = textwrap.dedent("""
    import os, sys, torch
    from fastcnn.__main__ import parse_args
    from fastcnn.train import run
    args = parse_args(sys.argv[1:])
    result = run(args)
    torch.save(result.models[0].state_dict(), os.path.join(args.out, "rank%s.pt" % os.environ.get("RANK", "0")))
""")


@pytest.mark.heavy
def test_two_ddp_processes_match_one_process_with_twice_the_batch(tmp_path):
    script = tmp_path / "train_and_save.py"
    script.write_text(RANK_SCRIPT)
    common = ["train", "--no-progress", "--epochs", "1", "--optimizer", "sgd", "--lr", "0.05", "--seed", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(script), *common, "--batch-size", "16", "--out", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=240)
    assert two.returncode == 0, two.stdout + two.stderr
    assert len(ACCURACY.findall(two.stdout)) == 1, "only rank 0 prints"
    one = subprocess.run([sys.executable, str(script), *common, "--batch-size", "32", "--out", str(tmp_path / "one")],
                         env=env, capture_output=True, text=True, timeout=240)
    assert one.returncode == 0, one.stdout + one.stderr

    rank0, rank1 = (torch.load(tmp_path / "two" / f"rank{r}.pt") for r in (0, 1))
    single = torch.load(tmp_path / "one" / "rank0.pt")
    saved = checkpoint(tmp_path / "two" / "epoch_001.pt")["model"]  # written by rank 0 only
    for key, value in rank0.items():
        assert torch.equal(rank1[key], value), f"{key} differs between the ranks"
        assert torch.equal(saved[key], value), key
        # Same samples per step, gradients averaged over 2 x 16 instead of summed over 32
        # and divided: equal up to float32 rounding of the sums.
        torch.testing.assert_close(value, single[key], rtol=1e-4, atol=1e-5)


@pytest.fixture
def image_folder(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    generator = torch.Generator().manual_seed(0)
    root = tmp_path / "images"
    for label, name in enumerate(["circles", "stripes", "zeros"]):
        (root / name).mkdir(parents=True)
        for i in range(6):
            pixels = (torch.rand(9, 11, 3, generator=generator) * 80 + 80 * label).to(torch.uint8)
            Image.fromarray(pixels.numpy()).save(root / name / f"{i}.png")
        (root / name / "notes.txt").write_text("not an image: skipped")
    return root


def test_image_folder_with_freeze_ten_crop_ensemble_and_augment(image_folder, tmp_path, capsys):
    train_set, test_set, classes = fastcnn_train.load_image_folder(image_folder, channels=1, side=32)
    assert classes == ["circles", "stripes", "zeros"]
    assert train_set.tensors[0].shape[1:] == (1, 32, 32) and len(train_set) + len(test_set) == 18

    out = tmp_path / "run"
    accuracy = train(capsys, "--data", str(image_folder), "--epochs", "2", "--batch-size", "4", "--seed", "5",
                     "--freeze", "features.0", "--ten-crop", "--ensemble", "2", "--augment", "--out", str(out))
    assert 0.0 <= accuracy <= 1.0
    for member in range(2):
        state = checkpoint(out / f"member_{member}" / "epoch_002.pt")
        torch.manual_seed(5 + member)  # how _train_one initialises member `member`
        fresh = fastcnn_train.build_model("lenet5", 3)
        assert state["model"]["classifier.4.weight"].shape == (3, 84)
        assert torch.equal(state["model"]["features.0.weight"], fresh.features[0].weight), "frozen layer moved"
        assert not torch.equal(state["model"]["features.3.weight"], fresh.features[3].weight), "trained layer"


def test_transfer_from_weights_trained_on_another_data_set(image_folder, tmp_path, capsys):
    """--weights of LeNet-5 trained on the digits (10 classes), then the image folder's
    3 classes with everything up to the last hidden layer frozen: the frozen layers are
    the digits network's, the head is new and has 3 outputs."""
    train(capsys, "--epochs", "1", "--out", str(tmp_path / "digits"))
    source = tmp_path / "digits" / "epoch_001.pt"
    digits = checkpoint(source)["model"]
    out = tmp_path / "transfer"
    train(capsys, "--data", str(image_folder), "--weights", str(source), "--freeze", "classifier.2", "--epochs",
          "2", "--batch-size", "4", "--out", str(out))
    state = checkpoint(out / "epoch_002.pt")["model"]
    assert state["classifier.4.weight"].shape == (3, 84)
    for key in ("features.0.weight", "features.3.bias", "classifier.0.weight", "classifier.2.weight"):
        assert torch.equal(state[key], digits[key]), key
    model = fastcnn_train.build_model("lenet5", 10)
    assert fastcnn_train.load_pretrained(model, source) == []  # same classes: the head loads too
    assert torch.equal(model.classifier[4].weight, digits["classifier.4.weight"])
    with pytest.raises(SystemExit, match="does not fit LeNet5: missing: .*unexpected"):
        fastcnn_train.load_pretrained(model, _saved(tmp_path, {"conv.weight": torch.zeros(1)}))
    wide = dict(digits, **{"features.0.weight": torch.zeros(6, 3, 5, 5)})
    with pytest.raises(SystemExit, match="other shape: features.0.weight \\(6, 3, 5, 5\\)"):
        fastcnn_train.load_pretrained(model, _saved(tmp_path, wide))
    with pytest.raises(SystemExit, match="cannot read"):
        fastcnn_train.load_pretrained(model, tmp_path / "missing.pt")


def _saved(tmp_path, state) -> str:
    path = tmp_path / "state.pt"
    torch.save(state, path)
    return str(path)


def test_image_size(image_folder, tmp_path, capsys):
    train(capsys, "--data", str(image_folder), "--model", "resnet18", "--image-size", "16", "--epochs", "1",
          "--batch-size", "6", "--out", str(tmp_path / "resnet"))
    state = checkpoint(tmp_path / "resnet" / "epoch_001.pt")
    assert state["model"]["fc.weight"].shape == (3, 512) and state["args"]["image_size"] == 16
    with pytest.raises(SystemExit, match="lenet5 cannot take 28x28 images \\(--image-size\\)"):
        main(["train", "--image-size", "28", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--image-size must be positive"):
        main(["train", "--image-size", "0", "--out", str(tmp_path)])


def test_evaluate_ten_crop_of_an_ensemble_averages_its_members_probabilities():
    """--ten-crop with --ensemble: each image's score is the mean over crops and members of
    the members' probabilities (an ensemble's output is already a probability: softmax it
    again and the ranking can change)."""
    from fastcnn.inference import Ensemble, multi_crop
    torch.manual_seed(0)
    side, n = 8, 200
    members = [nn.Sequential(nn.Flatten(), nn.Linear(side * side, 10)).eval() for _ in range(2)]
    for m in members:
        nn.init.normal_(m[1].weight, std=2.0)
    images = torch.randn(n, 1, side, side)
    padded = F.pad(images, (1, 1, 1, 1), mode="replicate")  # evaluate's margin for side 8
    with torch.no_grad():
        expected = sum(multi_crop(m, padded, crops=10, size=side) for m in members) / 2
        softmaxed_twice = multi_crop(Ensemble(members), padded, crops=10, size=side)
    labels = expected.argmax(1)
    assert (softmaxed_twice.argmax(1) != labels).any(), "the case must tell the two apart"
    dataset = TensorDataset(images, labels)
    assert fastcnn_train.evaluate(members, dataset, torch.device("cpu"), 64, ten_crop=True) == 1.0


def test_evaluate_ten_crop_of_a_constant_model_output():
    model = fastcnn_train.build_model("lenet5", 10).eval()
    x = torch.randn(5, 1, 32, 32)
    dataset = torch.utils.data.TensorDataset(x, model(x).argmax(1))
    assert fastcnn_train.evaluate([model], dataset, torch.device("cpu"), 2) == 1.0
    assert 0.0 <= fastcnn_train.evaluate([model], dataset, torch.device("cpu"), 2, ten_crop=True) <= 1.0


def test_bad_inputs(tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit, match="--data"):
        main(["train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="no sub-folder"):
        main(["train", "--data", str(tmp_path), "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--resume: no checkpoint"):
        main(["train", "--resume", "--epochs", "1", "--out", str(tmp_path / "empty")])
    with pytest.raises(SystemExit, match="--ensemble"):
        main(["train", "--ensemble", "0", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--epochs must be at least 1"):
        main(["train", "--epochs", "0", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="unknown --model 'nosuch'"):
        main(["train", "--model", "nosuch", "--out", str(tmp_path)])
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(SystemExit, match="PIL"):
        main(["train", "--data", str(tmp_path), "--out", str(tmp_path)])
