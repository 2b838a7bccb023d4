"""Privacy: DP-SGD (Opacus) for a site's local round, per-site budgets, persistent cumulative accounting, declines
that never overspend and never stop the run, the server's privacy records and ledger."""

from __future__ import annotations

import json
import math
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from fedtextseg.errors import BudgetExhaustedError, ConfigError, FedTextSegError
from fedtextseg.losses import PartialLabelLoss
from fedtextseg.models import create_model
from fedtextseg.privacy import (SiteLedger, SitePrivacy, epsilon_for, plan_noise_multiplier, resolve_settings,
                                screen_eval_summary, split_declined, write_privacy_ledger)
from fedtextseg.privacy.dpsgd import PerSampleMean, make_private, poisson_loader, validate_model
from fedtextseg.vocab import get_vocabulary
from conftest import make_bank

PATCH = (8, 32, 32)  # a patch cdpdnet_tiny takes with a 2x2 DINO token grid




def tiny_cdpdnet(**overrides) -> nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = create_model("cdpdnet_tiny", **make_bank(), **overrides)
    with torch.no_grad():  # FiLM and TTPG modulation start at zero: give every layer a gradient worth comparing
        g = torch.Generator().manual_seed(1)
        for p in model.parameters():
            if p.requires_grad and not p.abs().sum():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.train()


# ----------------------------------------------------------------------------- Opacus compatibility
def test_validator_accepts_every_model_config():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        validate_model(tiny_cdpdnet())
        validate_model(create_model("cdpdnet_small", dino={"weights": None}, **make_bank()).train())
        with torch.device("meta"):  # the paper's size without allocating it
            paper = create_model("cdpdnet_paper", dino={"weights": None}, **make_bank())
        assert next(paper.parameters()).device.type == "meta"
        validate_model(paper.train())
        validate_model(create_model("tgcnet_tiny").train())
    with pytest.raises(FedTextSegError, match="BatchNorm"):
        validate_model(nn.Sequential(nn.Conv3d(1, 2, 3), nn.BatchNorm3d(2)))


def _volume_dataset(n_volumes: int, crops: int, seed: int = 0, model=None, patch: tuple = PATCH) -> list:
    """Items as the training pipeline makes them: a list of ``crops`` patch dicts per volume (with the frozen DINOv2
    features of each patch precomputed, as the site's feature cache provides them)."""
    vocab = get_vocabulary()
    g = torch.Generator().manual_seed(seed)
    annotated = torch.zeros(vocab.num_classes)
    annotated[[vocab.class_names.index("liver"), vocab.class_names.index("liver tumor")]] = 1.0
    items = []
    for v in range(n_volumes):
        items.append([{"image": torch.rand(1, *patch, generator=g),
                       "label": (torch.rand(vocab.num_classes, *patch, generator=g) > 0.7).to(torch.uint8),
                       "annotated": annotated.clone(), "task": 1, "case_id": f"vol{v}"} for _ in range(crops)])
    if model is not None:
        with torch.no_grad():
            for crop in (c for volume in items for c in volume):
                if model.dino is not None:
                    crop["dino"] = model.dino_features(crop["image"][None])[0]
    return items


def _one_dp_step(model, dataset, loss_fn, mode, clip):
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    parts = make_private(model, dataset, optimizer, loss_fn, noise_multiplier=0.0, max_grad_norm=clip,
                         sample_rate=1.0, steps=1, mode=mode, sampler_seed=0, noise_seed=0)
    try:
        parts.train_steps(steps=1, device="cpu", precision="fp32")
    finally:
        parts.close()
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())  # hooks and attributes removed
    return {n: before[n] - p.detach() for n, p in model.named_parameters() if p.requires_grad}  # = lr * grad


def _crop_grads(model, dataset, loss_fn):
    """Per crop, the gradient of the loss of that crop alone (plain autograd, no Opacus)."""
    out = []
    for volume in dataset:
        grads = []
        for crop in volume:
            model.zero_grad(set_to_none=True)
            batch = {"image": crop["image"][None], "task": torch.tensor([crop["task"]])}
            if "dino" in crop:
                batch["dino"] = crop["dino"][None]
            logits = model.forward_batch(batch)["logits"]
            loss_fn(logits, crop["label"][None], crop["annotated"][None]).backward()
            grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
        out.append(grads)
    model.zero_grad(set_to_none=True)
    return out


