"""Hand-computed checks of one round of each algorithm (Prepare / Execute / Assert).

Tiny linear split model: client Linear(4->3), server Linear(3->2), aux Linear(3->2); two clients
with one batch of 5 samples each, one local iteration, Adam's first step (which has a closed form).
Expected values are computed with the explicit formulas of tests/handcalc.py in float64.
"""
import pytest
import torch
from torch import nn

from fsl_fast.algorithms import ALGORITHM_CLASSES
from fsl_fast.config import Config
from fsl_fast.engines.reference import ReferenceEngine
from fsl_fast.ledger import Ledger
from fsl_fast.transport.local import InProcessChannel
from fsl_fast.models import LinearAux, SplitModel
from tests.handcalc import adam_first, align_grads, linear_ce

LR, WD = 1e-2, 1e-4


def _split():
    torch.manual_seed(7)
    client = nn.Linear(4, 3).double()
    server = nn.Linear(3, 2).double()
    aux = LinearAux(3, 2, pool=False).double()
    return SplitModel(client=client, server=server, aux=aux, cut_shape=(3,), num_classes=2)


def _batches():
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(5, 4, generator=g, dtype=torch.float64) for _ in range(2)]
    ys = [torch.tensor([0, 1, 1, 0, 1]), torch.tensor([1, 1, 0, 0, 0])]
    return xs, ys


def _run(algorithm, weights=(0.5, 0.5), **cfg_kw):
    split = _split()
    init = {k: {n: p.detach().clone() for n, p in getattr(split, k).state_dict().items()}
            for k in ("client", "server", "aux")}
    cfg = Config(algorithm=algorithm, lr=LR, weight_decay=WD, aux_lr=LR, clients=2, batch_size=5,
                 server_update_interval=1, align_interval=1, align_epochs=1, align_batch_size=1000,
                 buffer_size=1000, **cfg_kw).resolved()
    cls = ALGORITHM_CLASSES[algorithm]
    engine = ReferenceEngine(cfg, split, 2, cls, "cpu")
    xs, ys = _batches()
    loaders = [[(x, y)] for x, y in zip(xs, ys)]
    ledger = Ledger()
    algo = cls(cfg, engine, loaders, list(weights), InProcessChannel(cfg, ledger, engine))
    algo.run_round(0)
    return engine, init, xs, ys, ledger.end_round()


def _p(sd, name):
    return sd[name]


