import pytest
import torch


@pytest.fixture(scope="session")
def trained_mlp():
    """A small float64 MLP trained on separable synthetic 3-class data, with 32 test points."""
    torch.manual_seed(0)
    X = torch.rand(512, 1, 4, 4, dtype=torch.float64)
    f = X.flatten(1)
    Y = (f[:, :8].sum(1) > f[:, 8:].sum(1)).long() + (f[:, 0] > 0.7).long()
    model = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32), torch.nn.ReLU(),
        torch.nn.Linear(32, 3),
    ).double()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(300):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(X), Y).backward()
        opt.step()
    return model.eval(), X[:32], Y[:32]