def _volume_grads(model, dataset, loss_fn):
    """Per volume, the gradient of the mean loss over its crops from ONE pass over them (plain autograd)."""
    from monai.data import list_data_collate

    out = []
    for volume in dataset:
        model.zero_grad(set_to_none=True)
        batch = list_data_collate(volume)
        PerSampleMean(loss_fn)(model.forward_batch(batch)["logits"], batch["label"], batch["annotated"]).backward()
        out.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    model.zero_grad(set_to_none=True)
    return out


def _scaled_volumes(crop_grads: list) -> list:
    """Per volume, the mean of its crops' gradients."""
    return [_scaled(_sum(v), 1 / len(v)) for v in crop_grads]


def _norm(g: dict) -> float:
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in g.values())))


def _scaled(g: dict, s: float) -> dict:
    return {k: v * s for k, v in g.items()}


def _sum(gs: list) -> dict:
    return {k: sum(g[k] for g in gs) for k in gs[0]}


@pytest.mark.filterwarnings("ignore:Full backward hook")
@pytest.mark.parametrize("mode", ["microbatch", "hooks", "fast"])
def test_dp_step_clips_per_volume_through_forward_batch(mode):
    """One DP-SGD step (no noise) = the clipped per-VOLUME gradients summed, over the expected batch size.

    The loss couples samples (batch Dice): the per-sample wrapper must decompose it. microbatch and hooks: a
    volume's gradient is the mean over its crops, clipped to C (microbatch from one pass per volume, hooks from
    Opacus' per-sample gradients); fast: each crop is clipped to C, the volume takes their mean (the CNN+text model
    there, to keep the test short)."""
    overrides = {} if mode == "hooks" else {"dino": {"enabled": False}}
    model = tiny_cdpdnet(**overrides)
    reference = tiny_cdpdnet(**overrides)
    loss_fn = PartialLabelLoss("masked", batch_dice=True)
    dataset = _volume_dataset(n_volumes=2, crops=2, model=reference)
    crop_grads = _crop_grads(reference, dataset, loss_fn)
    clip = 0.5 * min(_norm(g) for v in crop_grads for g in v)  # every volume and crop gets clipped
    if mode != "fast":
        volumes = [_scaled(g, min(1.0, clip / (_norm(g) + 1e-6))) for g in _scaled_volumes(crop_grads)]
    else:
        volumes = [_scaled(_sum([_scaled(g, min(1.0, clip / (_norm(g) + 1e-6))) for g in v]), 1 / len(v))
                   for v in crop_grads]
    expected = _scaled(_sum(volumes), 1 / len(dataset))  # expected batch size = q * N = N volumes
    got = _one_dp_step(model, dataset, loss_fn, mode, clip)
    assert _norm(got) <= clip * 1.0001  # the average of clipped volume gradients stays within C
    scale = max(float(w.abs().max()) for w in expected.values())
    for name, want in expected.items():
        torch.testing.assert_close(got[name], want, rtol=2e-3, atol=1e-3 * scale, msg=lambda m, n=name: f"{n}: {m}")
    diff = _norm({k: got[k] - expected[k] for k in expected})
    # float32's own noise, measured: the same volume gradients from one pass over the volume's crops (what the DP
    # step runs) instead of one pass per crop. With DINOv2 the FiLM/gate gradients are sums that nearly cancel, and
    # this noise reached 0.4 % on an AMD EPYC (torch 2.14); the DP step must agree to within twice it.
    floor = max(_norm({k: a[k] - b[k] for k in a}) / _norm(a)
                for a, b in zip(_volume_grads(reference, dataset, loss_fn), _scaled_volumes(crop_grads)))
    # fast clipping computes per-crop norms from unfolded conv inputs in float32 and runs a second backward pass:
    # its clip factors agree to ~0.1 %, which sums to ~0.2 % over the model (torch 2.14 / Opacus 1.6)
    assert diff < max(1e-3 if mode != "fast" else 5e-3, 2 * floor) * _norm(expected)


