import pytest
import torch

from training.preprocess import Preprocess


@pytest.mark.parametrize(("model", "channels"), [("cnn", 1), ("cnn", 3), ("resnet18", 1), ("resnet18", 3)])
def test_forward_shapes(new_classifier, model, channels):
    net = new_classifier(model, channels, classes=7).eval()
    for shape in [(2, channels, 8, 8), (3, 3, 40, 30)]:  # native input, and RGB uploads of another size
        images = torch.randint(0, 256, shape, dtype=torch.uint8)
        assert net(images).shape == (shape[0], 7)


def test_one_training_step_lowers_the_loss(new_classifier):
    torch.manual_seed(0)
    net = new_classifier(augment=False)
    images = torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8)
    labels = torch.arange(16) % 10
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(2):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(images), labels)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[1] < losses[0]


def test_augmentation_switch(new_classifier):
    assert new_classifier(augment=False).augment is None
    net = new_classifier(augment=True)
    images = torch.rand(8, 1, 8, 8)
    out = net.augment(images)
    assert out.shape == images.shape
    assert not torch.allclose(out, images)


def test_preprocess_gray_equals_rgb_of_equal_channels():
    pre = Preprocess(8, [0.3], [0.4])
    gray = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    rgb = gray.expand(-1, 3, -1, -1)
    assert torch.allclose(pre(gray), pre(rgb), atol=1e-5)
    out = pre(gray)
    assert out.shape == (4, 1, 8, 8)
    assert torch.allclose(out, (gray.float() / 255 - 0.3) / 0.4, atol=1e-6)
    assert pre(torch.zeros(2, 3, 64, 48, dtype=torch.uint8)).shape == (2, 1, 8, 8)
