"""Self-supervised learning (topic 7): pretext batches, NT-Xent, augmentations, probes, models."""

import math

import pytest
import torch
import torch.nn.functional as F

from course_utils import ssl


def _asymmetric_images(n=3):
    # one lit pixel per image at a different place: every quarter turn moves it somewhere new
    images = torch.zeros(n, 1, 28, 28)
    for i in range(n):
        images[i, 0, 2 + i, 5] = 1.0
    return images


def test_rotation_batch_labels_and_turns():
    images = _asymmetric_images()
    rotated, labels = ssl.rotation_batch(images)
    assert rotated.shape == (12, 1, 28, 28)
    assert labels.tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    for k in range(4):
        block = rotated[3 * k:3 * k + 3]
        assert torch.equal(torch.rot90(block, -k, dims=(2, 3)), images)  # turning back gives the digits
    # a quarter turn counter-clockwise sends the pixel at (row 2, col 5) to (row 28-1-5, col 2)
    assert rotated[3, 0, 22, 2] == 1.0 and rotated[3].sum() == 1.0
    assert len({tuple(rotated[3 * k].nonzero().flatten().tolist()) for k in range(4)}) == 4


def test_patch_mask_is_one_square_inside_the_margin():
    g = torch.Generator().manual_seed(0)
    mask = ssl.patch_mask(500, patch_size=12, margin=4, generator=g)
    assert mask.shape == (500, 1, 28, 28) and set(mask.unique().tolist()) == {0.0, 1.0}
    assert torch.all(mask.sum((1, 2, 3)) == 144)
    rows, cols = mask[:, 0].amax(2), mask[:, 0].amax(1)
    assert torch.all(rows.sum(1) == 12) and torch.all(cols.sum(1) == 12)  # a square, not scattered pixels
    for edge in (rows, cols):
        assert edge[:, :4].sum() == 0 and edge[:, 24:].sum() == 0
    assert len({tuple(r.nonzero()[0].tolist()) for r in rows}) == 9  # top rows 4..12: every one is used
    again = ssl.patch_mask(500, 12, margin=4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(mask, again)


def test_masked_reconstruction_loss_counts_only_the_hole():
    g = torch.Generator().manual_seed(1)
    target = torch.rand(4, 1, 28, 28, generator=g)
    mask = ssl.patch_mask(4, 10, generator=g)
    guess = torch.rand(4, 1, 28, 28, generator=g)
    expected = ((guess - target)[mask.bool()] ** 2).mean()
    assert torch.allclose(ssl.masked_reconstruction_loss(guess, target, mask), expected)
    wrong_outside = torch.where(mask.bool(), guess, guess + 5.0)
    assert torch.allclose(ssl.masked_reconstruction_loss(wrong_outside, target, mask), expected)
    right_inside = torch.where(mask.bool(), target, guess)
    assert ssl.masked_reconstruction_loss(right_inside, target, mask) == 0
    masked = ssl.mask_images(target, mask)
    hole = mask.bool()
    assert torch.all(masked[hole] == ssl.HOLE_FILL) and torch.equal(masked[~hole], target[~hole])


def _nt_xent_by_loops(z1, z2, temperature):
    z = torch.cat([z1, z2]).double()
    n2 = len(z)
    total = 0.0
    for i in range(n2):
        partner = (i + n2 // 2) % n2
        def sim(a, b):
            return float(z[a] @ z[b] / (z[a].norm() * z[b].norm())) / temperature
        denominator = sum(math.exp(sim(i, k)) for k in range(n2) if k != i)
        total += -math.log(math.exp(sim(i, partner)) / denominator)
    return total / n2


@pytest.mark.parametrize("temperature", [0.1, 0.5, 1.0])
def test_nt_xent_matches_a_direct_loop(temperature):
    g = torch.Generator().manual_seed(2)
    z1, z2 = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    loss = ssl.nt_xent(z1, z2, temperature)
    assert loss.shape == ()
    assert abs(float(loss) - _nt_xent_by_loops(z1, z2, temperature)) < 1e-5
    assert torch.allclose(ssl.nt_xent(3 * z1, 0.5 * z2, temperature), loss, atol=1e-6)  # cosine: scale-free
    assert torch.allclose(ssl.nt_xent(z2, z1, temperature), loss, atol=1e-6)  # both views are anchors


def test_nt_xent_rewards_aligned_positives():
    g = torch.Generator().manual_seed(3)
    z = F.normalize(torch.randn(64, 16, generator=g), dim=1)
    aligned = ssl.nt_xent(z, z + 0.01 * torch.randn(64, 16, generator=g), 0.1)
    shuffled = ssl.nt_xent(z, z[torch.randperm(64, generator=g)], 0.1)
    assert aligned < 0.5 < math.log(127) - 1 < shuffled  # 127 candidates: chance is log(2N-1)
    assert ssl.positive_retrieval(z, z) == 1.0


def test_augmentations_keep_shape_and_range_and_none_is_identity():
    images = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(4))
    for kind in ssl.AUGMENTATIONS:
        view = ssl.augment(images, kind, torch.Generator().manual_seed(0))
        assert view.shape == images.shape and view.min() >= 0 and view.max() <= 1
    assert torch.equal(ssl.augment(images, "none"), images)
    assert not torch.allclose(ssl.augment(images, "full", torch.Generator().manual_seed(0)),
                              ssl.augment(images, "full", torch.Generator().manual_seed(1)))
    identity = ssl.random_affine(images, degrees=0, scale=(1, 1), translate=0, shear=0)
    assert torch.allclose(identity, images, atol=1e-5)
    # a pure shift of 2*translate grid units = 28*translate pixels moves a lone pixel that far
    dot = torch.zeros(1, 1, 28, 28)
    dot[0, 0, 14, 14] = 1
    shifted = ssl.random_affine(dot, degrees=0, scale=(1, 1), translate=0.25, shear=0,
                                generator=torch.Generator().manual_seed(5))
    assert shifted.sum() > 0.5 and not torch.allclose(shifted, dot)
    erased = ssl.random_erasing(torch.ones(200, 1, 28, 28), probability=1.0, max_size=10,
                                generator=torch.Generator().manual_seed(6))
    holes = (erased == 0).sum((1, 2, 3))
    assert torch.all(holes >= 16) and torch.all(holes <= 100)


def test_probes_on_separable_and_clustered_toy_features():
    g = torch.Generator().manual_seed(7)
    centres = 6 * torch.randn(10, 8, generator=g)
    labels = torch.arange(10).repeat(60)
    features = centres[labels] + 0.3 * torch.randn(600, 8, generator=g)
    train, test = slice(0, 400), slice(400, 600)
    assert ssl.linear_probe(features[train], labels[train], features[test], labels[test]) == 1.0
    assert ssl.knn_accuracy(features[train], labels[train], features[test], labels[test], k=5) == 1.0
    noise = torch.randn(600, 8, generator=g)
    assert ssl.knn_accuracy(noise[train], labels[train], noise[test], labels[test], k=5) < 0.3


def test_knn_accuracy_matches_a_brute_force_vote():
    g = torch.Generator().manual_seed(8)
    train, test = torch.randn(80, 4, generator=g), torch.randn(30, 4, generator=g)
    train_labels = torch.randint(0, 3, (80,), generator=g)
    test_labels = torch.randint(0, 3, (30,), generator=g)
    correct = 0
    for x, y in zip(test, test_labels, strict=True):
        cos = F.cosine_similarity(train, x.unsqueeze(0))
        votes = torch.bincount(train_labels[cos.topk(7).indices], minlength=3)
        correct += int(votes.argmax() == y)
    assert ssl.knn_accuracy(train, train_labels, test, test_labels, k=7, chunk=8) == correct / 30


def test_labelled_subset_and_probe_report():
    labels = torch.arange(10).repeat(30)
    rows = ssl.labelled_subset(labels, 10, seed=0)
    assert torch.bincount(labels[rows]).tolist() == [10] * 10
    assert torch.equal(rows, ssl.labelled_subset(labels, 10, seed=0))
    assert not torch.equal(rows, ssl.labelled_subset(labels, 10, seed=1))
    assert len(ssl.labelled_subset(labels, 1000)) == 300  # capped at what each class has
    g = torch.Generator().manual_seed(9)
    features = 5 * torch.randn(10, 6, generator=g)[labels] + torch.randn(300, 6, generator=g)
    report = ssl.probe(features, labels, features[:50], labels[:50], labels_per_class=(2, 1000), draws=(3, 3))
    assert report["probe_2_labels"] == 20 and report["probe_2_draws"] == 3
    assert report["probe_1000_labels"] == 300 and report["probe_1000_draws"] == 1
    assert report["probe_1000_std"] == 0
    assert report["probe_1000"] == 1.0 and report["knn"] == 1.0


def test_frozen_features_do_not_depend_on_the_batch():
    torch.manual_seed(0)
    model = ssl.SimCLR(ssl.ConvEncoder(width=8))
    images = torch.rand(40, 1, 28, 28)
    model.train()
    model.pretext_loss(images, None)  # moves batch norm's running statistics away from their start
    alone = ssl.features_of(model.encoder, images[:1])
    together = ssl.features_of(model.encoder, images, batch_size=7)
    assert torch.allclose(alone[0], together[0], atol=1e-5)
    assert model.encoder.training  # restored after the frozen read
    assert together.shape == (40, 128) and not together.requires_grad


@pytest.mark.parametrize("variant", ssl.VARIANTS)
def test_every_method_takes_a_training_step(variant):
    config = ssl.ssl_config("smoke", variant)
    config["width"] = 8
    model = ssl.build_ssl(config)
    images, labels = torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,))
    before = [p.detach().clone() for p in model.encoder.parameters()]
    loss, extras = model.pretext_loss(images, labels, torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.encoder.parameters())
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.encoder.parameters(), strict=True))
    if variant == "context-encoder":
        critic_loss = model.critic_loss()
        critic_loss.backward()
        assert torch.isfinite(critic_loss) and "adversarial" in extras