def test_microbatch_mode_clips_the_whole_objective_at_the_runs_precision():
    """microbatch: distillation and FedProx stay available, bf16 autocast stays on (the clipped values are the float32
    parameter gradients), and the step still moves by at most C (no noise, SGD lr 1, every volume clipped)."""
    import copy

    from fedtextseg.losses import ConditionalDistillation

    model = tiny_cdpdnet(dino={"enabled": False})
    teacher = copy.deepcopy(model).eval()
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    # depth 24 -> 12 -> 6 -> 3: no level 2 voxels deep, whose bf16 weight gradients torch 2.14 gets wrong on some
    # CPUs (fedtextseg.bf16_check); where the check still fails, the step runs in fp32 and says so
    dataset = _volume_dataset(n_volumes=3, crops=2, patch=(24, 32, 32))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    clip = 1e-3
    parts = make_private(model, dataset, optimizer, PartialLabelLoss("masked"), noise_multiplier=0.0,
                         max_grad_norm=clip, sample_rate=1.0, steps=1, distill_fn=ConditionalDistillation(),
                         teacher=teacher, prox_mu=0.0, sampler_seed=0, noise_seed=0)
    assert parts.mode == "microbatch" and parts.model is model  # no Opacus wrapper, no hooks
    try:
        stats = parts.train_steps(steps=1, device="cpu", precision="bf16", distill_weight=1.0)
    finally:
        parts.close()
    assert math.isfinite(stats.loss) and stats.samples == 6
    from fedtextseg.bf16_check import cpu_bf16_trains_correctly
    from monai.data import list_data_collate

    assert stats.precision == ("bf16" if cpu_bf16_trains_correctly(model, list_data_collate(dataset[0]))[0] else "fp32")
    moved = {n: before[n] - p.detach() for n, p in model.named_parameters() if p.requires_grad}
    # 3 volumes, each clipped to C, summed and divided by the expected batch size (3): at most C, and every volume
    # was clipped, so the step is a real one
    assert 0.1 * clip < _norm(moved) <= clip * 1.0001
    assert not any(hasattr(p, "grad_sample") or hasattr(p, "summed_grad") for p in model.parameters())


def _first_pass_scaled(model, factor: float) -> None:
    """Multiply every gradient of the first backward pass (the first volume's, in microbatch mode) by ``factor``."""
    for p in model.parameters():
        if p.requires_grad:
            calls = [0]

            def hook(g, calls=calls):
                calls[0] += 1
                return g * factor if calls[0] == 1 else g
            p.register_hook(hook)


def test_a_volume_with_a_non_finite_gradient_adds_nothing_to_the_step(caplog):
    """Opacus would give it NaN weights (poisoning the model) or, for an inf norm, drop it silently; it adds nothing,
    the rest of the step is untouched and the site's log says which volume."""
    dataset = _volume_dataset(n_volumes=2, crops=1)
    broken, dropped = tiny_cdpdnet(dino={"enabled": False}), tiny_cdpdnet(dino={"enabled": False})
    _first_pass_scaled(broken, float("nan"))
    _first_pass_scaled(dropped, 0.0)
    with caplog.at_level("WARNING", logger="fedtextseg.privacy.dpsgd"):
        got = _one_dp_step(broken, dataset, PartialLabelLoss("masked"), "microbatch", 1e-3)
    assert "volume(s) [0]" in caplog.text and "non-finite gradient" in caplog.text
    want = _one_dp_step(dropped, dataset, PartialLabelLoss("masked"), "microbatch", 1e-3)
    assert all(torch.isfinite(t).all() for t in got.values()) and _norm(want) > 0
    for name in want:
        torch.testing.assert_close(got[name], want[name])


@pytest.mark.filterwarnings("ignore:Full backward hook")
def test_ghost_mode_says_clearly_that_cdpdnet_is_not_supported():
    model = tiny_cdpdnet()
    with pytest.raises(ConfigError, match="ghost .*fast"):
        _one_dp_step(model, _volume_dataset(2, 1, model=model), PartialLabelLoss("masked"), "ghost", 1.0)


def test_per_sample_mean_decomposes_a_batch_coupled_loss():
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 5, 5)
    target = (torch.rand(3, 4, 5, 5) > 0.5).float()
    annotated = torch.tensor([[1.0, 1, 0, 0]] * 3)
    coupled = PartialLabelLoss("masked", batch_dice=True)
    wrapped = PerSampleMean(coupled)
    single = [PartialLabelLoss("masked", batch_dice=False)(logits[i:i + 1], target[i:i + 1], annotated[i:i + 1])
              for i in range(3)]
    torch.testing.assert_close(wrapped(logits, target, annotated), torch.stack(single).mean())
    assert not torch.allclose(coupled(logits, target, annotated), torch.stack(single).mean())
    assert wrapped(logits[:0], target[:0], annotated[:0]).item() == 0.0
    known = torch.rand(3, 1, 5, 5) > 0.3  # a site's ignored voxels are cut by row like the targets
    single = [coupled(logits[i:i + 1], target[i:i + 1], annotated[i:i + 1], known=known[i:i + 1]) for i in range(3)]
    torch.testing.assert_close(wrapped(logits, target, annotated, known=known), torch.stack(single).mean())


