"""The C one-row decode products (llava_next/model/cpu_gemv.c) against their PyTorch references, the
quantized and decoder layers that call them, and the measured per-CPU policy that chooses them
(model/policy.py ``gemv_choice``)."""

from __future__ import annotations

import json
import platform

import pytest
import torch

from llava_next.model import policy
from llava_next.model.llava import DecodeLinear
from llava_next.model.quant import Int4Linear, Int8Linear
from llava_next.model import cpu_gemv

pytestmark = pytest.mark.skipif(cpu_gemv.load() is None, reason="no C compiler for the CPU decode kernels")


@pytest.fixture(autouse=True)
def two_threads():
    """The loops split their rows (attention: its heads) across OpenMP threads with torch's thread count: run
    them split, as a user's process does, whatever thread count this test worker has (tests/conftest.py)."""
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


def close(got: torch.Tensor, want: torch.Tensor) -> float:
    """Max abs difference relative to the output's scale."""
    return (got.float() - want.float()).abs().max().item() / want.float().abs().max().item()


# The three builds of cpu_gemv.c a CPU can take (its header): "native" (on Zen 4 and Sapphire Rapids the
# AVX512-BF16 loops), "skylake-avx512" (AVX-512 without BF16: Skylake-SP to Ice Lake) and "x86-64-v3" (AVX2,
# the plain C loops). Each is checked on every CPU that can run it; a build the CPU lacks the flags for is skipped.
MARCH_FLAGS = {"native": (), "skylake-avx512": ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"),
               "x86-64-v3": ("avx2", "fma")}


def use_build(march: str, monkeypatch) -> None:
    """Load the library built with ``-march=march`` for this test, or skip where this CPU cannot run it."""
    missing = [f for f in MARCH_FLAGS[march] if f not in cpu_gemv.cpu_identity().split()]
    if missing:
        pytest.skip(f"the {march} build needs {', '.join(missing)}")
    if march != "native":
        monkeypatch.setattr(cpu_gemv, "_lib", cpu_gemv.bind(cpu_gemv.build(march=march)))


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86 targets")
@pytest.mark.parametrize("march", ["sapphirerapids", "cooperlake", "skylake-avx512", "x86-64-v3"])
def test_every_x86_build_compiles_whatever_this_cpu_runs(march):
    """Each set of loops in cpu_gemv.c compiles, the AVX512-BF16 ones too on a CPU that cannot run them
    (Sapphire Rapids: AMX and AVX512-BF16; Cooper Lake: AVX512-BF16 alone, as Zen 4 has it); the tests below run
    the sets this CPU can execute."""
    assert cpu_gemv.build(march=march).stat().st_size > 0


