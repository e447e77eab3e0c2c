import pytest
import torch

from certorch.data import load


@pytest.fixture(scope="session")
def trained_digits_net():
    """A small MLP trained naturally on the bundled 8x8 digits (float64), with its test data."""
    torch.manual_seed(0)
    train, test = load("digits", "train"), load("digits", "test")
    model = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32), torch.nn.ReLU(),
        torch.nn.Linear(32, 10),
    ).double()
    X, Y = train.images.double(), train.labels
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(150):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(X), Y).backward()
        opt.step()
    model.eval()
    return model, test.images.double(), test.labels