# ----------------------------------------------------------------------------- accounting
def _analytic_gaussian_rdp_epsilon(sigma: float, steps: int, delta: float) -> float:
    """Independent: RDP of the full-batch Gaussian mechanism, alpha*T/(2 sigma^2), and the RDP->DP conversion of
    Balle et al. 2020 (Opacus' conversion), minimised over Opacus' default orders."""
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    best = math.inf
    for a in orders:
        rdp = a * steps / (2 * sigma ** 2)
        eps = rdp + math.log1p(-1 / a) - (math.log(delta) + math.log(a)) / (a - 1)
        best = min(best, eps)
    return best


def test_epsilon_matches_independent_computations():
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    history = [[1.1, 0.25, 5], [1.1, 0.25, 5], [0.9, 0.5, 3]]
    for sigma, q, steps in history:  # the accountant fed step by step, as Opacus' optimizer hook would
        for _ in range(steps):
            acc.step(noise_multiplier=sigma, sample_rate=q)
    assert epsilon_for(history, 1e-5) == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)
    assert epsilon_for([[2.0, 1.0, 10]], 1e-5) == pytest.approx(_analytic_gaussian_rdp_epsilon(2.0, 10, 1e-5),
                                                                rel=1e-6)
    prv = epsilon_for(history, 1e-5, "prv")
    assert 0 < prv <= epsilon_for(history, 1e-5) * 1.01  # PRV is the tighter accountant
    assert epsilon_for([], 1e-5) == 0.0


def test_planned_noise_reaches_the_target_for_the_planned_steps():
    sigma = plan_noise_multiplier(4.0, 1e-5, 0.5, 30)  # Opacus' get_noise_multiplier
    assert 3.95 <= epsilon_for([[sigma, 0.5, 30]], 1e-5) <= 4.0
    # a plan made in the middle of a run: the remaining steps fit what the steps taken left of the budget
    past = [[6.0, 1.0, 10]]
    sigma2 = plan_noise_multiplier(4.0, 1e-5, 1.0, 20, history=past)
    assert 3.95 <= epsilon_for(past + [[sigma2, 1.0, 20]], 1e-5) <= 4.0
    with pytest.raises(FedTextSegError, match="whole budget"):
        plan_noise_multiplier(0.5, 1e-5, 1.0, 20, history=[[0.5, 1.0, 50]])


def test_ledger_persists_and_refuses_silent_resets(tmp_path):
    led = SiteLedger.open("run-1", "hospital a", ledger_dir=tmp_path)
    led.record_round(1, 1.0, 0.5, 4)
    led.save()
    again = SiteLedger.open("run-1", "hospital a", ledger_dir=tmp_path)  # e.g. a fresh ClientApp process
    assert again.history == [[1.0, 0.5, 4]] and again.epsilon() == pytest.approx(led.epsilon())
    assert SiteLedger.open("run-2", "hospital a", ledger_dir=tmp_path).history == []  # another run's ledger
    with pytest.raises(FedTextSegError, match="accountant"):
        SiteLedger.open("run-1", "hospital a", accountant="prv", ledger_dir=tmp_path)
    again.path.write_text("{not json")
    with pytest.raises(FedTextSegError, match="not reset"):
        SiteLedger.open("run-1", "hospital a", ledger_dir=tmp_path)


# ----------------------------------------------------------------------------- settings
def test_settings_precedence_and_site_budgets():
    run = {"enabled": False, "target_delta": 1e-5, "max_grad_norm": 1.0}
    assert not resolve_settings(run).enabled
    s = resolve_settings(run, {"target_epsilon": 3.0}, site_name="b")  # a site turns DP on for itself
    assert s.enabled and s.target_epsilon == 3.0 and s.planned and s.source["target_epsilon"] == "site.yaml"
    s = resolve_settings({**run, "enabled": True, "noise_multiplier": 1.2, "target_epsilon": 8.0},
                         {"target_epsilon": 2.0}, {"privacy-max-grad-norm": "0.5", "privacy-delta": "1e-6"})
    assert s.noise_multiplier is None and s.target_epsilon == 2.0  # the site's target beats a run-level sigma
    assert s.max_grad_norm == 0.5 and s.target_delta == 1e-6 and s.source["max_grad_norm"] == "node-config"
    s = resolve_settings({**run, "enabled": True, "target_epsilon": 8.0}, None,
                         {"privacy-noise-multiplier": 2.0})
    assert s.noise_multiplier == 2.0 and s.target_epsilon == 8.0  # fixed noise, the target caps the spending
    assert not s.report_train_loss and resolve_settings(run).report_train_loss
    with pytest.raises(ConfigError, match="needs a budget"):
        resolve_settings({"enabled": True})
    with pytest.raises(ConfigError, match="unknown key"):
        resolve_settings(run, {"epsilon": 1.0}, site_name="b")
    with pytest.raises(ConfigError, match="noise_multiplier must be > 0"):
        resolve_settings({"enabled": True}, {"noise_multiplier": 0})
    with pytest.raises(ConfigError, match="target_delta"):
        resolve_settings({"enabled": True, "target_epsilon": 1.0, "target_delta": 2})