# the outputs are bf16: fp32 sums in another order round to the neighbouring bf16 value at most
BF16_ULP = 2 ** -7
SHAPES = [(16, 64), (37, 100), (129, 4096), (48, 384), (96, 1000)]  # tails: K % 32, K % 64, N % 16


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("N,K", SHAPES)
def test_bf16_and_int8_match_fp32_sums(N, K, rows, threads):
    torch.manual_seed(N + K + rows)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x, w, b = torch.randn(2, rows, K).bfloat16(), torch.randn(N, K).bfloat16(), torch.randn(N).bfloat16()
        assert cpu_gemv.gemv_bf16(x, w, b).shape == (2, rows, N)
        assert close(cpu_gemv.gemv_bf16(x, w, b), cpu_gemv.gemv_reference(x, w, b)) <= BF16_ULP
        assert close(cpu_gemv.gemv_bf16(x, w), cpu_gemv.gemv_reference(x, w)) <= BF16_ULP
        q, s = torch.randint(-127, 128, (N, K), dtype=torch.int8), torch.rand(N).bfloat16()
        want = cpu_gemv.gemv_reference(x, cpu_gemv.int8_weight(q, s), b)
        assert close(cpu_gemv.gemv_int8(x, q, s, b), want) <= BF16_ULP
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
@pytest.mark.parametrize("rows", [1, 4])
def test_int4_matches_the_dequantized_weight(group_size, rows):
    """Every group size: 32 / 64 bytes per group take the portable loop, 128 / 256 the AVX512-BF16 one
    (where the CPU has it), whose 128 + q trick must cancel exactly in the zero-point correction."""
    torch.manual_seed(group_size + rows)
    N, K = 80, 1024
    x, b = torch.randn(rows, K).bfloat16(), torch.randn(N).bfloat16()
    packed = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8)
    scales, zeros = torch.rand(N, K // group_size).bfloat16(), torch.randn(N, K // group_size).bfloat16()
    want = cpu_gemv.gemv_reference(x, cpu_gemv.int4_weight(packed, scales, zeros, group_size), b)
    assert close(cpu_gemv.gemv_int4(x, packed, scales, zeros, group_size, b), want) <= BF16_ULP


def test_bad_inputs_are_clear_errors():
    w = torch.randn(8, 64).bfloat16()
    with pytest.raises(ValueError, match="bfloat16 activations"):
        cpu_gemv.gemv_bf16(torch.randn(1, 64), w)
    with pytest.raises(ValueError, match="the input has 32 features, the weight 64"):
        cpu_gemv.gemv_bf16(torch.randn(1, 32).bfloat16(), w)
    with pytest.raises(ValueError, match="contiguous"):
        cpu_gemv.gemv_bf16(torch.randn(1, 64).bfloat16(), torch.randn(64, 8).bfloat16().T)
    with pytest.raises(ValueError, match="bfloat16 weights, scales"):
        cpu_gemv.gemv_int8(torch.randn(1, 64).bfloat16(), torch.ones(8, 64, dtype=torch.int8), torch.ones(8))


# ---- the layers -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gemv", ["kernel", "torch"])
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_layers_decode_through_the_chosen_product(method, gemv, monkeypatch):
    """A decode step (1 row) of Int8Linear / Int4Linear: the C loops or torch's kernel, both within bf16
    rounding of the fp32 product with the dequantized weight; the kernel path builds no second int4 layout."""
    monkeypatch.setenv("LLAVA_NEXT_GEMV", gemv)
    torch.manual_seed(0)
    linear = torch.nn.Linear(512, 96, bias=True).bfloat16()
    layer = Int8Linear.from_linear(linear) if method == "int8" else Int4Linear.from_linear(linear, 128)
    if method == "int4":
        assert (layer.packed is None) == (gemv == "kernel")
    x = torch.randn(1, 1, 512).bfloat16()
    want = cpu_gemv.gemv_reference(x, layer.dequantized(torch.float32), layer.bias)
    assert close(layer(x), want) <= BF16_ULP
    calls = []
    monkeypatch.setattr(cpu_gemv, f"gemv_{method}", lambda *a: calls.append(1) or torch.zeros(1, 1, 96).bfloat16())
    layer(x)
    assert calls == ([1] if gemv == "kernel" else [])


def test_decode_linear_runs_the_loops_for_decode_rows_only(monkeypatch):
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 64, bias=True).bfloat16()
    layer = DecodeLinear.from_linear(linear)
    assert layer.weight is linear.weight and not layer.weight.requires_grad  # the same tensor: no copy
    calls = []
    real = cpu_gemv.gemv_bf16
    monkeypatch.setattr(cpu_gemv, "gemv_bf16", lambda *a: calls.append(a[0].shape) or real(*a))
    for rows in (1, policy.GEMV_MAX_ROWS, policy.GEMV_MAX_ROWS + 1, 300):
        x = torch.randn(1, rows, 256).bfloat16()
        assert close(layer(x), torch.nn.functional.linear(x, linear.weight, linear.bias)) <= BF16_ULP
    assert [s[1] for s in calls] == [1, policy.GEMV_MAX_ROWS]
    x = torch.randn(1, 1, 256).bfloat16().requires_grad_()
    layer(x).sum().backward()  # a gradient to the input goes through F.linear
    assert x.grad is not None and len(calls) == 2


