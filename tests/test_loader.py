"""The on-device loader: augmentation semantics, pair sampling, epoch coverage, DDP sharding."""
import torch
import torch.nn.functional as F

from ipsd.data.loader import DeviceLoader
from ipsd.data.batch import Needs
from ipsd.rng import generator

from helpers import toy_data

CPU = torch.device("cpu")


def make(needs=Needs(), batch=8, world=1, rank=0, data=None, seed=0):
    return DeviceLoader(data or toy_data(), CPU, batch, needs, seed, rank, world)


def test_crop_flip_is_a_padded_crop_or_its_mirror():
    data = toy_data()
    loader = make(data=data)
    idx = torch.arange(12)
    out = loader.crop_flip(idx, generator(CPU, "t", 0))
    padded = F.pad(data.train_x[idx], (4, 4, 4, 4))
    seen_flip = set()
    for i in range(len(idx)):
        candidates = {(dy, dx, fl) for dy in range(9) for dx in range(9) for fl in (0, 1)
                      if torch.equal(out[i], (lambda c: c.flip(-1) if fl else c)(padded[i, :, dy:dy + 32, dx:dx + 32]))}
        assert candidates, f"image {i} is not a 4-px-padded crop (or mirror) of its source"
        seen_flip |= {c[2] for c in candidates}
    assert seen_flip == {0, 1}


def test_offsets_and_flips_are_uniform():
    data = toy_data(n_per_class=250)  # 1000 images
    data.train_x[:] = (torch.arange(32) * 7 + 10).to(torch.uint8)  # columns increase left to right, no zeros
    loader = make(data=data)
    out = loader.crop_flip(torch.arange(1000), generator(CPU, "t", 2))
    top_pad = (out[:, 0, :, 16] == 0).int().cumprod(1).sum(1)  # padding rows on top = 4 - dy for dy < 4
    dy_counts = torch.bincount(top_pad, minlength=5)
    expected = torch.tensor([5, 1, 1, 1, 1]) / 9 * 1000  # dy in 4..8 shows no top padding
    assert ((dy_counts - expected).abs() < 5 * expected.sqrt()).all(), dy_counts
    mid = out[:, 0, 16, 12:20].int()
    flipped = (mid[:, 1:] < mid[:, :-1]).all(1)
    assert (flipped | (mid[:, 1:] > mid[:, :-1]).all(1)).all()
    assert abs(flipped.sum().item() - 500) < 5 * 500 ** 0.5 / 2 * 2


def test_normalise_matches_formula():
    data = toy_data()
    loader = make(data=data)
    x = data.train_x[:5]
    mean, std = torch.tensor(data.mean).view(1, 3, 1, 1), torch.tensor(data.std).view(1, 3, 1, 1)
    torch.testing.assert_close(loader.normalise(x), (x.float() / 255 - mean) / std)


def test_epoch_covers_every_anchor_once_and_is_seeded():
    loader = make(batch=8)
    idx = torch.cat([b.index for b in loader.epoch(1)])
    assert sorted(idx.tolist()) == list(range(40))
    assert len(loader) == 5
    again = torch.cat([b.index for b in make(batch=8).epoch(1)])
    other = torch.cat([b.index for b in loader.epoch(2)])
    assert torch.equal(idx, again) and not torch.equal(idx, other)
    b1, b2 = next(make(batch=8).epoch(1)), next(make(batch=8).epoch(1))
    assert torch.equal(b1.x, b2.x)


def test_last_batch_is_kept():
    loader = make(batch=16)  # 40 images -> 16, 16, 8
    sizes = [len(b.y) for b in loader.epoch(1)]
    assert sizes == [16, 16, 8] and len(loader) == 3


def test_pairs_same_class_never_self_and_uniform():
    data = toy_data(n_per_class=5, classes=4)
    loader = make(Needs(pairs=True), batch=20, data=data)
    hits = torch.zeros(20, 20)
    for e in range(1, 301):
        for b in loader.epoch(e):
            assert torch.equal(data.train_y[b.partner_index], b.y)
            assert (b.partner_index != b.index).all()
            hits.index_put_((b.index, b.partner_index), torch.ones(len(b.y)), accumulate=True)
    # each anchor draws its 4 classmates with probability 1/4 each: 300 draws -> 75 expected
    for i in range(20):
        mates = [j for j in range(20) if j // 5 == i // 5 and j != i]
        assert hits[i, mates].sum() == 300
        assert ((hits[i, mates] - 75).abs() < 5 * 75 ** 0.5).all(), hits[i, mates]


def test_self_pairs_allowed_when_asked():
    data = toy_data(n_per_class=2, classes=2)
    loader = make(Needs(pairs=True, self_pairs=True), batch=4, data=data)
    same = sum(int((b.partner_index == b.index).sum()) for e in range(1, 201) for b in loader.epoch(e))
    assert 300 < same < 500  # 800 draws with probability 1/2


def test_partners_and_views_are_augmented_independently():
    loader = make(Needs(pairs=True, views=2), batch=40)
    b = next(loader.epoch(1))
    assert b.view2 is not None and not torch.equal(b.view2, b.x)
    assert b.partner.shape == b.x.shape


def test_ddp_shards_are_disjoint_and_union_is_the_global_batch():
    single = list(make(Needs(pairs=True), batch=8).epoch(3))
    ranks = [list(make(Needs(pairs=True), batch=8, world=2, rank=r).epoch(3)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == len(single)
    all0 = torch.cat([b.index for b in ranks[0]])
    all1 = torch.cat([b.index for b in ranks[1]])
    assert not set(all0.tolist()) & set(all1.tolist())
    for k, ref in enumerate(single):
        union = torch.cat([ranks[0][k].index, ranks[1][k].index])
        assert sorted(union.tolist()) == sorted(ref.index.tolist())
        pairs = dict(zip(torch.cat([ranks[0][k].index, ranks[1][k].index]).tolist(),
                         torch.cat([ranks[0][k].partner_index, ranks[1][k].partner_index]).tolist()))
        assert pairs == dict(zip(ref.index.tolist(), ref.partner_index.tolist()))


def test_ddp_drops_the_remainder_only():
    data = toy_data(n_per_class=10, classes=3)  # 30 images, world 4 -> 28 used, 7 per rank
    shards = [torch.cat([b.index for b in make(batch=4, world=4, rank=r, data=data).epoch(1)]) for r in range(4)]
    assert all(len(s) == 7 for s in shards)
    assert len(set(torch.cat(shards).tolist())) == 28


def test_test_batches_shard_the_test_set():
    data = toy_data()
    parts = [torch.cat([y for _, y in make(world=2, rank=r, batch=8, data=data).test_batches(3)]) for r in (0, 1)]
    assert torch.equal(torch.cat(parts), data.test_y)
