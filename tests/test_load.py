"""Lazy loading (mmap-backed tensors, meta module + assign) and hub resolution with a local fake hub."""

import fnmatch
import json
import mmap
import os
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import llava_next_weights.hub as hub
import llava_next_weights.load as load
from checkpoints import make_llava_hf_checkpoint
from llava_next_weights.convert import convert
from llava_next_weights.load import (LoadError, _cast, is_file_mapped, load_into, load_state_dict_mmap, read_config,
                                     release_file_pages)
from llava_next_weights.shapes import expected_shapes


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("load")
    src, model = make_llava_hf_checkpoint(root / "hf", "video", "mistral", names="hub")
    return src, convert(src, root / "ours", shard_bytes=40_000, progress=False)


def mapped_file(ptr: int) -> str | None:
    """The file mapped at address ``ptr`` in this process (Linux /proc/self/maps)."""
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo <= ptr < hi:
                return parts[5] if len(parts) > 5 else None
    return None


def mapped_pages(t: torch.Tensor) -> int:
    """How many of the pages lying wholly inside ``t`` are mapped in this process (Linux /proc/self/pagemap)."""
    page = mmap.PAGESIZE
    first, last = -(-t.data_ptr() // page), (t.data_ptr() + t.nbytes) // page
    if last <= first:
        return 0
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(first * 8)
        return sum(entry >> 63 for entry in struct.unpack(f"{last - first}Q", f.read(8 * (last - first))))


needs_proc = pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux /proc/self/maps")


class Stand_in(nn.Module):
    """A module with exactly the given parameter names/shapes, built on the meta device (the real model
    module does not exist yet; any module tree with these names loads the same way)."""

    def __init__(self, shapes):
        super().__init__()
        for name, shape in shapes.items():
            *path, leaf = name.split(".")
            m = self
            for part in path:
                if not hasattr(m, part):
                    m.add_module(part, nn.Module())
                m = getattr(m, part)
            m.register_parameter(leaf, nn.Parameter(torch.empty(shape)))


def meta_module(path, drop=(), add=None):
    shapes = {k: v for k, v in expected_shapes(read_config(path)).items() if k not in drop}
    shapes.update(add or {})
    with torch.device("meta"):
        return Stand_in(shapes)


# ---- loading ---------------------------------------------------------------------------------------
@needs_proc
def test_mmap_state_dict_is_backed_by_the_files(converted):
    _, out = converted
    state = load_state_dict_mmap(out)
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert len({*index.values()}) > 1 and state.keys() == index.keys()
    for key, t in state.items():
        assert mapped_file(t.data_ptr()) == str((out / index[key]).resolve()), key


@needs_proc
def test_load_into_meta_module_assigns_the_file_tensors(converted):
    src, out = converted
    module = meta_module(out)
    assert all(p.is_meta for p in module.parameters())
    load_into(module, out)
    reference = load_state_dict_mmap(out)
    names = dict(module.named_parameters())
    assert names.keys() == reference.keys()
    for key, p in names.items():
        assert isinstance(p, nn.Parameter) and not p.is_meta and torch.equal(p, reference[key]), key
        assert mapped_file(p.data_ptr()) is not None and mapped_file(p.data_ptr()).endswith(".safetensors"), key
    # and the values are the source checkpoint's (through the converter)
    hf = load_state_dict_mmap(src)  # hub names: one spot check per family
    assert torch.equal(names["language_model.layers.1.mlp.down_proj.weight"],
                       hf["language_model.model.layers.1.mlp.down_proj.weight"])
    assert torch.equal(names["vision_tower.layers.0.self_attn.q_proj.bias"],
                       hf["vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.bias"])


def test_load_into_casts(converted):
    _, out = converted
    module = load_into(meta_module(out), out, dtype=torch.bfloat16)
    reference = load_state_dict_mmap(out)
    for key, p in module.named_parameters():
        assert p.dtype == torch.bfloat16 and torch.equal(p, reference[key].to(torch.bfloat16)), key


@pytest.mark.parametrize("chunk", [load.CAST_CHUNK, 1000])  # 1000 bytes: many chunks, none page-aligned
def test_load_into_casts_bf16_files_to_float32_exactly(converted, tmp_path, monkeypatch, chunk):
    src, _ = converted
    out = convert(src, tmp_path / "bf16", dtype="bf16", shard_bytes=40_000, progress=False)
    monkeypatch.setattr(load, "CAST_CHUNK", chunk)
    module = load_into(meta_module(out), out, dtype=torch.float32)
    reference = load_state_dict_mmap(out)
    assert {t.dtype for t in reference.values()} == {torch.bfloat16}
    assert chunk > 1000 or max(t.nbytes for t in reference.values()) > 30 * chunk  # really split up
    for key, p in module.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p, reference[key].to(torch.float32)), key


