"""Each fused op against its plain-PyTorch reference, on odd sizes (Triton under TRITON_INTERPRET=1)."""
import functools
import tempfile

import pytest
import torch
import torch.nn.functional as F

from modeling import ops


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("rows,width", [(197, 192), (577, 384), (197, 768), (50, 1024), (13, 1280), (3, 100)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_layer_norm_matches_reference(rows, width, dtype):
    g = torch.Generator().manual_seed(rows * width)
    x = (torch.randn(rows, width, generator=g) * 3 + 1).to(dtype)
    w, b = torch.randn(width, generator=g), torch.randn(width, generator=g)
    shift = torch.randn(width, generator=g)
    for s in (None, shift):
        got = ops.layer_norm(x, w, b, 1e-6, s, impl="triton")
        want = ops.layer_norm_reference(x, w, b, 1e-6, s)
        assert got.dtype == dtype and got.shape == x.shape
        assert _rel(got, want) < (1e-6 if dtype == torch.float32 else 2e-3)


def test_triton_layer_norm_strided_rows_and_plain_semantics():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(5, 197, 192, generator=g)
    rows = tokens[:, 0]  # class-token rows: stride 197 * 192
    w, b, s = torch.randn(192, generator=g), torch.randn(192, generator=g), torch.randn(192, generator=g)
    got = ops.layer_norm(rows, w, b, 1e-5, s, impl="triton")
    assert torch.allclose(got, F.layer_norm(rows + s, (192,), w, b, 1e-5), atol=1e-5)


@pytest.mark.parametrize("tile", ["r1w2", "r2w8", "r16w4", "r1w1"])
def test_triton_layer_norm_launch_shapes(tile):
    """Every launch shape the plan may pick computes the same LayerNorm (rows that do not fill
    the last program, rows narrower than the warps' reach)."""
    from modeling import kernels
    g = torch.Generator().manual_seed(len(tile))
    x = torch.randn(37, 200, generator=g).half()
    w, b, s = (torch.randn(200, generator=g) for _ in range(3))
    assert _rel(ops.layer_norm(x, w, b, 1e-6, s, "triton", tile=tile), ops.layer_norm_reference(x, w, b, 1e-6, s)) < 2e-3
    assert set(kernels.norm_tiles(576)) == set(kernels.NORM_TILE_CANDIDATES) and kernels.norm_tiles(50176) == ()
    for bad in ("r3w4", "r2", "r2w64", "w4r2", "r0w4"):
        with pytest.raises(ValueError, match="norm_tile"):
            ops.Plan(norm="triton", norm_tile=bad)


def test_triton_layer_norm_eps_matters():
    x = torch.randn(7, 192) * 1e-3  # variance near eps: a wrong eps must change the output
    w, b = torch.ones(192), torch.zeros(192)
    a = ops.layer_norm(x, w, b, 1e-6, impl="triton")
    c = ops.layer_norm(x, w, b, 1e-5, impl="triton")
    assert _rel(a, c) > 1e-3


@pytest.mark.parametrize("patch,size,chans", [(16, 48, 3), (14, 42, 3), (8, 24, 1), (32, 64, 3)])
def test_patchify_gemm_matches_convolution(patch, size, chans):
    g = torch.Generator().manual_seed(patch)
    images = torch.randn(3, chans, size, size, generator=g)
    w4 = torch.randn(24, chans, patch, patch, generator=g)
    bias = torch.randn(24, generator=g)
    got = (ops.patchify(images, (patch, patch)) @ w4.reshape(24, -1).t() + bias).view(3, -1, 24)
    want = ops.patch_embed_reference(images, w4, bias)
    assert torch.allclose(got, want, atol=1e-4)


@pytest.mark.parametrize("patch,height,width,chans", [
    ((16, 16), 48, 48, 3),   # ViT-B/16's layout, three patches a side
    ((14, 14), 42, 28, 3),   # patch and image widths not powers of 2, image not square
    ((8, 4), 24, 20, 1),     # patch not square, one channel
])
def test_triton_patchify_equals_reference(patch, height, width, chans):
    images = torch.randn(2, chans, height, width, generator=torch.Generator().manual_seed(height + width))
    images = images.to(torch.float16)
    want = ops.patchify(images, patch)
    assert torch.equal(ops.patchify(images, patch, impl="triton"), want)
    out = torch.full_like(want, float("nan"))  # written in place, every element
    assert ops.patchify(images, patch, out=out, impl="triton") is out and torch.equal(out, want)


@pytest.mark.parametrize("n_patch,n_prefix,dim,pos_dtype", [
    (196, 0, 192, torch.float16),   # the ait variant: no prefix
    (49, 1, 80, torch.float32),     # a class token; width not a power of 2; float32 table
    (16, 5, 64, torch.float16),     # class + register tokens
])
def test_triton_token_assembly_equals_reference(n_patch, n_prefix, dim, pos_dtype):
    g = torch.Generator().manual_seed(n_patch + n_prefix)
    batch = 3
    tokens = torch.randn(batch * n_patch, dim, generator=g).to(torch.float16)
    pos = torch.randn(n_patch, dim, generator=g).to(pos_dtype)
    prefix = torch.randn(n_prefix, dim, generator=g).to(pos_dtype)
    want = ops.assemble_tokens(tokens, pos, prefix, batch)
    out = torch.full_like(want, float("nan"))
    assert ops.assemble_tokens(tokens, pos, prefix, batch, out=out, impl="triton") is out
    assert torch.equal(out, want)


@pytest.mark.parametrize("batch,seq,heads,hd", [(2, 197, 3, 64), (1, 577, 2, 32), (3, 17, 4, 16)])
def test_attention_on_fused_qkv_matches_reference(batch, seq, heads, hd):
    qkv = torch.randn(batch * seq, 3 * heads * hd, generator=torch.Generator().manual_seed(seq))
    got = ops.attention(qkv, batch, heads, hd)
    want = ops.attention_reference(qkv, batch, heads, hd)
    assert got.shape == (batch * seq, heads * hd)
    assert _rel(got, want) < 1e-5


def test_residual_linear_in_place_matches_reference():
    g = torch.Generator().manual_seed(1)
    x, a, w = torch.randn(197, 192, generator=g), torch.randn(197, 96, generator=g), torch.randn(192, 96, generator=g)
    want = ops.residual_linear_reference(x, a, w)
    got = ops.residual_linear(x.clone(), a, w, "addmm")
    assert torch.allclose(got, want, atol=1e-4)


def test_gelu_epilogue_within_the_tanh_approximation_of_gelu():
    # cuBLASLt's epilogue computes the tanh approximation (torch's CPU kernel the erf form);
    # either way it must stay within the approximation's own bound of the exact GELU
    g = torch.Generator().manual_seed(2)
    x, w, b = torch.randn(33, 64, generator=g), torch.randn(256, 64, generator=g), torch.randn(256, generator=g)
    got = ops.linear_gelu(x, w, b, "gelu", "epilogue")
    exact = ops.linear_gelu_reference(x, w, b, "gelu")
    tanh = ops.linear_gelu_reference(x, w, b, "gelu_tanh")
    bound = (exact - tanh).abs().max().item()
    assert 1e-4 < bound < 1e-3
    assert (got - exact).abs().max().item() <= bound + 1e-5


@pytest.mark.parametrize("pool", ["token", "avg", "max", "avgmax"])
@pytest.mark.parametrize("include_prefix", [False, True])
def test_pool_matches_timm(pool, include_prefix):
    from timm.models.vision_transformer import global_pool_nlc
    x = torch.randn(2, 21, 8)
    assert torch.equal(ops.pool_tokens(x, pool, 5, include_prefix),
                       global_pool_nlc(x, pool, num_prefix_tokens=5, reduce_include_prefix=include_prefix))


def test_plan_rejects_unknown_impl():
    with pytest.raises(ValueError, match="plan.norm"):
        ops.Plan(norm="cuda-magic")


@pytest.mark.parametrize("rows,n,k,tile", [
    (197, 96, 80, "m32n32k16w4s2x1f"),   # ragged rows and K (TMA zero-fills past the edges)
    (33, 200, 48, "m32n64k32w4s2x2"),    # two epilogue slices, ragged N, nested loop
    (64, 64, 64, "m64n64k64w4s3x1f"),    # one tile
    (150, 72, 40, "m32n32k16w4s2x2fws"),  # warp-specialized tile loop (a hint; the same math)
    (70, 72, 200, "m32n64k128w4s2x1f"),  # a K step deeper than a ragged K's last one
    (90, 40, 176, "m32n32k32w4s2x1fsk3"),  # split K: 6 steps in 3 units of 2 (the residual only)
    (50, 64, 80, "m32n32k16w4s2x2fsk2"),  # 5 K steps in 2 units of 3, the last reading zeros past K
])
def test_triton_gemm_matches_reference(rows, n, k, tile):
    g = torch.Generator().manual_seed(rows + n + k)
    x, w, b = (torch.randn(*s, generator=g) for s in ((rows, k), (n, k), (n,)))
    w /= k ** 0.5
    stream = torch.randn(rows, n, generator=g)
    want = ops.residual_linear_reference(stream, x, w)
    got = ops.residual_linear(stream, x, w, "add", tile)
    assert got.data_ptr() == stream.data_ptr() and _rel(got, want) < 1e-5  # accumulated in place
    if ops.parse_gemm_tile(tile).split_k > 1:
        return  # split K serves the in-place residual GEMMs only
    assert _rel(ops.linear(x, w, b, tile), ops.linear(x, w, b)) < 1e-5
    for act in ("gelu", "gelu_tanh"):
        from modeling import kernels
        got = kernels.linear(x, w, b, act, tile=ops.parse_gemm_tile(tile))
        assert _rel(got, ops.linear_gelu_reference(x, w, b, act)) < 1e-5
    # the plan's fc1 paths: "triton" is the tanh approximation whatever the model's GELU, "triton_erf" exact
    assert _rel(ops.linear_gelu(x, w, b, "gelu", "triton", tile), ops.linear_gelu_reference(x, w, b, "gelu_tanh")) < 1e-5
    assert _rel(ops.linear_gelu(x, w, b, "gelu", "triton_erf", tile), ops.linear_gelu_reference(x, w, b, "gelu")) < 1e-5
    h = x.to(torch.float16)
    assert _rel(ops.linear(h, w.half(), b.half(), tile).float(), ops.linear(x, w, b)) < 2e-3


def test_gemm_tiles_parse_and_validate():
    tile = ops.parse_gemm_tile("m128n256k64w8s3x2f")
    assert (tile.block_m, tile.block_n, tile.block_k, tile.warps, tile.stages, tile.split_n, tile.flatten) == \
        (128, 256, 64, 8, 3, 2, True)
    assert str(tile) == "m128n256k64w8s3x2f" and tile.per_sm == 1
    two = ops.parse_gemm_tile("m64n128k64w4s3x1fo2")
    assert two.per_sm == 2 and str(two) == "m64n128k64w4s3x1fo2"
    ws = ops.parse_gemm_tile("m128n256k64w8s3x2fws")
    assert ws.ws and not tile.ws and str(ws) == "m128n256k64w8s3x2fws"
    split = ops.parse_gemm_tile("m128n128k64w4s4x1fsk3")
    assert split.split_k == 3 and tile.split_k == 1 and str(split) == "m128n128k64w4s4x1fsk3"
    # shared memory: the 4-stage 128x256 ring and its epilogue slice fit (the residual is added by a
    # reduce-add store, C is never staged); a fifth stage does not
    assert ops.parse_gemm_tile("m128n256k64w8s4x2f").fits() and not ops.parse_gemm_tile("m128n256k64w8s5x2f").fits()
    for bad in ("m128n256k64", "m128n256k64w8s3x3f", "m128n255k64w8s3x2", "m64n128k64w4s3x1fo3", "m64n128k64w4s3x1w",
                "m64n128k64w4s3x1fsk1", "m64n128k64w4s3x1fsk9"):
        with pytest.raises(ValueError, match="fc2_tile"):
            ops.Plan(fc2_tile=bad)
    ops.Plan(proj_tile="m64n64k128w4s4x1fsk2", fc2_tile="m64n64k128w4s4x1fsk2")
    for site in ("qkv_tile", "fc1_tile"):  # split K adds into its output: only the in-place residual GEMMs can
        with pytest.raises(ValueError, match=f"{site}.*in-place"):
            ops.Plan(**{site: "m64n64k128w4s4x1fsk2"}, **({"mlp_act": "triton"} if site == "fc1_tile" else {}))
    # an fc1 tile and the fc1 path that uses it come together
    with pytest.raises(ValueError, match="fc1_tile"):
        ops.Plan(mlp_act="triton")
    with pytest.raises(ValueError, match="fc1_tile"):
        ops.Plan(mlp_act="epilogue", fc1_tile="m64n128k64w4s3x1f")


def test_cublaslt_algorithms_in_the_plan():
    """"ltN" names cuBLASLt's algorithm N at any GEMM site; at fc1 only with its GELU epilogue. The
    calls themselves need an NVIDIA GPU (tools/gpu_selftest.py checks every algorithm there)."""
    from engine.compile import with_choice
    from modeling import cublaslt
    plan = ops.Plan(qkv_tile="lt3", proj_tile="lt0", fc2_tile="lt7", mlp_act="epilogue", fc1_tile="lt2")
    assert [ops.lt_algorithm(t) for t in (plan.qkv_tile, plan.fc1_tile, "m64n64k64w4s3x1f", "", "lt")] == \
        [3, 2, None, None, None]
    # an explicit configuration: (algorithm id, tile, stages, cluster, swizzle, custom option), all six
    assert ops.lt_algorithm("lt66.29.35.3.0.1") == (66, 29, 35, 3, 0, 1)
    assert ops.Plan(mlp_act="epilogue", fc1_tile="lt66.29.35.3.0.1").fc1_tile == "lt66.29.35.3.0.1"
    for act in ("separate", "triton", "triton_erf"):
        with pytest.raises(ValueError, match="fc1_tile"):
            ops.Plan(mlp_act=act, fc1_tile="lt1")
    for bad in ("lt", "ltx", "lt-1", "lt1f", "lt66.29.35.3.0", "lt66.29.35.3.0.1.2", "lt66..35.3.0.1",
                "lt066.29.35.3.0.1", "lt66.29.35.65539.0.1"):
        with pytest.raises(ValueError, match="fc2_tile"):
            ops.Plan(fc2_tile=bad)
    assert with_choice(ops.Plan(), "mlp_act", "epilogue:lt2") == ops.Plan(mlp_act="epilogue", fc1_tile="lt2")
    assert with_choice(ops.Plan(), "mlp_act", "epilogue:lt66.29.35.3.0.1").fc1_tile == "lt66.29.35.3.0.1"
    assert with_choice(plan, "qkv", "cublas").qkv_tile == "" and with_choice(plan, "fc2", "lt1").fc2_tile == "lt1"
    if not torch.cuda.is_available():
        assert cublaslt.version() is None
        with pytest.raises(cublaslt.CublasLtError, match="NVIDIA GPU"):
            ops.linear(torch.ones(4, 8), torch.ones(2, 8), torch.ones(2), "lt0")


def test_extra_cublaslt_configurations_by_epilogue(monkeypatch):
    """The explicit configurations offered to the plan are the table's for the problem's form (GELU,
    bias, residual), only those cuBLASLt's check accepts, and none the heuristic already picked."""
    from modeling import cublaslt
    table = {"gelu_bias": ((66, 1, 35, 3, 0, 1), (66, 2, 35, 3, 0, 1), (66, 3, 35, 3, 0, 1)),
             "bias": ((66, 4, 35, 3, 0, 1),), "residual": ((66, 5, 35, 3, 0, 1), (66, 6, 35, 3, 0, 1))}
    monkeypatch.setattr(cublaslt, "EXTRA_CONFIGS", table)
    monkeypatch.setattr(cublaslt, "algorithms", lambda p: (("tile2", 0),))        # the heuristic picked tile 2
    monkeypatch.setattr(cublaslt, "describe", lambda algo: algo)
    monkeypatch.setattr(cublaslt, "configured", lambda p, *c: None if c[1] == 3 else (f"tile{c[1]}", 0))
    problem = functools.partial(cublaslt.Problem, 50176, 3072, 768, torch.float16)
    assert cublaslt.extra_configs(problem("gelu_bias")) == [table["gelu_bias"][0]]   # 2 offered, 3 refused
    assert cublaslt.extra_configs(problem("bias")) == [table["bias"][0]]
    assert cublaslt.extra_configs(problem("none", residual=True)) == list(table["residual"])
    assert cublaslt.extra_configs(problem("none")) == []
    # the plan's names for them, which ops.lt_algorithm parses back
    names = cublaslt.names(problem("gelu_bias"))
    assert names == ["lt0", "lt66.1.35.3.0.1"] and cublaslt.names(problem("gelu_bias"), extra=False) == ["lt0"]
    assert ops.lt_algorithm(names[1]) == table["gelu_bias"][0]


def test_gemm_candidates_narrow_with_the_shape():
    """Small GEMMs time only the tiles at most 128 wide (the 128-deep ones only there), mid-size
    ones the rest, large ones none (the library's algorithms are timed there): every list is a
    subset of the candidates."""
    from modeling import kernels
    small, mid = (set(kernels.gemm_tiles(r)) for r in (196, 4096))
    assert kernels.gemm_tiles(kernels.LIBRARY_ROWS) == () and kernels.gemm_tiles(kernels.LIBRARY_ROWS - 1)
    deep = {t for t in kernels.GEMM_TILE_CANDIDATES if ops.parse_gemm_tile(t).block_k == 128}
    split = {t for t in kernels.GEMM_TILE_CANDIDATES if ops.parse_gemm_tile(t).split_k > 1}
    assert deep and deep < small and not deep & mid
    # split K below 2048 rows only, and never when the outputs must repeat bit for bit
    assert split < small and split & set(kernels.gemm_tiles(1500)) and not split & mid
    assert not split & set(kernels.gemm_tiles(196, deterministic=True))
    assert set(kernels.gemm_tiles(196, deterministic=True)) == small - split
    assert mid | deep | split == set(kernels.GEMM_TILE_CANDIDATES)
    assert all(ops.parse_gemm_tile(t).block_n <= 128 for t in small)
    assert "m64n128k64w4s4x1f" in small and "m128n256k64w8s3x2f" in mid


@pytest.mark.parametrize("plan", [
    ops.Plan(norm="triton", residual="addmm"),
    ops.Plan(norm="triton", residual="addmm", attention="triton", attention_tile="m16n16w4s2",
             qkv_tile="m32n32k16w4s2x1f", fc2_tile="m32n64k32w4s2x2", embed="triton"),
    ops.Plan(norm="triton", residual="addmm", mlp_act="triton_erf", fc1_tile="m32n64k32w4s2x2fo2",
             proj_tile="m32n32k16w4s2x1fo2", qkv_tile="m32n32k16w4s2x1f"),
])
def test_whole_engine_with_triton_kernels_matches_reference_path(plan):
    """The engine with our Triton kernels (LayerNorm; attention and GEMMs; the embedding) equals the
    reference path."""
    import weight_utils as wu
    from modeling.config import vit_config
    cfg = vit_config("vit_micro_patch8_32", class_token=True, reg_tokens=1)
    timm_model, _ = wu.source_model(cfg, seed=4)
    model = wu.build_engine(cfg, wu.convert(timm_model, cfg), torch.float32, "cpu")
    images = torch.randn(2, 3, 32, 32)
    want = model(images)
    assert _rel(model.set_plan(plan)(images), want) < 1e-5
    # and a planted fault in one GEMM is seen
    model.blocks[1].fc2.weight[0, 0] += 1.0
    assert _rel(model(images), want) > 1e-4


@pytest.mark.parametrize("feature", [dict(class_token=True, reg_tokens=1),
                                     dict(pre_norm=True, class_token=False, global_pool="avg"),
                                     dict(global_pool="avg", fc_norm=False, patch_size=4, img_size=(24, 40), in_chans=1)])
def test_activation_arena_holds_the_activations(feature):
    """With an arena the forward writes its activations there: the same logits, the residual stream
    ends in the arena's x slot, and nothing is read before it is written (a NaN-filled arena
    changes nothing)."""
    import weight_utils as wu
    from modeling.config import vit_config
    from modeling.vision_transformer import ActivationArena
    cfg = vit_config("vit_micro_patch8_32", **feature)
    model = wu.build_engine(cfg, wu.convert(wu.source_model(cfg, seed=6)[0], cfg), torch.float32, "cpu")
    model.set_plan(ops.Plan(norm="triton", residual="addmm", attention="triton", attention_tile="m16n16w4s2",
                            qkv_tile="m32n32k16w4s2x1f", mlp_act="triton_erf", fc1_tile="m32n32k16w4s2x1f",
                            fc2_tile="m32n32k16w4s2x1f", embed="triton"))
    images = torch.randn(2, cfg.in_chans, *cfg.img_size)
    want = model(images)
    arena = ActivationArena(cfg, 2, torch.float32, "cpu")
    arena.buffer.fill_(255)  # every float32 in it is NaN
    assert _rel(model(images, arena), want) < 1e-6
    stream = model.embed(images)
    for block in model.blocks:
        stream = block(stream, 2, model.plan)
    assert _rel(arena.take("x", cfg.embed_dim), stream) < 1e-6
    with pytest.raises(ValueError, match="made for 2 images, given 3"):
        model(torch.randn(3, cfg.in_chans, *cfg.img_size), arena)


def test_engine_weights_live_in_one_allocation():
    import weight_utils as wu
    from modeling.config import vit_config
    from modeling.vision_transformer import VisionTransformer
    cfg = vit_config("vit_micro_patch8_32", class_token=True, reg_tokens=1)
    state = wu.convert(wu.source_model(cfg, seed=5)[0], cfg)
    loose = VisionTransformer(cfg).load_engine_state(wu.cast_state(state, torch.float32))
    packed = wu.build_engine(cfg, state, torch.float32, "cpu")
    storages = {t.untyped_storage().data_ptr() for t in packed.buffers()}
    assert len(storages) == 1
    base = storages.pop()
    for (name, a), (_, b) in zip(loose.named_buffers(), packed.named_buffers()):
        assert torch.equal(a, b) and (b.data_ptr() - base) % 256 == 0, name  # TMA wants 16-byte aligned
    images = torch.randn(2, 3, 32, 32)
    assert torch.equal(loose(images), packed(images))


@pytest.mark.parametrize("batch,seq,heads,hd,tile", [
    (2, 197, 3, 64, "m64n64w4s2"),      # ragged last key block (masked), full ones unmasked
    (1, 50, 2, 80, "m16n64w4s2"),       # head dim not a power of 2: padded columns
    (2, 17, 4, 16, "m32n32w4s2"),       # fewer tokens than one tile
    (2, 128, 2, 32, "m32n64w4s3tma"),   # TMA loads and stores, no ragged block
    (3, 70, 2, 64, "m64n32w4s3tma"),    # TMA past each image's end and past the buffer's
    (2, 84, 2, 32, "m64n64w4s2tma"),    # 20 ragged rows and keys by TMA
    (1, 577, 2, 64, "m64n64w4s3"),      # ViT-L/16's one ragged query row and key
    (2, 33, 3, 64, ""),                 # the tile chosen by shape
])
def test_triton_attention_matches_reference(batch, seq, heads, hd, tile):
    g = torch.Generator().manual_seed(seq + hd)
    qkv = torch.randn(batch * seq, 3 * heads * hd, generator=g).to(torch.float16)
    got = ops.attention(qkv, batch, heads, hd, "triton", tile)
    want = ops.attention_reference(qkv, batch, heads, hd)
    assert got.shape == (batch * seq, heads * hd) and got.dtype == torch.float16
    assert _rel(got, want) < 2e-3
    assert _rel(ops.attention(qkv.float(), batch, heads, hd, "triton", tile), want.float()) < 2e-3


def test_attention_tiles_parse_and_validate():
    tile = ops.parse_attention_tile("m128n64w8s3tma")
    assert (tile.block_m, tile.block_n, tile.warps, tile.stages, tile.tma) == (128, 64, 8, 3, True)
    assert str(tile) == "m128n64w8s3tma"
    assert ops.Plan(attention="triton", attention_tile="m64n32w4s2").attention_tile == "m64n32w4s2"
    with pytest.raises(ValueError, match="attention_tile"):
        ops.Plan(attention="triton", attention_tile="m64")


def test_attention_tiles_offer_tma_only_where_it_works():
    from modeling import kernels
    cpu = torch.device("cpu")
    assert any(t.tma for t in kernels.attention_tiles(4, 196, 64, cpu))
    assert not any(t.tma for t in kernels.attention_tiles(4, 196, 80, cpu))  # hd 80: no TMA box


def test_attention_tiles_narrow_from_library_rows():
    """From LIBRARY_ROWS rows the plan times only the tiles that ever won there, below only those that
    won below: fewer kernels to compile cold."""
    from modeling import kernels
    cpu = torch.device("cpu")
    big = kernels.LIBRARY_ROWS // 196 + 1
    assert [str(t) for t in kernels.attention_tiles(big, 196, 64, cpu)] == list(kernels._LARGE_TILE_CANDIDATES)
    assert [str(t) for t in kernels.attention_tiles(big, 196, 80, cpu)] == ["m64n64w4s3"]  # no TMA box
    small = kernels.attention_tiles(big - 1, 196, 64, cpu)
    assert [str(t) for t in small] == list(kernels._TILE_CANDIDATES)
    assert [str(t) for t in kernels.attention_tiles(1, 196, 80, cpu)] == [  # no TMA box
        t for t in kernels._TILE_CANDIDATES if not t.endswith("tma")]


def test_attention_block_m_fills_the_gpu():
    from modeling.kernels import attention_block_m
    assert attention_block_m(256, 12, 196) == 128
    assert attention_block_m(1, 12, 196) == 16


def test_compile_only_launches_nothing_and_ends_with_its_context():
    """The plan compiles its Triton candidates in threads inside kernels.compile_only(): a launch
    there must not run (its output stays untouched), and launches after the context run again."""
    import threading

    from modeling import kernels
    x, w = torch.randn(40, 48), torch.randn(24, 48)
    out = torch.full((40, 24), 7.0)
    tile = ops.parse_gemm_tile("m32n32k16w4s2x1f")
    with kernels.compile_only():
        kernels.linear(x, w, out=out, tile=tile)
        seen = []
        other = threading.Thread(target=lambda: seen.append(kernels.linear(x, w, tile=tile)))
        other.start()
        other.join()
    assert torch.all(out == 7.0)
    assert _rel(seen[0], x @ w.t()) < 1e-5  # another thread was not in compile-only mode
    assert _rel(kernels.linear(x, w, out=out, tile=tile), x @ w.t()) < 1e-5


def test_programmatic_dependent_launch_asked_only_where_wanted(monkeypatch):
    """A kernel launched early by the GPU must also be compiled to wait for the kernel before it:
    launch_pdl and the kernel's PDL switch go together, and neither on the CPU (the interpreter
    has no grid dependency control)."""
    from modeling import kernels

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append(kwargs)

    calls = []
    kernels._launch(Recorder(), (1,), 0, pdl=True, BLOCK=4)
    kernels._launch(Recorder(), (1,), 0, pdl=False, BLOCK=4)
    assert calls[0] == {"PDL": True, "launch_pdl": True, "BLOCK": 4}
    assert calls[1] == {"PDL": False, "BLOCK": 4}
    assert not kernels.use_pdl(torch.device("cpu"))
    monkeypatch.setattr(kernels, "FORCE_PDL", True)
    assert kernels.use_pdl(torch.device("cpu"))


def _nvrtc_or_skip():
    """torch's NVRTC compile function (shipped with its CUDA wheels; no GPU needed), or skip."""
    try:
        from torch.cuda._utils import _nvrtc_compile
        _nvrtc_compile('extern "C" __global__ void probe() {}', "probe", "90a")
    except (ImportError, OSError, RuntimeError) as err:
        pytest.skip(f"no NVRTC here: {err}")
    return _nvrtc_compile


@pytest.mark.parametrize("seq,heads,dtype,variant", [(196, 12, torch.float16, "w2s2"), (37, 3, torch.bfloat16, "w1s1"),
                                                     (256, 2, torch.float16, "w1s1")])
def test_cuda_attention_source_builds_for_hopper(seq, heads, dtype, variant):
    """The CUDA C++ attention kernel is built at plan time by NVRTC (shipped with torch's CUDA
    wheels; no GPU needed to compile): its generated source must compile for sm_90a at each shape.
    Its numbers are checked on the GPU (tools/gpu_selftest.py, tools/cuda_attention_check.py)."""
    from modeling import cuda_attention
    _nvrtc_compile = _nvrtc_or_skip()
    binary, name = _nvrtc_compile(cuda_attention.source(seq, heads, dtype, variant), "short_attention", "90a", None,
                                  ["--use_fast_math"])
    assert name == "short_attention" and len(binary) > 1000
    with pytest.raises(RuntimeError):  # a broken source fails (the check above can fail)
        _nvrtc_compile(cuda_attention.source(seq, heads, dtype, variant).replace("wgmma.fence", "wgmma.fencex"),
                       "short_attention", "90a", None, ["--use_fast_math"])


def test_cuda_attention_probes_keep_pv_mmas():
    """The timing probes that switch the output off must still run P V: ptxas drops MMAs whose
    results nothing reads, and before perf-notes attempt 65 those probes timed a kernel without them.
    Counted in the SASS of each build (NVRTC, and Triton's bundled nvdisasm)."""
    import os
    import subprocess
    import triton
    from modeling import cuda_attention
    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    _nvrtc_compile = _nvrtc_or_skip()
    if not os.access(nvdisasm, os.X_OK):
        pytest.skip("no nvdisasm beside Triton")

    def pv_mmas(defines):
        binary, _ = _nvrtc_compile(defines + cuda_attention.source(196, 12, torch.float16, "w2s2"), "short_attention",
                                   "90a", None, ["--use_fast_math"])
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(binary)
            f.flush()
            done = subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        sass = done.stdout
        return sass.count("HGMMA.64x64x16")
    keys = -(-196 // 16)
    assert pv_mmas("") == keys
    for bits in (8, 64, 8 | 2):
        assert pv_mmas(f"#define PROBE {bits}\n") == keys, bits
    assert pv_mmas("#define PROBE 16\n") == 0  # the count can fail: this probe has no MMAs at all


def test_cuda_attention_only_where_it_runs():
    from modeling import cuda_attention
    assert not cuda_attention.supported(196, 64, torch.float16, torch.device("cpu"))
    assert ops.Plan(attention="cuda", attention_tile="w1s1").attention_tile == "w1s1"
    with pytest.raises(ValueError, match="cuda attention variant"):
        ops.Plan(attention="cuda", attention_tile="m64n64w4s3")
    for seq in (196, 256):
        for variant in ("w2s2", "w2s2p"):
            assert cuda_attention.shared_bytes(seq, variant) <= 227 * 1024
        assert 2 * (cuda_attention.shared_bytes(seq, "w1s1") + 1024) <= 228 * 1024  # two CTAs, 1 KB reserved each