def test_bf16_prompts_sum_in_fp32_where_this_cpu_measured_it_faster(monkeypatch, tmp_path):
    """``policy.prompt_choice``: measured once per CPU and cached, "fp32" where oneDNN's bf16 GEMM ran clearly
    slower than widening (a CPU without AVX512-BF16 or AMX), a near tie keeps bf16, ``LLAVA_NEXT_GEMV=torch`` keeps
    bf16. With "fp32" a DecodeLinear's prompt (and a quantized layer's, on its dequantized bf16 weight) sums in
    fp32 over chunks of the widened weight, bias included, rounded once: within bf16 rounding of the float64
    product; with "bf16" it is F.linear's bits. ``pack_for_cpu`` then keeps every bf16 linear plain (no prepacked
    copy), the vision tower's too."""
    from llava_next.model import quant
    from llava_next.model.llava import LlavaNextModel, PackedLinear

    from checkpoints import tiny_config

    monkeypatch.setenv("LLAVA_NEXT_CACHE", str(tmp_path))
    monkeypatch.delenv("LLAVA_NEXT_GEMV", raising=False)
    monkeypatch.setattr(policy, "_choices", {})
    measured, rates = [], {"bf16": 60e9, "fp32": 140e9}
    monkeypatch.setattr(policy, "measure_prompt", lambda: measured.append(1) or dict(rates))
    assert policy.prompt_choice() == "fp32" and measured == [1]
    monkeypatch.setattr(policy, "_choices", {})  # a new process: the file answers
    assert policy.prompt_choice() == "fp32" and measured == [1]
    monkeypatch.setenv("LLAVA_NEXT_GEMV", "torch")
    assert policy.prompt_choice() == "bf16"
    monkeypatch.delenv("LLAVA_NEXT_GEMV")
    monkeypatch.setattr(policy, "_choices", {"bf16": "torch"})
    rates["fp32"] = 1.05 * rates["bf16"]
    monkeypatch.setattr(policy, "cpu_key", lambda: "another CPU")
    assert policy.prompt_choice() == "bf16"  # a near tie

    torch.manual_seed(3)
    linear = torch.nn.Linear(700, 1100, bias=True).bfloat16()  # 1100 outputs: chunks of 512, 512 and 76
    layer, x = DecodeLinear.from_linear(linear), torch.randn(2, 150, 700).bfloat16()
    want = x.double() @ linear.weight.double().T + linear.bias.double()
    dtypes = []
    real = torch.nn.functional.linear
    monkeypatch.setattr(quant.F, "linear", lambda a, w, b=None: dtypes.append(a.dtype) or real(a, w, b))
    with torch.no_grad():
        assert torch.equal(layer(x).view(torch.int16), real(x, linear.weight, linear.bias).view(torch.int16))
        policy._choices["prompt"] = "fp32"
        dtypes.clear()
        got = layer(x)
        assert got.dtype == torch.bfloat16 and dtypes == [torch.float32] * 3
        assert close(got, want) <= 2 ** -8  # one rounding to bf16
        assert close(layer(x[:, :1]), want[:, :1]) <= 2 ** -8  # a decode row: the C loop, not the chunks
        q = Int8Linear.from_linear(linear.float(), torch.bfloat16)
        # the bf16 model's dequantized weight, summed in fp32: one rounding from the float64 product
        want = x.double() @ q.dequantized(torch.bfloat16).double().T + q.bias.double()
        assert close(q(x), want) <= 2 ** -8
        assert dtypes[-1] == torch.float32

        model = LlavaNextModel(tiny_config()).eval().to(torch.bfloat16)
        assert model.pack_for_cpu()
        linears = [m for m in model.modules() if isinstance(m, (DecodeLinear, PackedLinear))]
        assert linears and all(type(m) is DecodeLinear for m in linears)
        assert any(type(m) is DecodeLinear for m in model.vision_tower.modules())