@pytest.fixture
def mapped_abc(tmp_path):
    """Tensors a, b, c of one safetensors file, mmapped, lying back to back; b spans many pages, c is 6 bytes,
    and neither b's start nor its end is on a page boundary."""
    values = {"a": torch.randn(3001), "b": torch.randn(300_001), "c": torch.randn(3)}
    save_file({k: v.to(torch.bfloat16) for k, v in values.items()}, tmp_path / "abc.safetensors")
    state = load_file(tmp_path / "abc.safetensors")
    a, b, c = state["a"], state["b"], state["c"]
    assert b.data_ptr() == a.data_ptr() + a.nbytes and c.data_ptr() == b.data_ptr() + b.nbytes
    assert b.data_ptr() % mmap.PAGESIZE and c.data_ptr() % mmap.PAGESIZE
    return a, b, c, {k: v.to(torch.bfloat16) for k, v in values.items()}


@needs_proc
def test_cast_releases_the_source_pages_and_they_stay_readable(mapped_abc):
    _, b, _, values = mapped_abc
    assert torch.equal(b, values["b"])  # maps every page of b
    assert mapped_pages(b) == b.nbytes // mmap.PAGESIZE - 1 > 100  # the pages wholly inside b
    out = _cast(b, torch.float32, torch.device("cpu"))
    assert mapped_pages(b) == 0
    assert torch.equal(out, values["b"].to(torch.float32))
    assert torch.equal(b, values["b"])  # read back from the file
    assert _cast(b, torch.bfloat16, torch.device("cpu")) is b and mapped_pages(b) > 0  # no copy: kept


@needs_proc
def test_release_leaves_pages_shared_with_neighbours_and_small_tensors_alone(mapped_abc):
    a, b, c, values = mapped_abc
    # Writing into a and c makes their pages private copies (the mapping is copy-on-write); a released page
    # would be read back from the file, so a or c losing its write means release dropped their page.
    a.mul_(2)
    c.mul_(2)
    for t in (b[1:2], b[-3:], c, b):  # a slice inside one page, b's last (shared) page, a 6-byte tensor, b
        release_file_pages(t)
    assert mapped_pages(b) == 0
    assert torch.equal(a, 2 * values["a"]) and torch.equal(c, 2 * values["c"])
    assert torch.equal(b, values["b"])


@needs_proc
def test_is_file_mapped_tells_checkpoint_views_from_copies(mapped_abc):
    a, b, c, _ = mapped_abc
    assert is_file_mapped(a) and is_file_mapped(b[5:9]) and is_file_mapped(c)
    copy = _cast(b, torch.float32, torch.device("cpu"))
    assert not is_file_mapped(copy) and not is_file_mapped(b.clone()) and not is_file_mapped(torch.empty(0))


def test_load_into_names_missing_unexpected_and_misshaped_keys(converted):
    _, out = converted
    with pytest.raises(LoadError, match=r"language_model\.norm\.weight: got \(64,\), expected \(63,\)"):
        load_into(meta_module(out, add={"language_model.norm.weight": (63,)}), out)
    with pytest.raises(LoadError, match=r"unexpected 1 key\(s\): image_newline"):
        load_into(meta_module(out, drop=("image_newline",)), out)
    with pytest.raises(LoadError, match=r"missing 1 key\(s\): extra\.weight"):
        load_into(meta_module(out, add={"extra.weight": (3,)}), out)


def test_non_persistent_buffers_need_init_buffers(converted):
    _, out = converted

    def with_rope(init):
        module = meta_module(out)
        rope = nn.Module()
        with torch.device("meta"):
            rope.register_buffer("inv_freq", torch.empty(8), persistent=False)
        if init:
            rope.init_buffers = lambda device: rope.register_buffer(
                "inv_freq", torch.arange(8.0, device=device), persistent=False)
        module.language_model.add_module("rope", rope)
        return module

    with pytest.raises(LoadError, match=r"language_model\.rope\.inv_freq.*init_buffers"):
        load_into(with_rope(init=False), out)
    module = load_into(with_rope(init=True), out)
    assert torch.equal(module.language_model.rope.inv_freq, torch.arange(8.0))


