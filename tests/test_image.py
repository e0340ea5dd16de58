"""Image loading and the AnyRes pixel pipeline vs transformers' PIL processor (LlavaNextImageProcessorPil) on
real photographs (scikit-image, matplotlib sample data) and crops/resizes/mode conversions made from them."""

import io
import math
import os

import matplotlib
import numpy as np
import pytest
import skimage
import torch
from PIL import Image

from llava_next.inputs.tokens import image_tokens
from llava_next.config import LlavaNextConfig, VisionConfig
from llava_next.inputs.image import CLIP_MEAN, CLIP_STD, ImageInput, load_image, normalize, preprocess_image

SKIMAGE = os.path.join(os.path.dirname(skimage.__file__), "data")
MPL = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "sample_data")
CONFIG = LlavaNextConfig()
TINY = LlavaNextConfig(vision=VisionConfig(hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2,
                                           image_size=56, patch_size=14),
                       image_grid_pinpoints=[[56, 112], [112, 56], [112, 112], [168, 56], [56, 168]])


def photo(name: str) -> Image.Image:
    path = os.path.join(MPL if name in ("grace_hopper.jpg", "logo2.png") else SKIMAGE, name)
    with Image.open(path) as im:
        im.load()
        return im


def with_transparency(im: Image.Image) -> Image.Image:
    p = im.convert("P", palette=Image.ADAPTIVE, colors=32)
    p.info["transparency"] = 3  # palette index 3 is see-through
    return p


def la(im: Image.Image) -> Image.Image:
    gray = im.convert("L")
    gray.putalpha(Image.linear_gradient("L").resize(gray.size))
    return gray


# name -> PIL image (W x H in the comment); every mode LLaVA users feed
CASES = {
    "astronaut 512x512": lambda: photo("astronaut.png"),
    "chelsea 451x300": lambda: photo("chelsea.png"),
    "coffee 600x400": lambda: photo("coffee.png"),
    "rocket 640x427 (odd pad)": lambda: photo("rocket.jpg"),
    "motorcycle 741x500": lambda: photo("motorcycle_left.png"),
    "grace_hopper 512x600": lambda: photo("grace_hopper.jpg"),
    "hubble 1000x872": lambda: photo("hubble_deep_field.jpg"),
    "wide crop 600x120": lambda: photo("coffee.png").crop((0, 140, 600, 260)),
    "tall crop 150x427": lambda: photo("rocket.jpg").crop((250, 0, 400, 427)),
    "huge 2000x1500": lambda: photo("coffee.png").resize((2000, 1500), Image.BICUBIC),
    "just over a tile 337x500": lambda: photo("astronaut.png").resize((337, 500), Image.BICUBIC),
    "one tile 336x336": lambda: photo("astronaut.png").resize((336, 336), Image.BICUBIC),
    "small 90x60": lambda: photo("chelsea.png").resize((90, 60), Image.BICUBIC),
    "1008x336 exact pinpoint": lambda: photo("motorcycle_left.png").resize((1008, 336), Image.BICUBIC),
    "grayscale camera 512x512": lambda: photo("camera.png"),
    "grayscale cell 550x660": lambda: photo("cell.png"),
    "RGBA logo 500x500": lambda: photo("logo.png"),
    "RGBA logo2 542x130": lambda: photo("logo2.png"),
    "RGBA horse 400x328": lambda: photo("horse.png"),
    "palette 512x512": lambda: photo("astronaut.png").convert("P", palette=Image.ADAPTIVE, colors=64),
    "palette + transparency 451x300": lambda: with_transparency(photo("chelsea.png")),
    "LA 512x512": lambda: la(photo("camera.png")),
    "1-bit 384x191": lambda: photo("page.png").convert("1"),
    "CMYK 600x400": lambda: photo("coffee.png").convert("CMYK"),
}


@pytest.fixture(scope="module")
def hf_processor():
    from transformers import LlavaNextImageProcessorPil
    return LlavaNextImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})