# ---- the policy ----------------------------------------------------------------------------------------------
def test_the_faster_measured_path_wins_only_by_the_margin():
    """A near tie keeps torch's own path (or bf16's F.linear): measured again it could go the other way."""
    assert policy.choose_faster({"kernel": 30e9, "torch": 20e9}) == "kernel"
    assert policy.choose_faster({"kernel": 10e9, "torch": 20e9}) == "torch"
    assert policy.choose_faster({"kernel": 20e9, "torch": 20e9}) == "torch"
    assert policy.choose_faster({"kernel": 21e9, "torch": 20e9}) == "torch"  # 5% faster: within the margin
    assert policy.choose_faster({"kernel": 22.2e9, "torch": 20e9}) == "kernel"
    assert policy.choose_faster({"bf16": 60e9, "fp32": 64e9}, incumbent="bf16") == "bf16"
    assert policy.choose_faster({"bf16": 60e9, "fp32": 140e9}, incumbent="bf16") == "fp32"


def test_the_choice_is_measured_once_per_cpu_and_cached(monkeypatch, tmp_path):
    """First use on a CPU measures and writes policy.json under that CPU's key; a second process on the same
    CPU reads it; another CPU model gets its own measurement (its own best path)."""
    monkeypatch.setenv("LLAVA_NEXT_CACHE", str(tmp_path))
    monkeypatch.delenv("LLAVA_NEXT_GEMV", raising=False)
    monkeypatch.setattr(policy, "_choices", {})
    measured = []
    rates = {"Zen 4": {"kernel": 30e9, "torch": 17e9}, "Xeon AMX": {"kernel": 20e9, "torch": 26e9}}
    cpu = ["Zen 4"]
    monkeypatch.setattr(policy, "cpu_key", lambda: cpu[0])
    monkeypatch.setattr(policy, "measure_gemv", lambda fmt: measured.append((cpu[0], fmt)) or rates[cpu[0]])
    assert policy.gemv_choice("bf16") == "kernel" and measured == [("Zen 4", "bf16")]
    monkeypatch.setattr(policy, "_choices", {})  # a new process: the file answers
    assert policy.gemv_choice("bf16") == "kernel" and len(measured) == 1
    cpu[0] = "Xeon AMX"
    monkeypatch.setattr(policy, "_choices", {})
    assert policy.gemv_choice("bf16") == "torch" and measured[-1] == ("Xeon AMX", "bf16")
    saved = json.loads((tmp_path / "kernels" / "policy.json").read_text())
    assert saved["Zen 4"]["bf16"]["choice"] == "kernel" and saved["Xeon AMX"]["bf16"]["GB/s"] == {"kernel": 20.0, "torch": 26.0}