def test_screen_eval_summary_suppresses_small_samples_and_rounds():
    cfg = {"privacy": {"min_samples_for_metrics": 3, "metric_decimals": 2}}
    summary = {"liver": {"dice": 0.876543, "hd95": float("nan")}}
    assert screen_eval_summary(cfg, summary, 2) == {}
    assert screen_eval_summary(cfg, summary, 3)["liver"]["dice"] == 0.88
    assert screen_eval_summary({}, summary, 1)["liver"]["dice"] == 0.876543


# ----------------------------------------------------------------------------- a site's private rounds
class _Toy(nn.Module):
    """A tiny engine-contract model: logits [B, 3, 4] from a 6-feature image."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(6, 12)
        self.frozen = nn.Linear(6, 6).requires_grad_(False)

    def forward_batch(self, batch):
        return {"logits": self.lin(self.frozen(batch["image"])).reshape(-1, 3, 4)}


def _toy_runner(n_volumes: int = 8, batch_size: int = 2):
    g = torch.Generator().manual_seed(0)
    ds = [{"image": torch.randn(6, generator=g), "label": (torch.rand(3, 4, generator=g) > 0.5).float(),
           "annotated": torch.tensor([1.0, 1.0, 0.0]), "case_id": f"c{i}"} for i in range(n_volumes)]
    cfg = SimpleNamespace(train=SimpleNamespace(batch_size=batch_size))
    return SimpleNamespace(model=_Toy(), data=SimpleNamespace(train_ds=ds), cfg=cfg)


def _round(privacy: SitePrivacy, runner, round_: int, total: int, steps: int = 3):
    model = runner.model
    kwargs = dict(loss_fn=PartialLabelLoss("masked"), steps=steps, device="cpu", precision="fp32", grad_clip=1.0,
                  prox_mu=0.0, prox_reference=None, teacher=None, distill_fn=None, distill_weight=0.0, log_every=0,
                  label="toy", optimizer=torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1))
    return privacy.train_round(runner, round_=round_, total_rounds=total, train_kwargs=kwargs)


def _site_privacy(tmp_path, run_key="run-x", site="toy", **privacy):
    s = resolve_settings({"enabled": True, "ledger_dir": str(tmp_path), **privacy}, train_batch_size=2,
                         site_name=site)
    return SitePrivacy(s, site, run_key)


@pytest.mark.filterwarnings("ignore:Full backward hook")
def test_cumulative_epsilon_grows_monotonically_and_matches_an_independent_accountant(tmp_path):
    from opacus.accountants import RDPAccountant

    runner = _toy_runner()
    eps, acc = [], RDPAccountant()
    for round_ in (1, 2, 3):
        privacy = _site_privacy(tmp_path, target_epsilon=20.0)  # a fresh object each round: the ledger is on disk
        stats = _round(privacy, runner, round_, 3)
        m = stats.as_metrics()
        assert m["privacy/declined"] == 0 and "train_loss" not in m  # the private loss is not reported
        for _ in range(3):
            acc.step(noise_multiplier=m["privacy/noise_multiplier"], sample_rate=m["privacy/sample_rate"])
        assert m["privacy/epsilon"] == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)
        assert m["privacy/steps"] == 3 * round_ and m["privacy/sample_rate"] == pytest.approx(2 / 8)
        eps.append(m["privacy/epsilon"])
    assert eps[0] < eps[1] < eps[2] <= 20.0  # planned for 3 rounds x 3 steps: the budget is used, not exceeded
    assert eps[2] > 19.5
    led = json.loads((tmp_path / "run-x" / "toy.json").read_text())
    assert [r["status"] for r in led["rounds"]] == ["done"] * 3 and led["epsilon"] == pytest.approx(eps[2])


@pytest.mark.filterwarnings("ignore:Full backward hook")
def test_a_site_declines_instead_of_overspending(tmp_path):
    runner = _toy_runner()
    privacy = _site_privacy(tmp_path, target_epsilon=6.0, noise_multiplier=1.0)  # fixed noise, budget caps it
    spent = []
    for round_ in range(1, 6):
        before = {n: p.detach().clone() for n, p in runner.model.named_parameters()}
        m = _round(privacy, runner, round_, 5).as_metrics()
        spent.append(m["privacy/epsilon"])
        assert m["privacy/epsilon"] <= 6.0
        if m["privacy/declined"]:
            assert m["train_steps"] == 0 and m["privacy/epsilon_if_trained"] > 6.0
            assert all(torch.equal(p, before[n]) for n, p in runner.model.named_parameters())  # nothing trained
    declined_from = next(i for i, e in enumerate(spent) if i and e == spent[i - 1])
    assert 1 <= declined_from < 4 and spent[declined_from:] == [spent[declined_from]] * (5 - declined_from)
    ledger = privacy.ledger()
    with pytest.raises(BudgetExhaustedError, match="budget exhausted.*declines"):
        ledger.check(1.0, 0.25, 3, 6.0)
    assert sum(r["declined"] for r in ledger.rounds) == 5 - declined_from


@pytest.mark.filterwarnings("ignore:Full backward hook")
@pytest.mark.parametrize("mode", ["microbatch", "hooks"])
@pytest.mark.parametrize("sigma", [0.0, 1.0])
def test_empty_poisson_batches_are_steps_with_noise_only(sigma, mode):
    runner = _toy_runner(n_volumes=8)
    model = runner.model
    before = model.lin.weight.detach().clone()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    parts = make_private(model, runner.data.train_ds, optimizer, PartialLabelLoss("masked"), noise_multiplier=sigma,
                         max_grad_norm=1.0, sample_rate=1e-9, steps=2, mode=mode, sampler_seed=0, noise_seed=0)
    assert all(len(b) == 0 for b in parts.loader.batch_sampler)  # Poisson sampling drew no volume at all
    try:
        stats = parts.train_steps(steps=2, device="cpu", precision="fp32")
    finally:
        parts.close()
    assert stats.steps == 2 and stats.samples == 0
    assert torch.equal(model.lin.weight, before) == (sigma == 0.0)  # the noise is added all the same


# ----------------------------------------------------------------------------- the server's side
def _update(node, metrics, n=4, value=1.0, arrays=None):
    from fedtextseg.federation.aggregation import SiteUpdate

    return SiteUpdate(node, arrays or {"w": np.full((2,), value, np.float32), "rows": np.full((3, 2), value,
                                                                                             np.float32)},
                      n, np.array([True, True, False]), metrics)


def _privacy_metrics(eps, declined=False, would=None):
    return {"privacy/epsilon": eps, "privacy/delta": 1e-5, "privacy/noise_multiplier": 1.0, "privacy/steps": 6.0,
            "privacy/rounds": 2.0, "privacy/target_epsilon": 3.0, "privacy/declined": 1.0 if declined else 0.0,
            "privacy/epsilon_if_trained": would if would is not None else eps, "privacy/sample_rate": 0.25,
            "privacy/max_grad_norm": 1.0}


def test_split_declined_and_ledger_file(tmp_path):
    from fedtextseg.privacy import record_privacy
    from fedtextseg.tracking import RunRecorder

    a = _update("a", _privacy_metrics(1.5))
    b = _update("b", _privacy_metrics(2.9, declined=True, would=3.4), n=0)
    c = _update("c", {"train_steps": 3.0})  # no DP at this site
    keep, declined = split_declined([a, b, c])
    assert [u.node for u in keep] == ["a", "c"] and "budget exhausted" in declined["b"] and "3.4" in declined["b"]
    rec = RunRecorder(tmp_path / "run")
    rows = record_privacy(rec, 1, [a, b, c])
    assert [(r["site"], r["declined"]) for r in rows] == [("a", False), ("b", True)]
    ledger = json.loads((tmp_path / "run" / "privacy.json").read_text())
    assert ledger["sites"]["b"]["budget_exhausted"] and ledger["sites"]["a"]["epsilon"] == 1.5
    assert write_privacy_ledger(tmp_path / "run").name == "privacy.json"


@pytest.fixture(scope="module")
def coordinator_factory(tmp_path_factory):
    from fedtextseg.config import compose_config
    from fedtextseg.federation.coordinator import Coordinator

    root = tmp_path_factory.mktemp("coord")

    def make(name, *extra):
        cfg = compose_config("demo", [f"data.root={root / 'data'}", "federation.rounds=2", "federation.min_sites=1",
                                      "privacy=dp", *extra])
        return Coordinator(cfg, root / name, log_fn=lambda *_: None)

    return make


def test_budget_exhaustion_stops_a_site_not_the_run(coordinator_factory):
    """Fake replies: site b declines (global arrays back, 0 examples, privacy/declined=1); a alone is aggregated,
    also under equal weighting (where b's 0 examples would not have kept it out), and the run goes on."""
    coord = coordinator_factory("run-decline", "federation.weighting=equal")
    key = coord.round_config(1)["run-key"]
    assert key.startswith("run-decline-") and coord.round_config(2)["run-key"] == key
    g = coord.global_arrays
    delta = {k: (v + 0.5).astype(v.dtype) for k, v in g.items()}
    a = _update("a", {"train_steps": 3.0, **_privacy_metrics(1.5)}, arrays=delta)
    b = _update("b", _privacy_metrics(2.9, declined=True, would=3.4), n=0, arrays={k: v.copy() for k, v in g.items()})
    for u in (a, b):
        u.annotated = np.ones(len(coord.bank.class_names), bool)
    outcome = coord.finish_train_round(1, [a, b], {})
    assert outcome["aggregated"] and outcome["sites"] == ["a"] and "budget exhausted" in outcome["excluded"]["b"]
    for k in coord.groups.shared:
        np.testing.assert_allclose(coord.global_arrays[k], delta[k], rtol=1e-6)  # b's copy did not dilute a
    rows = [json.loads(x) for x in (coord.recorder.run_dir / "metrics.jsonl").read_text().splitlines()]
    privacy = [r for r in rows if r["kind"] == "privacy"]
    assert {(r["site"], r["declined"]) for r in privacy} == {("a", False), ("b", True)}
    assert {"round", "site", "epsilon", "delta", "noise_multiplier", "steps", "declined"} <= set(privacy[0])
    failure = next(r for r in rows if r["kind"] == "failure")
    assert failure["site"] == "b" and "budget exhausted" in failure["reason"]
    ledger = json.loads((coord.recorder.run_dir / "privacy.json").read_text())
    assert ledger["run_key"] == key and ledger["sites"]["b"]["budget_exhausted"]
    outcome2 = coord.finish_train_round(2, [b], {})  # every site declined: the global model stays, no crash
    assert not outcome2["aggregated"]


# ----------------------------------------------------------------------------- secure aggregation (linear encoding)
def test_secure_sum_encoding_reproduces_groupwise_classaware_aggregation():
    """The weighted mean of encoded updates (all SecAgg+ reveals) decodes to exactly what ``aggregate`` computes
    from the individual updates: shared arrays by FedAvg, per-class rows over the annotating sites only."""
    from fedtextseg.federation.aggregation import SiteUpdate, aggregate
    from fedtextseg.privacy.secure import decode_mean, encode_update, secure_weight

    rng = np.random.default_rng(0)
    groups = SimpleNamespace(shared=["enc.w", "enc.b"], per_class={"head.rows": 0, "head.cols": 1})
    global_arrays = {"enc.w": rng.normal(size=(3, 4)).astype(np.float32), "enc.b": np.zeros(4, np.float32),
                     "head.rows": rng.normal(size=(5, 2)).astype(np.float32),
                     "head.cols": rng.normal(size=(2, 5)).astype(np.float32)}
    masks = [np.array([1, 1, 0, 0, 0], bool), np.array([1, 0, 1, 0, 0], bool), np.array([0, 0, 0, 0, 1], bool)]
    updates = [SiteUpdate(f"s{i}", {k: (v + rng.normal(scale=0.01, size=v.shape)).astype(np.float32)
                                    for k, v in global_arrays.items()}, n, m)
               for i, (n, m) in enumerate(zip([3, 5, 2], masks))]
    declined = SiteUpdate("s3", {k: v.copy() for k, v in global_arrays.items()}, 0, np.ones(5, bool))
    for weighting in ("examples", "equal", "classes"):
        want = aggregate(global_arrays, updates, groups, weighting=weighting)
        vectors, weights = [], []
        for u, declines in [(u, False) for u in updates] + [(declined, True)]:
            vectors.append(encode_update(global_arrays, u.arrays, u.annotated, groups))
            weights.append(secure_weight(weighting, u.num_examples, declines, num_annotated=int(u.annotated.sum())))
        assert weights[-1] == 0 and (weighting == "equal") == (weights[:3] == [1, 1, 1])
        assert (weighting == "classes") == (weights[:3] == [6, 10, 2])
        w = np.array(weights, float)
        mean = [sum(wi * v[j] for wi, v in zip(w, vectors)) / w.sum() for j in range(len(vectors[0]))]
        got, coverage = decode_mean(global_arrays, mean, groups)
        assert coverage.tolist() == [True, True, True, False, True]
        for k in global_arrays:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=f"{weighting} {k}")
    bad = {**updates[0].arrays, "enc.b": np.full(4, np.nan, np.float32)}
    with pytest.raises(FedTextSegError, match="NaN"):
        encode_update(global_arrays, bad, masks[0], groups)


