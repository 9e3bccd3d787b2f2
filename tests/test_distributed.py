"""2-process gloo DDP: parameter gradients equal those of one process on the global batch."""

from __future__ import annotations

import pytest
import torch

from ernievil2_train.distributed import RANK_VARIABLES, is_first_process
from tests.ddp_helpers import run_ranks
from tests.ddp_worker import CASES, VARIANTS, case_module, global_batch, grads, worker

WORLD = 2
TIMEOUT_S = 120


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b), sorted(set(a) ^ set(b))
    return max((a[n] - b[n]).abs().max().item() for n in a)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """Spawn 2 real gloo processes once; every variant and case runs inside them."""
    out = tmp_path_factory.mktemp("ddp")
    run_ranks(worker, WORLD, (str(out),), TIMEOUT_S)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.fixture(scope="module")
def reference() -> dict[str, dict]:
    """Single process, whole global batch, same model and loss: {case: {"grads", "out"}}."""
    out = {}
    for case in CASES:
        module = case_module(case)
        losses = module(global_batch(case))
        losses["loss"].backward()
        out[case] = {"grads": grads(module), "out": {k: v.detach() for k, v in losses.items()}}
    return out


@pytest.mark.parametrize("variant", ["autograd_gather", "feature_cache"])
def test_ddp_gradients_equal_single_process(variant, ranks, reference):
    for case in VARIANTS[variant]:
        expected = reference[case]["grads"]
        scale = max(g.abs().max().item() for g in expected.values())
        assert scale > 1e-3, case  # the comparison is not trivially satisfied by tiny gradients
        for rank in ranks:
            diff = _max_diff(rank[variant][case]["grads"], expected)
            print(f"{variant} {case}: max |grad diff| = {diff:.2e} (max |grad| {scale:.2e})")
            assert diff < 1e-6, (variant, case, diff)


@pytest.mark.parametrize("variant", ["autograd_gather", "feature_cache"])
def test_ddp_losses_and_logged_metrics_equal_single_process(variant, ranks, reference):
    """The mean of the rank losses is the global-batch loss, term by term; every rank logs the global loss
    terms and the global accuracies (with uneven tagged counts, and a rank without any tagged sample)."""
    for case in VARIANTS[variant]:
        expected = reference[case]["out"]
        for name in (k for k in expected if k.startswith("loss")):
            mean = sum(rank[variant][case]["out"][name] for rank in ranks) / len(ranks)
            what = f"{variant} {case} {name}"
            torch.testing.assert_close(mean, expected[name], atol=1e-12, rtol=0, msg=what)
        for rank in ranks:
            logged = rank[variant][case]["logged"]
            for name, value in expected.items():
                got, what = logged[f"train/{name}"].double(), f"{variant} {case} logged {name}"
                torch.testing.assert_close(got, value.double(), atol=1e-6, rtol=0, msg=what)
    if variant == "autograd_gather":
        rank0_tags = ranks[0][variant]["uneven_tags"]["out"]
        assert rank0_tags["loss_image_tags"].item() == 0.0 and rank0_tags["acc_image_tags"].item() == 0.0
        assert reference["uneven_tags"]["out"]["loss_image_tags"].item() > 0.1


def test_gather_backward_leaves_a_shared_gradient_alone(ranks):
    for rank in ranks:
        expected = torch.arange(12.0, dtype=torch.float64).reshape(-1, 3)
        torch.testing.assert_close(rank["shared_gradient"], expected, atol=0, rtol=0)


def test_no_grad_gather_would_fail(ranks, reference):
    """Negative control: gathering the other ranks' features without gradient drops terms."""
    for case in VARIANTS["no_grad_gather"]:
        scale = max(g.abs().max().item() for g in reference[case]["grads"].values())
        diff = _max_diff(ranks[0]["no_grad_gather"][case]["grads"], reference[case]["grads"])
        print(f"no-grad gather {case}: max |grad diff| = {diff:.2e} (max |grad| {scale:.2e})")
        assert diff > 0.1 * scale, (case, diff, scale)


def test_equal_batch_sizes_are_checked_with_one_collective_then_on_the_host(ranks):
    for rank in ranks:
        checks = rank["batch_size_checks"]
        assert checks["gathers"] == [3, 2]  # sizes + features + metadata, then features + metadata
        assert "local batch size changed from 4 to 3" in checks["error"]
        assert "drop_last" in checks["error"]


def test_each_rank_resumes_with_its_own_random_state(ranks):
    """The ranks' generators part (each trims its own text length); a checkpoint keeps every rank's states
    and each rank restores its own."""
    for result in ranks:
        rng = result["rng"]
        assert rng["saved"] == WORLD
        torch.testing.assert_close(rng["after_restore"], rng["after_save"], rtol=0, atol=0)
    assert not torch.equal(ranks[0]["rng"]["after_save"][0], ranks[1]["rng"]["after_save"][0])


def test_the_first_process_is_the_one_no_launcher_calls_another_rank(monkeypatch):
    for name in RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert is_first_process()
    for name in RANK_VARIABLES:
        monkeypatch.setenv(name, "0")
        assert is_first_process()
        monkeypatch.setenv(name, "1")
        assert not is_first_process()
        monkeypatch.setenv(name, "")
