"""Eigenvalue engine: precision against numpy's SVD, routes, batching, dtypes, layouts."""

import numpy as np
import pytest
import torch

from esdwatch.engine.spectrum import batch_eigenvalues, eigenvalues, resolve_backend, resolve_method

BACKENDS = ["torch", "blas"]


def _numpy_evals(W: np.ndarray) -> np.ndarray:
    return np.sort(np.linalg.svd(W.astype(np.float64), compute_uv=False) ** 2)


@pytest.mark.parametrize("shape", [(300, 100), (100, 300), (256, 256), (1000, 64)])
@pytest.mark.parametrize("method,backend", [("gram", "torch"), ("gram", "blas"), ("svd", "torch"), ("auto", "auto")])
def test_float64_matches_numpy_svd(shape, method, backend):
    rng = np.random.default_rng(0)
    W = rng.standard_normal(shape) * 0.05
    ref = _numpy_evals(W)
    ev = eigenvalues(torch.from_numpy(W), method=method, backend=backend).numpy()
    assert ev.shape == (min(shape),)
    assert np.all(np.diff(ev) >= 0)
    assert abs(ev[-1] - ref[-1]) / ref[-1] <= 1e-10
    assert abs(ev.sum() - ref.sum()) / ref.sum() <= 1e-8


@pytest.mark.parametrize("backend", BACKENDS)
def test_heavy_tailed_matrix_precision(backend):
    rng = np.random.default_rng(1)
    W = rng.pareto(1.5, size=(400, 200)) * rng.choice([-1, 1], size=(400, 200))
    ref = _numpy_evals(W)
    ev = eigenvalues(torch.from_numpy(W), backend=backend).numpy()
    assert abs(ev[-1] - ref[-1]) / ref[-1] <= 1e-10
    assert abs(ev.sum() - ref.sum()) / ref.sum() <= 1e-8


def test_auto_route_by_precision():
    assert resolve_method("auto", torch.float64) == "gram"
    assert resolve_method("auto", torch.float32) == "svd"
    with pytest.raises(ValueError):
        resolve_method("qr", torch.float64)
    with pytest.raises(ValueError, match="float64"):
        resolve_method("mixed", torch.float32)  # a float32 eigvalsh loses ~2e-5 on the top eigenvalues


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_route_is_close_to_the_float64_gram_and_guards_zeros(backend):
    # float32 product, float64 eigenvalues: on a full-rank matrix every eigenvalue within
    # 1e-6 lambda_max of the float64 Gram's and the top within 1e-6 relative (not identical:
    # the product really is float32) ...
    gen = torch.Generator().manual_seed(5)
    W = torch.randn(1500, 600, generator=gen) * (0.2 + torch.rand(1, 600, generator=gen))
    ref = eigenvalues(W, method="gram", backend=backend).numpy()
    ev = eigenvalues(W, method="mixed", backend=backend)
    assert ev.dtype == torch.float64
    ev = ev.numpy()
    assert 0 < np.abs(ev - ref).max() <= 1e-6 * ref[-1]
    assert np.abs(ev[-50:] / ref[-50:] - 1).max() <= 1e-6
    # ... and a spectrum that reaches zero (dead units) is recomputed with the float64 product
    W[:, :240] = 0.0
    ref = eigenvalues(W, method="gram", backend=backend).numpy()
    ev = eigenvalues(W, method="mixed", backend=backend).numpy()
    assert np.abs(ev - ref).max() <= 1e-12 * ref[-1]
    assert np.sum(ev < 1e-6 * ref[-1]) == 240


def test_backend_choice():
    cpu = torch.device("cpu")
    assert resolve_backend("auto", "gram", torch.float64, cpu) == "blas"  # threadpoolctl is a dev dependency
    assert resolve_backend("auto", "svd", torch.float32, cpu) == "torch"
    assert resolve_backend("auto", "gram", torch.float64, torch.device("cuda")) == "torch"
    with pytest.raises(ValueError, match="CPU only"):
        resolve_backend("blas", "svd", torch.float32, cpu)
    with pytest.raises(ValueError):
        resolve_backend("lapack", "gram", torch.float64, cpu)


def test_backends_agree_on_a_mixed_batch():
    gen = torch.Generator().manual_seed(3)
    mats = [
        torch.randn(300, 120, generator=gen),  # float32 weights
        torch.randn(64, 200, dtype=torch.float64, generator=gen).t(),  # transposed view
        torch.randn(9, 40, 30, generator=gen).to(torch.bfloat16),  # conv slices, bfloat16
        torch.randn(120, 120, dtype=torch.float64, generator=gen),
    ]
    scales = [1.0, 1.0, 0.5**0.5, 2.0]
    via_torch = batch_eigenvalues(mats, scales=scales, backend="torch")
    via_blas = batch_eigenvalues(mats, scales=scales, backend="blas")
    for a, b in zip(via_torch, via_blas):
        assert a.dtype == b.dtype == torch.float64 and a.shape == b.shape
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12 * a.max().item())