@pytest.mark.parametrize("case", list(CASES))
def test_pixels_match_transformers_pil_processor(hf_processor, case):
    image = CASES[case]()
    ref = hf_processor(image, return_tensors="np")
    ours = preprocess_image(image, CONFIG)
    assert isinstance(ours, ImageInput)
    assert ours.pixel_values.dtype == torch.float32
    assert ours.pixel_values.shape == ref["pixel_values"][0].shape == (1 + ours.num_tiles, 3, 336, 336)
    np.testing.assert_array_equal(ours.pixel_values.numpy(), ref["pixel_values"][0])
    assert ours.image_size == tuple(ref["image_sizes"][0]) == (image.height, image.width)
    assert ours.best_resolution == (ours.grid[0] * 336, ours.grid[1] * 336)


def test_tiny_tiles_match_transformers():
    # the tile size comes from the config (56 px here), not a hard-coded 336
    from transformers import LlavaNextImageProcessorPil
    proc = LlavaNextImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56},
                                      image_grid_pinpoints=[list(p) for p in TINY.image_grid_pinpoints])
    for image in (photo("rocket.jpg"), photo("cell.png"), photo("logo2.png")):
        ours = preprocess_image(image, TINY)
        np.testing.assert_array_equal(ours.pixel_values.numpy(), proc(image, return_tensors="np")["pixel_values"][0])
        assert ours.pixel_values.shape[-2:] == (56, 56)


def test_layout_of_the_worked_example():
    # 640x480 (W x H): canvas 672x672, image resized to 672x504 (W x H), 84 black rows above and below
    image = photo("rocket.jpg").resize((640, 480), Image.BICUBIC)
    out = preprocess_image(image, CONFIG)
    assert (out.image_size, out.best_resolution, out.grid) == ((480, 640), (672, 672), (2, 2))
    black = normalize(np.zeros((1, 1, 3), np.uint8))[:, 0, 0]  # (3,) = -mean / std
    tl, tr, bl, br = out.pixel_values[1:]
    assert (tl[:, :84] == black[:, None, None]).all() and (tr[:, :84] == black[:, None, None]).all()
    assert (bl[:, -84:] == black[:, None, None]).all() and (br[:, -84:] == black[:, None, None]).all()
    assert not (tl[:, 84] == black[:, None]).all()  # the photo starts on row 84
    resized = np.asarray(image.resize((672, 504), Image.BICUBIC))
    assert torch.equal(tr[:, 84:], normalize(resized[:252, 336:]))  # top-right tile = right half, top rows
    assert torch.equal(out.pixel_values[0], normalize(np.asarray(image.resize((336, 336), Image.BICUBIC))))
    assert image_tokens(out.image_size, CONFIG) == 2340


