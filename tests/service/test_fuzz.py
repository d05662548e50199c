"""Fuzzing, bounded so it runs in CI: schemathesis against the live server's own OpenAPI spec, and hypothesis on the
decode and preprocess functions every request goes through."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import schemathesis
from _support import LiveServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from service.api import create_app
from service.config import Settings
from service.decode import FORMATS, decode_base64, decode_image
from service.errors import CorruptImage, InvalidBase64, SymguardError, TooManyPixels, UnsupportedMediaType
from service.inputs import to_batch
from service.manifest import InputSpec

# Pillow warns about the damaged files these tests feed it on purpose; the assertions are what matter.
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::RuntimeWarning")]

# ---------------------------------------------------------------- schemathesis: the API as its spec describes it

# The spec is the app's own, built at collection time (it does not depend on the models served); the test below
# checks it is byte for byte what the live server publishes at /openapi.json. (schemathesis' lazy
# `from_fixture` loader cannot run on pytest 9.2: it writes the removed Function._nodeid.)
SPEC = create_app(Settings()).openapi()
# Every check schemathesis has, less one: positive_data_acceptance expects any schema-valid body to be accepted, but
# a schema cannot say "a decodable image" (random base64 is schema-valid), so those are rightly 415/422.
CONFIG = schemathesis.Config.from_dict({"checks": {"positive_data_acceptance": {"enabled": False}}})
schema = schemathesis.openapi.from_dict(SPEC, config=CONFIG)


@pytest.fixture(scope="module")
def fuzzed(bundle_repo) -> Iterator[LiveServer]:
    """Its own server: fuzzing must not disturb the module servers other tests count metrics on."""
    with LiveServer(repository=bundle_repo, max_delay_ms=1, body_timeout_s=5) as s:
        yield s


def test_the_fuzzed_spec_is_the_one_the_server_publishes(fuzzed):
    assert httpx.get(fuzzed.url + "/openapi.json").json() == SPEC


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_own_openapi(case, fuzzed):
    case.call_and_validate(base_url=fuzzed.url)


# ---------------------------------------------------------------- hypothesis: decode and preprocess

# The two kinds of model input a manifest can ask for: the shipped grayscale one, and an RGB one with a
# non-trivial normalisation and background, so both conversion paths are exercised.
SPECS = (InputSpec(size=29, channels=1), InputSpec(size=31, channels=3, mean=0.5, std=0.25, background=0.5))
# Saveable (format, mode) pairs: every mode Pillow writes in each accepted format.
COMBOS = [("PNG", m) for m in ("1", "L", "LA", "P", "RGB", "RGBA", "I;16")] + \
         [("TIFF", m) for m in ("1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F")] + \
         [("JPEG", m) for m in ("L", "RGB", "CMYK")] + [("WEBP", m) for m in ("RGB", "RGBA")] + \
         [("GIF", m) for m in ("L", "P")] + [("BMP", m) for m in ("1", "L", "P", "RGB")] + \
         [("PPM", m) for m in ("1", "L", "RGB", "I;16")]  # fmt: skip
TYPED = (CorruptImage, UnsupportedMediaType, TooManyPixels)  # all decode_image may raise
FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def random_image(mode: str, w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode in ("RGB", "RGBA"):
        return Image.fromarray(rng.integers(0, 256, (h, w, len(mode)), dtype=np.uint8), mode)
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    if mode == "I":
        return Image.fromarray(rng.integers(-(2**31), 2**31 - 1, (h, w), dtype=np.int32))
    if mode == "F":  # wild floats, NaN and infinities included: the model input must still come out finite
        a = rng.normal(0, 1e6, (h, w)).astype(np.float32)
        a.flat[rng.integers(0, a.size, 3)] = [np.nan, np.inf, -np.inf]
        return Image.fromarray(a)
    gray = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8))
    if mode == "LA":
        return Image.merge("LA", [gray, gray])
    if mode == "CMYK":
        return Image.merge("RGB", [gray, gray, gray]).convert("CMYK")
    return gray if mode == "L" else gray.convert(mode)


def encode(img: Image.Image, fmt: str, **options: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **options)
    return buf.getvalue()


def assert_model_input(img: Image.Image) -> None:
    """What the server does after decoding (inputs.to_batch): the manifest's shape, finite, in the normalised range
    -- or, for a pixel mode Pillow cannot convert, the typed 415 and nothing else."""
    for spec in SPECS:
        try:
            x = to_batch([img], spec)
        except UnsupportedMediaType:
            return
        assert x.shape == (1, spec.channels, spec.size, spec.size) and x.dtype == np.float32
        assert np.isfinite(x).all()
        lo, hi = (0 - spec.mean) / spec.std, (1 - spec.mean) / spec.std
        assert x.min() >= lo - 1e-5 and x.max() <= hi + 1e-5


def decode_or_typed(data: bytes, max_pixels: int = 1_000_000) -> Image.Image | None:
    try:
        return decode_image(data, max_pixels, "fuzz")
    except TYPED as e:
        assert 400 <= e.status < 500 and "fuzz" in e.message  # a 4xx that names the input
        return None


@settings(FUZZ, max_examples=300)
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_decode_or_raise_a_typed_4xx(data):
    img = decode_or_typed(data)
    if img is not None:
        assert_model_input(img)


SEEDS = [encode(random_image(m, 9, 7, 0), f) for f, m in COMBOS]


@settings(FUZZ, max_examples=300)
@given(st.sampled_from(SEEDS), st.data())
def test_damaged_real_files_decode_or_raise_a_typed_4xx(seed, data):
    """Real files of every format and mode, truncated and with bytes overwritten: the shapes of damage that reach
    deeper into the decoders than random bytes do."""
    buf = bytearray(seed[: data.draw(st.integers(0, len(seed)), label="keep")])
    for at, value in data.draw(st.lists(st.tuples(st.integers(0, max(len(buf) - 1, 0)), st.integers(0, 255)),
                                        max_size=8), label="overwrite"):  # fmt: skip
        if buf:
            buf[at] = value
    img = decode_or_typed(bytes(buf))
    if img is not None:
        assert_model_input(img)


sides = st.one_of(st.integers(1, 256), st.sampled_from([1, 2, 3, 4000]))


@settings(FUZZ, max_examples=150)
@given(st.sampled_from(COMBOS), sides, sides, st.integers(0, 2**32 - 1), st.integers(1, 8))
def test_valid_images_of_any_size_and_mode_become_the_manifest_input(combo, w, h, seed, orientation):
    fmt, mode = combo
    if w * h > 256 * 4000:
        w = h = 1  # 4000 x 4000 would only slow the run down; one long side is what matters
    options: dict[str, object] = {}
    if fmt in ("PNG", "JPEG", "WEBP", "TIFF"):
        exif = Image.Exif()
        exif[0x0112] = orientation
        options["exif"] = exif.tobytes()
    img = decode_image(encode(random_image(mode, w, h, seed), fmt, **options), 16_000_000)
    assert sorted(img.size) == sorted((w, h))  # EXIF may swap the sides, never change them
    assert_model_input(img)


@settings(FUZZ, max_examples=60)
@given(st.integers(1, 600), st.integers(1, 600), st.integers(1, 360_000))
def test_the_pixel_limit_is_exact(w, h, max_pixels):
    data = encode(Image.new("L", (w, h)), "PNG")
    if w * h > max_pixels:
        with pytest.raises(TooManyPixels):
            decode_image(data, max_pixels)
    else:
        assert decode_image(data, max_pixels).size == (w, h)


@settings(FUZZ, max_examples=200)
@given(st.text(max_size=200))
def test_any_text_is_base64_or_invalid_base64(text):
    try:
        assert isinstance(decode_base64(text, "images[0]"), bytes)
    except InvalidBase64 as e:
        assert e.status == 422 and "images[0]" in e.message


@settings(FUZZ, max_examples=100)
@given(st.binary(max_size=512), st.integers(1, 76), st.booleans())
def test_base64_round_trips_line_wrapped_and_as_data_urls(data, width, data_url):
    text = base64.b64encode(data).decode()
    wrapped = "\n".join(text[i : i + width] for i in range(0, len(text), width))
    assert decode_base64(("data:image/png;base64," if data_url else "") + wrapped, "x") == data


def test_every_accepted_format_is_fuzzed():
    assert {f for f, _ in COMBOS} == set(FORMATS)
    assert all(isinstance(e(""), SymguardError) for e in TYPED)