def test_secure_aggregation_refuses_rules_that_need_individual_updates():
    from fedtextseg.privacy.secure import check_secure_config

    with pytest.raises(ConfigError, match="robust"):
        check_secure_config(SimpleNamespace(federation=SimpleNamespace(robust="median", weighting="examples")))
    check_secure_config(SimpleNamespace(federation=SimpleNamespace(robust=None, weighting="equal")))
    check_secure_config(SimpleNamespace(federation=SimpleNamespace(robust=None, weighting="classes")))


def test_dp_round_after_an_evaluation_trains(tmp_path):
    """A site evaluates the global model (eval mode) between DP rounds; the next DP round must still train."""
    from fedtextseg.config import compose_config
    from fedtextseg.synthetic.ct import generate_hospitals
    from fedtextseg.federation.inprocess import run_federation_inprocess
    from fedtextseg.text import build_bank

    root = tmp_path / "h"
    generate_hospitals(root, sites=2, cases_per_site=2, seed=1, shape=(32, 32, 32), unseen=False)
    build_bank("abdomen-ct", encoder="sentence-minilm", log=lambda *_: None).save(root / "bank.pt")
    cfg = compose_config("demo", [
        f"data.root={root}", f"text.bank={root / 'bank.pt'}", "federation.rounds=2", "train.local_steps=1",
        "train.batch_size=1", "data.preprocess.patch_size=[16,16,16]", "data.preprocess.spacing=[12,12,12]",
        "data.preprocess.num_crops=1", "data.val_fraction=0.5", "eval.max_cases=1", "eval.hd95=false",
        "run.threads=null", "privacy=dp", "privacy.target_epsilon=50", "federation.evaluate_unseen=false",
        f"privacy.ledger_dir={tmp_path / 'ledgers'}",
    ])
    coord = run_federation_inprocess(cfg, tmp_path / "run", log_fn=lambda *_: None)
    rows = [r for r in __import__("fedtextseg.tracking", fromlist=["read_metrics"]).read_metrics(tmp_path / "run")
            if r["kind"] == "train"]
    assert {(r["round"], r["site"]) for r in rows} == {(r, s) for r in (1, 2) for s in ("site01-btcv", "site02-lits")}
    assert coord.start_round == 1