def test_fedavg_round_by_hand():
    # Prepare / Execute
    engine, init, xs, ys, rec = _run("fedavg", weights=(0.3, 0.7))
    W1, b1, W2, b2 = (init["client"]["weight"], init["client"]["bias"],
                      init["server"]["weight"], init["server"]["bias"])
    new = []
    for x, y in zip(xs, ys):
        z = x @ W1.T + b1
        dout, dW2, db2, dz = linear_ce(z, W2, b2, y)
        dW1, db1 = dz.T @ x, dz.sum(0)
        new.append([adam_first(W1, dW1, LR, WD), adam_first(b1, db1, LR, WD),
                    adam_first(W2, dW2, LR, WD), adam_first(b2, db2, LR, WD)])
    expect = [0.3 * a + 0.7 * b for a, b in zip(*new)]
    # Assert: the whole model is averaged with weights n_i/n, and broadcast back
    got = [engine.client_global.weight, engine.client_global.bias,
           engine.server_global.weight, engine.server_global.bias]
    for g, e in zip(got, expect):
        torch.testing.assert_close(g.detach(), e, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(engine.servers[1].weight.detach(), expect[2])
    assert rec["bytes_up_client_model"] == 2 * (12 + 3) * 8  # two clients, float64 tensors
    assert rec["bytes_up_server_model"] == 2 * (6 + 2) * 8


@pytest.mark.parametrize("algorithm", ["splitfed_v1", "splitfed_v2"])
def test_splitfed_round_by_hand(algorithm):
    engine, init, xs, ys, rec = _run(algorithm)
    W1, b1, W2, b2 = (init["client"]["weight"], init["client"]["bias"],
                      init["server"]["weight"], init["server"]["bias"])
    clients, servers = [], []
    sW, sb = W2, b2
    for x, y in zip(xs, ys):
        z = x @ W1.T + b1
        if algorithm == "splitfed_v1":  # each client has its own server copy, starting from init
            sW, sb = W2, b2
        _, dW2, db2, dz = linear_ce(z, sW, sb, y)  # gradient sent back uses the pre-step server
        sW, sb = adam_first(sW, dW2, LR, WD), adam_first(sb, db2, LR, WD)
        servers.append((sW, sb))
        clients.append((adam_first(W1, dz.T @ x, LR, WD), adam_first(b1, dz.sum(0), LR, WD)))
    cw = 0.5 * clients[0][0] + 0.5 * clients[1][0]
    torch.testing.assert_close(engine.client_global.weight.detach(), cw)
    if algorithm == "splitfed_v1":  # server copies averaged server-side
        sw = 0.5 * servers[0][0] + 0.5 * servers[1][0]
    else:  # one server stepped by client 0 then client 1 (Adam's second step is not closed-form:
        # check it through a second optimizer run instead of the formula)
        s = nn.Linear(3, 2).double()
        s.load_state_dict(init["server"])
        opt = torch.optim.Adam(s.parameters(), lr=LR, weight_decay=WD)
        for x, y in zip(xs, ys):
            z = x @ W1.T + b1
            _, dW2, db2, _ = linear_ce(z, s.weight.detach(), s.bias.detach(), y)
            s.weight.grad, s.bias.grad = dW2, db2
            opt.step()
        sw = s.weight.detach()
    torch.testing.assert_close(engine.server_global.weight.detach(), sw)
    assert rec["bytes_up_smashed"] == 2 * 5 * 3 * 8
    assert rec["bytes_down_gradients"] == 2 * 5 * 3 * 8
    assert rec["bytes_up_labels"] == 2 * 5 * 8
    assert rec["round_bytes_paper"] == rec["round_bytes"] - rec["bytes_up_labels"]


def test_cse_fsl_round_by_hand():
    engine, init, xs, ys, rec = _run("cse_fsl")
    W1, b1 = init["client"]["weight"], init["client"]["bias"]
    A, a = init["aux"]["fc.weight"], init["aux"]["fc.bias"]
    clients, auxes = [], []
    for x, y in zip(xs, ys):
        z = x @ W1.T + b1
        _, dA, da, dz = linear_ce(z, A, a, y)  # local loss trains client and aux together
        auxes.append((adam_first(A, dA, LR, 0.0), adam_first(a, da, LR, 0.0)))
        clients.append((adam_first(W1, dz.T @ x, LR, WD), adam_first(b1, dz.sum(0), LR, WD)))
    torch.testing.assert_close(engine.client_global.weight.detach(), 0.5 * (clients[0][0] + clients[1][0]))
    for aux in engine.auxes:  # auxiliaries are averaged too
        torch.testing.assert_close(aux.fc.weight.detach(), 0.5 * (auxes[0][0] + auxes[1][0]))
    assert rec["bytes_up_aux_model"] == 2 * (6 + 2) * 8
    assert rec["bytes_up_smashed"] == 2 * 5 * 3 * 8
    assert rec["bytes_down_gradients"] == 0


def test_fsl_sage_round_by_hand():
    """Client 0: upload, server step, align aux_0 on its 5-row buffer (one Adam step with the
    closed-form alignment gradient), estimate with the aligned aux, client step. Then client 1."""
    engine, init, xs, ys, rec = _run("fsl_sage")
    W1, b1 = init["client"]["weight"], init["client"]["bias"]
    A0, a0 = init["aux"]["fc.weight"], init["aux"]["fc.bias"]
    s = nn.Linear(3, 2).double()
    s.load_state_dict(init["server"])
    sopt = torch.optim.Adam(s.parameters(), lr=LR, weight_decay=WD)
    clients = []
    for k, (x, y) in enumerate(zip(xs, ys)):
        z = x @ W1.T + b1
        _, dW2, db2, _ = linear_ce(z, s.weight.detach(), s.bias.detach(), y)
        s.weight.grad, s.bias.grad = dW2, db2
        sopt.step()
        # refreshed targets with the updated server: d CE_mean(s(Z), Y)/dZ over the buffer
        _, _, _, T = linear_ce(z, s.weight.detach(), s.bias.detach(), y)
        dA, da, _ = align_grads(z, A0, a0, y, T, n=5)
        A, a = adam_first(A0, dA, LR, 0.0), adam_first(a0, da, LR, 0.0)
        torch.testing.assert_close(engine.auxes[k].fc.weight.detach(), A)
        torch.testing.assert_close(engine.auxes[k].fc.bias.detach(), a)
        _, _, _, g_hat = linear_ce(z, A, a, y)  # estimate from the aligned auxiliary
        clients.append((adam_first(W1, g_hat.T @ x, LR, WD), adam_first(b1, g_hat.sum(0), LR, WD)))
    torch.testing.assert_close(engine.client_global.weight.detach(), 0.5 * (clients[0][0] + clients[1][0]))
    torch.testing.assert_close(engine.server_global.weight.detach(), s.weight.detach())
    assert rec["bytes_down_aux_model"] == 2 * (6 + 2) * 8
    assert rec["bytes_down_gradients"] == 0


class _Recorder:
    """An engine stand-in that records the order of operations."""

    device = torch.device("cpu")

    def __init__(self):
        self.log = []

    def __getattr__(self, name):
        def call(*args, **kw):
            if name in ("client_forward", "aux_estimate", "aux_local_step"):
                self.log.append((name, tuple(args[0])))
                return [torch.zeros(2, 3) for _ in args[0]]
            if name == "server_step":
                self.log.append((name, args[0]))
                return torch.zeros(2, 3)
            if name == "align":
                self.log.append((name, tuple(args[0])))
            if name.endswith("_bytes"):
                return 8
            return None
        return call


@pytest.mark.parametrize("schedule", ["sequential", "parallel"])
def test_fsl_sage_schedule_order(schedule):
    """q=2, three iterations per client: uploads at iterations 0 and 2; alignment right after
    the iteration-0 upload(s) and before the iteration-0 client update."""
    cfg = Config(algorithm="fsl_sage", clients=2, server_update_interval=2, align_interval=1,
                 schedule=schedule, batch_size=2).resolved()
    eng = _Recorder()
    batch = (torch.zeros(2, 4), torch.zeros(2, dtype=torch.long))
    algo = ALGORITHM_CLASSES["fsl_sage"](cfg, eng, [[batch] * 3, [batch] * 3], [0.5, 0.5],
                                         InProcessChannel(cfg, Ledger(), eng))
    algo.run_round(0)
    log = [e for e in eng.log if e[0] != "aux_estimate"]
    if schedule == "sequential":
        expect = [("client_forward", (0,)), ("server_step", 0), ("align", (0,)),
                  ("client_forward", (0,)), ("client_forward", (0,)), ("server_step", 0),
                  ("client_forward", (1,)), ("server_step", 1), ("align", (1,)),
                  ("client_forward", (1,)), ("client_forward", (1,)), ("server_step", 1)]
    else:
        expect = [("client_forward", (0, 1)), ("server_step", 0), ("server_step", 1), ("align", (0, 1)),
                  ("client_forward", (0, 1)),
                  ("client_forward", (0, 1)), ("server_step", 0), ("server_step", 1)]
    assert log == expect


def test_parallel_clients_with_fewer_batches_finish_early():
    cfg = Config(algorithm="splitfed_v2", clients=2, schedule="parallel", batch_size=2).resolved()
    eng = _Recorder()
    batch = (torch.zeros(2, 4), torch.zeros(2, dtype=torch.long))
    algo = ALGORITHM_CLASSES["splitfed_v2"](cfg, eng, [[batch] * 3, [batch] * 1], [0.5, 0.5],
                                            InProcessChannel(cfg, Ledger(), eng))
    algo.run_round(0)
    fwd = [e for e in eng.log if e[0] == "client_forward"]
    assert fwd == [("client_forward", (0, 1)), ("client_forward", (0,)), ("client_forward", (0,))]