def test_the_switch_and_a_missing_compiler(monkeypatch, tmp_path):
    monkeypatch.setenv("LLAVA_NEXT_GEMV", "fast")
    with pytest.raises(ValueError, match="LLAVA_NEXT_GEMV='fast': use auto"):
        policy.gemv_choice("bf16")
    monkeypatch.setenv("LLAVA_NEXT_GEMV", "torch")
    assert policy.gemv_choice("int4") == "torch"
    with pytest.raises(ValueError, match="no decode product for 'fp8'"):
        policy.gemv_choice("fp8")
    # no compiler: the library cannot be built, every format decodes with torch, and failure() says why
    monkeypatch.setenv("LLAVA_NEXT_GEMV", "kernel")
    monkeypatch.setenv("LLAVA_NEXT_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setattr(cpu_gemv, "_lib", None)
    monkeypatch.setattr(cpu_gemv, "_failure", None)
    assert policy.gemv_choice("bf16") == "torch"
    assert "no-such-cc" in cpu_gemv.failure()
    with pytest.raises(RuntimeError, match="not available: .*no-such-cc"):
        cpu_gemv.gemv_bf16(torch.randn(1, 8).bfloat16(), torch.randn(4, 8).bfloat16())


def test_the_measurement_times_both_paths_on_real_weights(monkeypatch):
    """measure_gemv runs both candidates of each format (a real, if small, measurement) and returns rates."""
    monkeypatch.setattr(policy, "gemv_probe_bytes", lambda: 1 << 20)
    for fmt in policy.GEMV_FORMATS:
        rates = policy.measure_gemv(fmt)
        assert set(rates) == {"kernel", "torch"} and all(r > 0 for r in rates.values())


def test_the_probe_reads_more_than_the_last_level_cache(tmp_path, monkeypatch):
    """The probe's weights are LLC_MULTIPLE x the largest cache sysfs lists, at least GEMV_PROBE_BYTES, so a pass
    reads memory as a decode step does; the size is part of the CPU key (another size measures again)."""
    sizes = {"index0": "48K", "index1": "32K", "index2": "2048K", "index3": "107520K"}  # a 105 MB L3
    for index, size in sizes.items():
        (tmp_path / index).mkdir()
        (tmp_path / index / "size").write_text(size + "\n")
    assert policy.last_level_cache_bytes(str(tmp_path)) == 107520 << 10
    assert policy.last_level_cache_bytes(str(tmp_path / "absent")) == 0
    (tmp_path / "index3" / "size").write_text("unknown\n")
    assert policy.last_level_cache_bytes(str(tmp_path)) == 2048 << 10
    monkeypatch.setattr(policy, "last_level_cache_bytes", lambda: 107520 << 10)
    assert policy.gemv_probe_bytes() == policy.LLC_MULTIPLE * (107520 << 10) > 107520 << 10
    key = policy.cpu_key()
    assert key.endswith(f"probe {policy.LLC_MULTIPLE * 105} MiB")
    monkeypatch.setattr(policy, "last_level_cache_bytes", lambda: 0)  # none known: the floor
    assert policy.gemv_probe_bytes() == policy.GEMV_PROBE_BYTES and policy.cpu_key() != key


@pytest.mark.parametrize("march", ["skylake-avx512", "x86-64-v3"])
def test_the_loops_of_cpus_without_avx512_bf16(march, monkeypatch):
    """The same source built for AVX-512 without BF16 (skylake-avx512) and for AVX2 (x86-64-v3) takes the loops
    those CPUs get: same numbers within bf16 rounding, every format and tail, int4 groups of both loops."""
    use_build(march, monkeypatch)
    torch.manual_seed(5)
    for N, K in [(37, 100), (129, 4096)]:
        x, w, b = torch.randn(2, K).bfloat16(), torch.randn(N, K).bfloat16(), torch.randn(N).bfloat16()
        assert close(cpu_gemv.gemv_bf16(x, w, b), cpu_gemv.gemv_reference(x, w, b)) <= BF16_ULP
        q, s = torch.randint(-127, 128, (N, K), dtype=torch.int8), torch.rand(N).bfloat16()
        assert close(cpu_gemv.gemv_int8(x, q, s), cpu_gemv.gemv_reference(x, cpu_gemv.int8_weight(q, s))) <= BF16_ULP
    x = torch.randn(3, 1024).bfloat16()
    for G in (32, 64, 128, 256):
        p = torch.randint(0, 256, (80, 512), dtype=torch.uint8)
        sc, z = torch.rand(80, 1024 // G).bfloat16(), torch.randn(80, 1024 // G).bfloat16()
        want = cpu_gemv.gemv_reference(x, cpu_gemv.int4_weight(p, sc, z, G))
        assert close(cpu_gemv.gemv_int4(x, p, sc, z, G), want) <= BF16_ULP


@pytest.mark.parametrize("march", list(MARCH_FLAGS))
def test_int8_and_int4_rows_dequantize_in_c_to_torchs_bits(march, monkeypatch):
    """The rows a prompt-sized GEMM dequantizes (cpu_dequant.c) against the torch ops they replace, bit for
    bit: int8 into fp32 and bf16, int4 into bf16 (rounded after the product and after the sum), and both into
    their bf16 numbers written as fp32 (``widen``, a prompt summed in fp32), bf16 and fp32 scales, the native and
    the portable build."""
    use_build(march, monkeypatch)
    torch.manual_seed(7)
    for scale_dtype in (torch.bfloat16, torch.float32):
        lin = torch.nn.Linear(1000, 48, bias=False).to(scale_dtype)
        layers = [(Int8Linear.from_linear(lin), (torch.float32, torch.bfloat16))]
        layers += [(Int4Linear.from_linear(torch.nn.Linear(1024, 48, bias=False).to(scale_dtype), g), (torch.bfloat16,))
                   for g in (32, 128)]
        for layer, dtypes in layers:
            for dtype, widen in [(d, False) for d in dtypes] + [(torch.bfloat16, True)]:
                got = layer.dequantized_rows(5, 40, dtype, widen)
                with monkeypatch.context() as m:
                    m.setattr(cpu_gemv, "load", lambda: None)  # torch's ops
                    want = layer.dequantized_rows(5, 40, dtype, widen)
                assert got.dtype == (torch.float32 if widen else dtype)
                bits = torch.int32 if got.dtype == torch.float32 else torch.int16
                assert torch.equal(got.view(bits), want.view(bits)), (type(layer).__name__, scale_dtype, dtype, widen)


@pytest.mark.parametrize("march", list(MARCH_FLAGS))
def test_int8_activations_of_a_prompt_in_c_to_torchs_bits(march, monkeypatch):
    """The int8-activation prompt (``Int8Linear.activations = "int8"``): the C row quantization and the C scaling
    of the int32 sums (cpu_dequant.c) against the torch ops they replace, bit for bit; rows with an outlier, an
    all-zero row, ties at .5, a bias and none, the native and the portable build."""
    from llava_next.model.quant import set_activations

    use_build(march, monkeypatch)
    torch.manual_seed(11)
    x = torch.randn(600, 1000).bfloat16()
    x[3, 17], x[4] = 300.0, 0.0  # an outlier; a zero row (its scale clamps to fp32's smallest normal)
    x[5, :254], x[5, 254] = (torch.arange(-127, 127) + 0.5).bfloat16(), 127.0  # s = 1: exact ties, to even
    q, s = cpu_gemv.quantize_rows_int8(x)
    for bias in (False, True):
        # 600 x 2048 outputs: enough that an fp32 product in another order would round some to another bf16
        layer = Int8Linear.from_linear(torch.nn.Linear(1000, 2048, bias=bias), torch.bfloat16)
        set_activations(layer, "int8")
        with torch.no_grad():
            got = layer(x)
            with monkeypatch.context() as m:
                m.setattr(cpu_gemv, "load", lambda: None)  # torch's ops
                want = layer(x)
                x32 = x.float()
                want_s = x32.abs().amax(-1, keepdim=True).div_(127).clamp_min_(torch.finfo(torch.float32).tiny)
                want_q = (x32 / want_s).round_().to(torch.int8)
        assert torch.equal(got.view(torch.int16), want.view(torch.int16)), bias
    assert torch.equal(q, want_q) and torch.equal(s.view(torch.int32), want_s.view(torch.int32))
    assert q[3].abs().max() == 127 and (q[3] == 0).float().mean() > 0.7  # the outlier (300) row: steps of 2.4


@pytest.mark.parametrize("march", list(MARCH_FLAGS))
def test_int8_activation_decode_products_in_c(march, monkeypatch):
    """cpu_int8_activations.c against torch on the same numbers, in every build (native: AVX512-VNNI where the
    CPU has it; skylake-avx512 and x86-64-v3: the plain loops): int8 weights bit for bit against the prompt's
    integer GEMM (``torch._int_mm`` and the scaling in torch), tails past 64 and 128 columns; int4 weights within
    one bf16 rounding of the float64 formula, groups of 32 to 256, a bias and none, 1-3 rows."""
    from llava_next.model.int8_activations import int8_activation_linear
    from test_quant import int4_activations_reference

    use_build(march, monkeypatch)
    torch.manual_seed(13)
    for K, N, M in ((1000, 40, 1), (4096, 64, 3), (192, 33, 2)):
        x = torch.randn(M, K).bfloat16()
        x[0, K // 2] = 50.0
        layer = Int8Linear.from_linear(torch.nn.Linear(K, N, bias=M != 3), torch.bfloat16)
        got = cpu_gemv.gemv_int8_a8(x, layer.weight, layer.scales, layer.bias)
        with monkeypatch.context() as m:
            m.setattr(cpu_gemv, "load", lambda: None)  # quantize_rows and the scaling in torch, _int_mm
            want = int8_activation_linear(layer, x)
        assert torch.equal(got.view(torch.int16), want.view(torch.int16)), (K, N, M)
    for G in (32, 64, 128, 256):
        for bias in (False, True):
            layer = Int4Linear.from_linear(torch.nn.Linear(512, 48, bias=bias), G, torch.bfloat16)
            x = torch.randn(1 + G % 3, 512).bfloat16()
            got = cpu_gemv.gemv_int4_a8(x, layer.weight, layer.scales, layer.zeros, G, layer.bias)
            want = int4_activations_reference(x, layer)
            assert ((got.double() - want).abs() <= 2 ** -8 * want.abs()).all(), (G, bias)


@pytest.mark.parametrize("march", list(MARCH_FLAGS))
def test_one_query_attention_in_c_matches_the_fp32_formula(march, monkeypatch):
    """A decode step's attention in C (cpu_gemv.c ``attend_one_query``) against ``attention.one_query_attention``
    (fp32 scores, softmax and sums, rounded once): within one bf16 rounding, for head sizes of the AVX512-BF16
    loops (64, 128) and of the plain ones (40), grouped queries, one key and odd lengths, a batch of two, a
    slice of a longer cache, and scores far apart (most weights underflow: the max is subtracted first)."""
    from llava_next.model.attention import one_query_attention

    use_build(march, monkeypatch)
    torch.manual_seed(13)
    for B, Hq, Hkv, S, D, sharp in [(1, 4, 4, 1, 128, 1), (2, 8, 2, 17, 64, 1), (1, 32, 8, 300, 128, 1),
                                    (1, 6, 3, 33, 40, 1), (1, 4, 1, 257, 128, 30)]:
        cache_k, cache_v = torch.randn(B, Hkv, S + 9, D).bfloat16(), torch.randn(B, Hkv, S + 9, D).bfloat16()
        k, v = cache_k[:, :, :S], cache_v[:, :, :S]  # strided: the model's cache slice
        q = (torch.randn(B, Hq, 1, D) * sharp).bfloat16()
        got = cpu_gemv.attend_one_query(q, k, v)
        want = one_query_attention(q, k, v)
        assert got.shape == want.shape and close(got, want) <= BF16_ULP, (B, Hq, Hkv, S, D, close(got, want))
    assert cpu_gemv.attend_one_query(q.float(), k.float(), v.float()) is None  # fp32: not this loop
    # the weights themselves: one-hot values make out[d] the softmax weight of key d, each within one bf16 step
    S, D = 128, 128
    q = torch.randn(1, 1, 1, D).bfloat16()
    k = torch.randn(1, 1, S, D).bfloat16()
    v = torch.eye(S, D)[None, None].bfloat16()
    got, want = cpu_gemv.attend_one_query(q, k, v).float(), torch.softmax(
        (q.double() @ k.double().transpose(-1, -2)) / D ** 0.5, -1).float()
    step = 2.0 ** (torch.floor(torch.log2(want.abs())) - 7)  # bf16's spacing at each weight
    assert ((got - want).abs() <= step).all(), ((got - want).abs() / step).max()