def test_poisson_loader_draws_each_volume_independently_for_the_rounds_steps():
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    volumes = [[{"image": torch.full((1, 2, 2, 2), float(i)), "case_id": f"case-{i}"}] * 2 for i in range(30)]
    loader = poisson_loader(volumes, 0.1, steps=400, generator=torch.Generator().manual_seed(3))
    assert isinstance(loader.batch_sampler, UniformWithReplacementSampler)  # Opacus's sampler draws the batches
    batches = list(loader)
    assert len(batches) == 400  # train.local_steps, not 1 / sample_rate
    sizes = [len(set(b["case_id"])) for b in batches]
    assert abs(np.mean(sizes) - 3.0) < 0.3 and np.var(sizes) > 1.5  # Binomial(30, 0.1): mean 3, variance 2.7
    empty = [b for b in batches if not b["case_id"]]
    assert len(empty) > 3 and all(b["image"].shape[0] == 0 for b in empty)  # 0.9^30: ~17 empty draws, kept
    full = next(b for b in batches if b["case_id"])
    assert full["image"].shape[0] == 2 * len(set(full["case_id"]))  # a volume's crops are consecutive rows
    again = list(poisson_loader(volumes, 0.1, steps=400, generator=torch.Generator().manual_seed(3)))
    assert [b["case_id"] for b in again] == [b["case_id"] for b in batches]
    with pytest.raises(ConfigError, match="rate"):
        poisson_loader(volumes, 0.0, steps=1)