def test_context_encoder_output_outside_the_hole_is_free():
    torch.manual_seed(0)
    model = ssl.ContextEncoder(ssl.ConvEncoder(width=8), patch_size=10)
    images = torch.rand(3, 1, 28, 28)
    mask = ssl.patch_mask(3, 10, generator=torch.Generator().manual_seed(0))
    guess = model(images, mask).detach().requires_grad_()
    ssl.masked_reconstruction_loss(guess, images, mask).backward()
    assert torch.all(guess.grad[~mask.bool()] == 0) and guess.grad[mask.bool()].abs().sum() > 0
    filled = model.inpaint(images, mask)
    assert torch.equal(filled[~mask.bool()], images[~mask.bool()])


def test_registered_method_trains_and_reports_probes(monkeypatch):
    monkeypatch.setenv("COURSE_BUDGET", "smoke")
    from course_utils import registry

    config = registry.training_config("rotation", "smoke")
    config["steps"] = 6
    spec = registry.get("rotation")
    model = spec.build(config)
    facts = spec.train(model, config, "cpu", progress=False)
    assert facts["train_steps"] == 6 and facts["stopped_by"] == "steps"
    metrics = spec.evaluate(model, config, "cpu")
    for n in ssl.LABELS_PER_CLASS:
        assert 0.1 <= metrics[f"probe_{n}"] <= 1.0
    assert metrics["probe_1000_labels"] == 2000  # smoke trains on 2,000 images: every label is used
    assert 0 <= metrics["knn"] <= 1 and 0 <= metrics["pretext"] <= 1
    assert metrics["feature_dim"] == 128