def test_float32_opt_in_is_close():
    W = torch.randn(200, 100, dtype=torch.float64)
    ev64 = eigenvalues(W)
    ev32 = eigenvalues(W, dtype=torch.float32)
    assert ev32.dtype == torch.float32
    assert torch.allclose(ev32.double(), ev64, rtol=1e-4, atol=1e-4 * ev64.max().item())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_weights_are_upcast(dtype):
    W = torch.randn(128, 64).to(dtype)
    ev = eigenvalues(W)
    ref = _numpy_evals(W.float().numpy())
    assert ev.dtype == torch.float64
    np.testing.assert_allclose(ev.numpy(), ref, rtol=1e-9, atol=1e-9 * ref.max())


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_and_transposed_views(backend):
    base = torch.randn(64, 200, dtype=torch.float64)
    view = base.t()  # non-contiguous 200 x 64
    assert not view.is_contiguous()
    np.testing.assert_allclose(
        eigenvalues(view, backend=backend).numpy(), eigenvalues(base.contiguous()).numpy(), rtol=1e-12
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_stack_pools_slices_and_scale(backend):
    S = torch.randn(9, 80, 60, dtype=torch.float64)
    pooled = eigenvalues(S, scale=2.0, backend=backend).numpy()
    parts = np.sort(np.concatenate([_numpy_evals(s.numpy()) for s in S]))
    assert pooled.shape == (9 * 60,)
    np.testing.assert_allclose(pooled, 4.0 * parts, rtol=1e-9, atol=1e-9 * parts.max())


def test_batching_same_shapes_equals_one_by_one():
    mats = [torch.randn(120, 40, dtype=torch.float64) for _ in range(3)] + [torch.randn(50, 70, dtype=torch.float64)]
    batched = batch_eigenvalues(mats, scales=[1.0, 0.5, 1.0, 1.0])
    single = [eigenvalues(m, scale=s) for m, s in zip(mats, [1.0, 0.5, 1.0, 1.0])]
    for b, s in zip(batched, single):
        torch.testing.assert_close(b, s, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rank_deficient_gives_no_negative_eigenvalues(backend):
    u = torch.randn(100, 1, dtype=torch.float64)
    v = torch.randn(1, 80, dtype=torch.float64)
    ev = eigenvalues(u @ v, backend=backend)
    assert (ev >= 0).all()
    assert ev[-1] > 0 and (ev[:-1] < 1e-10 * ev[-1]).all()


def test_bad_arguments():
    with pytest.raises(ValueError):
        eigenvalues(torch.randn(10))
    with pytest.raises(ValueError):
        eigenvalues(torch.randn(5, 5), dtype=torch.float16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_tensor_stays_on_device():
    W = torch.randn(256, 128, device="cuda")
    ev = eigenvalues(W)
    assert ev.device.type == "cuda"
    ref = _numpy_evals(W.cpu().numpy())
    assert abs(ev[-1].item() - ref[-1]) / ref[-1] <= 1e-10


def test_blas_thread_pool_gives_the_serial_results():
    gen = torch.Generator().manual_seed(5)
    mats = [torch.randn(n, 64, generator=gen, dtype=torch.float64) for n in (64, 300, 128, 500, 64)]
    serial = batch_eigenvalues(mats, backend="blas")
    torch.set_num_threads(2)  # T > 1: matrices spread over a pool of Python threads
    pooled = batch_eigenvalues(mats, backend="blas")
    for a, b in zip(serial, pooled):
        assert torch.equal(a, b)


def test_deferred_matrices_are_built_where_they_are_decomposed():
    from esdwatch.engine.spectrum import DeferredMatrix

    gen = torch.Generator().manual_seed(7)
    mats = [torch.randn(150, 60, generator=gen), torch.randn(9, 30, 20, generator=gen)]
    twice = [DeferredMatrix(W, lambda X: 2.0 * X) for W in mats]
    for backend in BACKENDS:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            plain = batch_eigenvalues(mats, backend=backend)
            deferred = batch_eigenvalues(twice, backend=backend)
            for p, d in zip(plain, deferred):
                torch.testing.assert_close(d, 4.0 * p, rtol=1e-12, atol=1e-12 * p.max().item())
