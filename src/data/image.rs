//! Image decoding and resizing: files and in-memory images (shard
//! members) decoded by the `image` crate, refused above
//! `data.max_image_pixels` before any pixel is decoded, and resized to the
//! model's square input.

use std::path::Path;
use vlmatch_core::{Error, Result};

/// Decode an image file and resize it to `size` x `size` RGB.
pub fn decode_resized(path: &Path, origin: &str, size: usize) -> Result<Vec<u8>> {
    decode_resized_within(path, origin, size, max_image_pixels())
}

/// [`decode_resized`] with an image refused above `max_pixels` (from its
/// header, before decoding).
pub fn decode_resized_within(
    path: &Path,
    origin: &str,
    size: usize,
    max_pixels: u64,
) -> Result<Vec<u8>> {
    Ok(resized(decode_file(path, origin, max_pixels)?, size))
}

/// An image file decoded at full size, refused above `max_pixels`.
pub(crate) fn decode_file(
    path: &Path,
    origin: &str,
    max_pixels: u64,
) -> Result<image::DynamicImage> {
    let bad = |e: &dyn std::fmt::Display| Error::Data {
        path: path.to_path_buf(),
        line: None,
        message: format!("cannot decode image (named at {origin}): {}", one_line(e)),
    };
    // The format from the file name, as `image::open` picks it.
    let open = || image::ImageReader::open(path);
    let dims = open()
        .map_err(|e| bad(&e))?
        .into_dimensions()
        .map_err(|e| bad(&e))?;
    check_pixels(dims, max_pixels, path, origin)?;
    open().map_err(|e| bad(&e))?.decode().map_err(|e| bad(&e))
}

/// `data.max_image_pixels`, set from the run's config ([`set_max_image_pixels`]).
static MAX_IMAGE_PIXELS: std::sync::atomic::AtomicU64 =
    std::sync::atomic::AtomicU64::new(2 * 89_478_485);

/// The most pixels an image may have before it is decoded (the config's
/// `data.max_image_pixels`; every command that builds a model sets it).
pub fn set_max_image_pixels(n: u64) {
    MAX_IMAGE_PIXELS.store(n, std::sync::atomic::Ordering::Relaxed);
}

pub(crate) fn max_image_pixels() -> u64 {
    MAX_IMAGE_PIXELS.load(std::sync::atomic::Ordering::Relaxed)
}

/// An image's header dimensions against `data.max_image_pixels`, before
/// any pixel is decoded: a small file can claim a huge image.
fn check_pixels((w, h): (u32, u32), max: u64, path: &Path, origin: &str) -> Result<()> {
    let pixels = u64::from(w) * u64::from(h);
    if pixels <= max {
        return Ok(());
    }
    Err(Error::Data {
        path: path.to_path_buf(),
        line: None,
        message: format!(
            "image (at {origin}) is {w} x {h} = {pixels} pixels, over data.max_image_pixels \
             ({max}): a decompression bomb, or raise the key for a real image this large"
        ),
    })
}

/// Decode an in-memory image (named `path` for messages) and resize it.
pub fn decode_bytes_resized(
    bytes: &[u8],
    path: &Path,
    origin: &str,
    size: usize,
) -> Result<Vec<u8>> {
    Ok(resized(decode_bytes(bytes, path, origin)?, size))
}

/// An in-memory image decoded at full size.
pub(crate) fn decode_bytes(bytes: &[u8], path: &Path, origin: &str) -> Result<image::DynamicImage> {
    let bad = |e: &dyn std::fmt::Display| Error::Data {
        path: path.to_path_buf(),
        line: None,
        message: format!("cannot decode image (in {origin}): {}", one_line(e)),
    };
    let reader = || image::ImageReader::new(std::io::Cursor::new(bytes)).with_guessed_format();
    let dims = reader()
        .map_err(|e| bad(&e))?
        .into_dimensions()
        .map_err(|e| bad(&e))?;
    check_pixels(dims, max_image_pixels(), path, origin)?;
    reader().map_err(|e| bad(&e))?.decode().map_err(|e| bad(&e))
}

/// A decoder's message on one line (some span several, e.g. JPEG's I/O
/// errors), for the CLI's one-line errors.
fn one_line(e: &dyn std::fmt::Display) -> String {
    e.to_string()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

fn resized(img: image::DynamicImage, size: usize) -> Vec<u8> {
    let rgb = img.to_rgb8();
    let resized = image::imageops::resize(
        &rgb,
        size as u32,
        size as u32,
        image::imageops::FilterType::CatmullRom,
    );
    resized.into_raw()
}