def test_original_compat_tie_gives_the_tall_canvas():
    # 300x200 (W x H): the original code reads the first pinpoint as 336 wide x 672 tall
    image = photo("chelsea.png").resize((300, 200), Image.BICUBIC)
    hf = preprocess_image(image, CONFIG)
    orig = preprocess_image(image, CONFIG.replace(anyres_compat="original"))
    assert (hf.best_resolution, hf.grid) == ((336, 672), (1, 2))
    assert (orig.best_resolution, orig.grid) == ((672, 336), (2, 1))
    # the original process_anyres_image (resize_and_pad_image, divide_to_patches), transcribed
    target_width, target_height = 336, 672
    new_width, new_height = target_width, min(math.ceil(200 * (target_width / 300)), target_height)
    assert new_height == 225  # 200 * 1.12 = 224.00000000000003
    canvas = Image.new("RGB", (target_width, target_height), (0, 0, 0))
    canvas.paste(image.resize((new_width, new_height)), ((target_width - new_width) // 2, (target_height - new_height) // 2))
    tiles = [canvas.crop((0, 0, 336, 336)), canvas.crop((0, 336, 336, 672))]
    expected = normalize(np.stack([np.asarray(t) for t in [image.resize((336, 336), Image.BICUBIC)] + tiles]))
    assert torch.equal(orig.pixel_values, expected)


# ---- normalization ----------------------------------------------------------------------------------
def test_normalize_matches_transformers_rescale_and_normalize():
    from transformers.image_transforms import normalize as hf_normalize
    from transformers.image_transforms import rescale as hf_rescale
    pixels = np.random.default_rng(0).integers(0, 256, (2, 7, 5, 3), dtype=np.uint8)
    ref = np.stack([hf_normalize(hf_rescale(p, 1 / 255), CLIP_MEAN, CLIP_STD) for p in pixels])  # (2, 7, 5, 3)
    out = normalize(pixels)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 7, 5)
    np.testing.assert_array_equal(out.numpy(), np.moveaxis(ref, -1, -3))
    np.testing.assert_array_equal(normalize(pixels.astype(np.int64)).numpy(), out.numpy())  # non-uint8 path
    with pytest.raises(ValueError, match="RGB"):
        normalize(pixels[..., :2])


# ---- loading ----------------------------------------------------------------------------------------
def test_load_image_modes_match_transformers_convert_to_rgb():
    from transformers.image_transforms import convert_to_rgb
    for name in ["camera.png", "logo.png", "horse.png", "astronaut.png"]:
        image = photo(name)
        np.testing.assert_array_equal(np.asarray(load_image(image)), convert_to_rgb(image, return_numpy=True))
    for image in [with_transparency(photo("chelsea.png")), la(photo("camera.png")), photo("coffee.png").convert("CMYK")]:
        np.testing.assert_array_equal(np.asarray(load_image(image)), convert_to_rgb(image, return_numpy=True))
    # alpha goes over white: fully transparent pixels become white
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert np.asarray(load_image(rgba)).min() == 255


def test_load_image_from_path_and_array():
    assert load_image(os.path.join(SKIMAGE, "coffee.png")).mode == "RGB"
    arr = np.asarray(photo("coffee.png"))
    assert np.array_equal(np.asarray(load_image(arr)), arr)
    assert np.array_equal(np.asarray(load_image(arr[..., 0])), np.repeat(arr[..., :1], 3, axis=2))


def test_exif_orientation_is_applied_like_transformers_load_image(tmp_path):
    from transformers.image_utils import load_image as hf_load_image
    image = photo("rocket.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif.tobytes())
    ours = load_image(path)
    assert ours.size == (427, 640)  # (W, H) after rotation
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(hf_load_image(str(path))))


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    from transformers.image_transforms import convert_to_rgb
    gray8 = np.asarray(photo("camera.png"))
    path = tmp_path / "camera16.png"
    Image.fromarray(gray8.astype(np.uint16) * 257).save(path)  # 16-bit PNG, same picture
    with Image.open(path) as im:
        assert im.mode.startswith("I;16")
        assert (convert_to_rgb(im, return_numpy=True) == 255).mean() > 0.9  # transformers/PIL clip: white
    np.testing.assert_array_equal(np.asarray(load_image(path)), np.repeat(gray8[..., None], 3, axis=2))


def test_load_errors_are_specific(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="not an image file"):
        load_image(tmp_path / "notes.txt")
    with pytest.raises(TypeError, match="file path, a PIL.Image"):
        load_image(42)
    with pytest.raises(ValueError, match="uint8"):
        load_image(np.zeros((4, 4, 3), np.float32))
    for mode in ("I", "F"):
        with pytest.raises(ValueError, match="scale them to 8 bits"):
            load_image(Image.new(mode, (4, 4)))
    buf = io.BytesIO()
    photo("coffee.png").save(buf, format="PNG")
    assert load_image(Image.open(io.BytesIO(buf.getvalue()))).size == (600, 400)