def test_read_config_refuses_unconverted_dirs(converted):
    src, out = converted
    assert read_config(out).video_token_id == 128
    with pytest.raises(LoadError, match="convert it first"):
        read_config(src)


# ---- hub resolution ---------------------------------------------------------------------------------
def test_local_dirs(converted, tmp_path, monkeypatch):
    src, out = converted
    assert hub.resolve(out, cache_dir=tmp_path) == out  # already llava-next's layout
    local = tmp_path / "src"
    shutil.copytree(src, local)
    first = hub.resolve(local, cache_dir=tmp_path / "cache", progress=False)
    assert first.parent == tmp_path / "cache" / "local" and read_config(first).video_token_id == 128
    monkeypatch.setattr(hub, "convert", lambda *a, **k: pytest.fail("converted twice"))
    assert hub.resolve(local, cache_dir=tmp_path / "cache") == first  # converted once
    monkeypatch.undo()
    bf16 = hub.resolve(local, cache_dir=tmp_path / "cache", dtype="bf16", progress=False)
    assert bf16 != first and bf16.name.endswith("-bfloat16")
    assert {t.dtype for t in load_state_dict_mmap(bf16).values()} == {torch.bfloat16}
    os.utime(local / "config.json", ns=(1, 1))  # the source changed: convert again
    assert hub.resolve(local, cache_dir=tmp_path / "cache", progress=False) not in (first, bf16)


def fake_hub_cache(root, repo_id, src, commit="0123abcd"):
    """A directory laid out like the Hugging Face hub cache, holding ``src``'s files at ``commit``."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(src, repo / "snapshots" / commit)
    return repo


def test_hub_id_offline_from_the_hf_cache(converted, tmp_path):
    src, _ = converted
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    repo = fake_hub_cache(tmp_path / "hf", "org/tiny-video", src)
    path = hub.resolve("org/tiny-video", cache_dir=tmp_path / "cache", hf_cache_dir=tmp_path / "hf", progress=False)
    assert path == tmp_path / "cache" / "org--tiny-video" / "0123abcd"
    assert read_config(path).video_token_id == 128
    # the download is deleted after converting: the earlier conversion is still used offline
    shutil.rmtree(repo)
    assert hub.resolve("org/tiny-video", cache_dir=tmp_path / "cache", hf_cache_dir=tmp_path / "hf") == path
    with pytest.raises(hub.HubError, match="not in the Hugging Face cache.*HF_HUB_OFFLINE=1"):
        hub.resolve("org/tiny-video", cache_dir=tmp_path / "cache", hf_cache_dir=tmp_path / "hf", dtype="bf16")
    with pytest.raises(hub.HubError, match="hf download org/other"):
        hub.resolve("org/other", cache_dir=tmp_path / "cache", hf_cache_dir=tmp_path / "hf")
    with pytest.raises(hub.HubError, match="neither an existing directory nor a hub id"):
        hub.resolve("no such thing", cache_dir=tmp_path / "cache")


def test_hub_download_asks_only_for_what_conversion_needs(converted, tmp_path, monkeypatch):
    import huggingface_hub

    src, _ = converted
    calls = []

    def fake_snapshot_download(repo_id, *, allow_patterns, **kwargs):
        calls.append(allow_patterns)
        snapshot = tmp_path / "snap" / "feedbeef"
        if not snapshot.exists():
            shutil.copytree(src, snapshot)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    path = hub.resolve("org/tiny", cache_dir=tmp_path / "cache", progress=False)
    assert path == tmp_path / "cache" / "org--tiny" / "feedbeef"
    assert hub.resolve("org/tiny", cache_dir=tmp_path / "cache") == path and len(calls) == 2

    def wanted(name):
        return any(fnmatch.fnmatch(name, p) for p in calls[0])

    assert all(wanted(n) for n in ("config.json", "model-00001-of-00004.safetensors", "model.safetensors",
                                   "model.safetensors.index.json", "tokenizer.json", "tokenizer.model",
                                   "tokenizer_config.json", "special_tokens_map.json", "chat_template.json"))
    assert not any(wanted(n) for n in ("pytorch_model.bin", "pytorch_model-00001-of-00002.bin", "model.pt",
                                       "consolidated.pth", "pytorch_model.bin.index.json"))
