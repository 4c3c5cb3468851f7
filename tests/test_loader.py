"""fastcnn.loader.PrefetchLoader: order and content kept, the worker runs ahead of the
consumer, exceptions reach the consumer, and stopping early leaves no thread behind.
No test depends on timing: the overlap is shown with events, and timeouts only turn a
hang into a failure."""

import threading
from collections import namedtuple

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from fastcnn.loader import PrefetchLoader, move_batch

WAIT_S = 10  # only reached when the behaviour under test is broken


def prefetch_threads():
    return [t for t in threading.enumerate() if t.name == "fastcnn-prefetch" and t.is_alive()]


@pytest.fixture(autouse=True)
def no_thread_left_behind():
    before = set(prefetch_threads())
    yield
    for thread in set(prefetch_threads()) - before:
        thread.join(WAIT_S)
        assert not thread.is_alive(), "a prefetch thread outlived its loader"


@pytest.mark.parametrize("prefetch", [1, 2, 5])
def test_order_and_content_of_a_dataloader(prefetch):
    x = torch.randn(37, 3, 4, 4)
    y = torch.arange(37)
    source = DataLoader(TensorDataset(x, y), batch_size=8)
    loader = PrefetchLoader(source, "cpu", prefetch=prefetch)
    assert len(loader) == len(source) == 5
    got = list(loader)
    assert len(got) == 5
    for (bx, by), (ex, ey) in zip(got, source):
        assert torch.equal(bx, ex) and torch.equal(by, ey)
    # A second pass starts again from the beginning.
    assert torch.equal(torch.cat([b[1] for b in loader]), y)


def test_nested_batches_and_no_device():
    Pair = namedtuple("Pair", "image label")
    batches = [{"a": (torch.tensor([i]), [torch.tensor(2 * i)]), "p": Pair(torch.ones(1) * i, i), "name": f"b{i}"}
               for i in range(4)]
    got = list(PrefetchLoader(batches))
    assert [b["name"] for b in got] == ["b0", "b1", "b2", "b3"]
    for i, b in enumerate(got):
        assert b["a"][0].item() == i and b["a"][1][0].item() == 2 * i
        assert isinstance(b["p"], Pair) and b["p"].label == i
    moved = move_batch(batches[1], torch.device("cpu"))
    assert moved["p"].image is batches[1]["p"].image  # on the CPU the copy is a no-op


def test_worker_runs_ahead_of_a_slow_consumer():
    produced = [threading.Event() for _ in range(6)]

    def source():
        for i in range(6):
            produced[i].set()
            yield torch.tensor(i)

    it = iter(PrefetchLoader(source(), prefetch=2))
    assert next(it).item() == 0
    # While the consumer still holds batch 0, the worker forms batches 1 and 2 (two
    # queued) and pulls batch 3 from the source, then waits for room.
    assert produced[3].wait(WAIT_S), "the worker did not prepare batches ahead"
    assert not produced[4].is_set()  # bounded: never more than prefetch + 1 ahead
    assert [b.item() for b in it] == [1, 2, 3, 4, 5]


def test_slow_source_and_slow_consumer_overlap():
    # The source cannot produce batch i + 1 until the consumer is working on batch i, and
    # the consumer does not finish batch i until batch i + 1 has been produced: only a
    # loader that fetches while the consumer works gets through without a hang.
    consuming = [threading.Event() for _ in range(5)]
    produced = [threading.Event() for _ in range(5)]

    def source():
        for i in range(5):
            if i > 0:
                assert consuming[i - 1].wait(WAIT_S)
            produced[i].set()
            yield i

    seen = []
    for i, batch in enumerate(PrefetchLoader(source(), prefetch=1)):
        consuming[i].set()
        if i + 1 < 5:
            assert produced[i + 1].wait(WAIT_S), f"batch {i + 1} was not prepared while batch {i} was consumed"
        seen.append(batch)
    assert seen == [0, 1, 2, 3, 4]


class Boom(RuntimeError):
    pass


def test_exception_in_source_reaches_the_consumer():
    def source():
        yield torch.zeros(1)
        yield torch.ones(1)
        raise Boom("bad batch 2")

    got = []
    with pytest.raises(Boom, match="bad batch 2"):
        for batch in PrefetchLoader(source(), "cpu"):
            got.append(batch)
    assert [b.item() for b in got] == [0.0, 1.0]


def test_exception_from_a_dataset_in_a_dataloader():
    class Broken(torch.utils.data.Dataset):
        def __len__(self):
            return 10

        def __getitem__(self, i):
            if i == 6:
                raise Boom(f"item {i}")
            return torch.tensor(i)

    with pytest.raises(Boom, match="item 6"):
        list(PrefetchLoader(DataLoader(Broken(), batch_size=2)))


def test_early_break_does_not_hang_and_closes_the_source():
    closed = threading.Event()

    def endless():
        try:
            i = 0
            while True:
                yield torch.tensor(i)
                i += 1
        finally:
            closed.set()

    for batch in PrefetchLoader(endless(), prefetch=3):
        if batch.item() == 4:
            break
    assert closed.wait(WAIT_S), "the source was not closed after the consumer stopped"


def test_close_is_idempotent_and_stops_the_iterator():
    it = iter(PrefetchLoader(range(100), prefetch=2))
    assert next(it) == 0
    it.close()
    it.close()
    with pytest.raises(StopIteration):
        next(it)


def test_len_of_an_unsized_source_raises():
    with pytest.raises(TypeError):
        len(PrefetchLoader(x for x in range(3)))


def test_bad_arguments():
    with pytest.raises(ValueError, match="prefetch"):
        PrefetchLoader([1, 2], prefetch=0)
    with pytest.raises(TypeError, match="source"):
        PrefetchLoader(42)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_target_pins_and_copies():
    x = torch.randn(20, 3)
    loader = PrefetchLoader(DataLoader(TensorDataset(x), batch_size=4), "cuda")
    assert loader.pin_memory
    got = torch.cat([b[0] for b in loader])
    assert got.device.type == "cuda"
    assert torch.equal(got.cpu(), x)
