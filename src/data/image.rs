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

/// An in-memory image's pixel count from its header, without decoding;
/// `None` when the format or header is not recognised.
pub fn header_pixels(bytes: &[u8]) -> Option<u64> {
    let (w, h) = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .ok()?
        .into_dimensions()
        .ok()?;
    Some(u64::from(w) * u64::from(h))
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

/// A loader worker's reusable buffers for the augmented path: the file's
/// bytes, the decoded image and the augmentation's work buffers. Reused
/// from image to image, they stop allocating once grown to the largest
/// image seen (the decoder's own working memory aside).
#[derive(Debug, Default)]
pub struct Scratch {
    /// The file's bytes.
    pub file: Vec<u8>,
    /// The decoded image, `dims` RGB bytes.
    pub rgb: Vec<u8>,
    pub dims: (usize, usize),
    /// The augmentation's buffers and result.
    pub aug: super::augment::Buffers,
}

/// Scratch buffers left by finished work, taken by the next
/// ([`with_scratch`]): as many as threads ever worked at once.
static SCRATCH: std::sync::Mutex<Vec<Scratch>> = std::sync::Mutex::new(Vec::new());

/// `f` with a [`Scratch`] from the pool (a new one when all are in use),
/// returned to the pool afterwards: the loader's scoped worker threads
/// are new for each batch, the buffers outlive them.
pub fn with_scratch<T>(f: impl FnOnce(&mut Scratch) -> T) -> T {
    let taken = SCRATCH.lock().ok().and_then(|mut pool| pool.pop());
    let mut s = taken.unwrap_or_default();
    let out = f(&mut s);
    if let Ok(mut pool) = SCRATCH.lock() {
        pool.push(s);
    }
    out
}

impl Scratch {
    /// The image file `path` read and decoded into [`Scratch::rgb`]: its
    /// dimensions.
    pub fn decode_file(&mut self, path: &Path, origin: &str) -> Result<(usize, usize)> {
        read_into(path, origin, &mut self.file)?;
        self.dims = decode_rgb_into(&self.file, Encoded::File, path, origin, &mut self.rgb)?;
        Ok(self.dims)
    }

    /// An in-memory image (a shard member, named `path` for messages, its
    /// format guessed from the bytes) decoded into [`Scratch::rgb`].
    pub fn decode_member(
        &mut self,
        bytes: &[u8],
        path: &Path,
        origin: &str,
    ) -> Result<(usize, usize)> {
        self.dims = decode_rgb_into(bytes, Encoded::Member, path, origin, &mut self.rgb)?;
        Ok(self.dims)
    }

    /// `rgb`, `size` x `size` (a rendered scene), as the decoded image.
    pub fn set_rgb(&mut self, rgb: &[u8], size: usize) -> (usize, usize) {
        self.rgb.clear();
        self.rgb.extend_from_slice(rgb);
        self.dims = (size, size);
        self.dims
    }

    /// The decoded image augmented for `key` at `size` x `size` and
    /// normalised into `out` (`3 * size * size` values).
    pub fn augment_into(
        &mut self,
        aug: &super::augment::Augment,
        key: super::augment::AugKey,
        size: usize,
        (mean, std): ([f32; 3], [f32; 3]),
        out: &mut [f32],
    ) {
        aug.apply_into(&self.rgb, self.dims, key, size, &mut self.aug);
        normalize_into(self.aug.image(), mean, std, out);
    }
}

/// The bytes of `path` into `buf` (replacing what it held).
pub fn read_into(path: &Path, origin: &str, buf: &mut Vec<u8>) -> Result<()> {
    use std::io::Read;
    buf.clear();
    std::fs::File::open(path)
        .and_then(|mut f| f.read_to_end(buf))
        .map(drop)
        .map_err(|e| Error::Data {
            path: path.to_path_buf(),
            line: None,
            message: format!("cannot decode image (named at {origin}): {}", one_line(&e)),
        })
}

/// Where encoded bytes came from, which picks their format as the
/// allocating decoders do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoded {
    /// An image file: its format from its name's extension.
    File,
    /// A shard member: its format guessed from its bytes.
    Member,
}

/// An encoded image (`bytes`, named `path` and found at `origin` for
/// messages) decoded into `out` as RGB bytes, refused above
/// `data.max_image_pixels` from its header: its `(width, height)`. The
/// same pixels as [`decode_file`] or [`decode_bytes`] followed by
/// `to_rgb8`, decoded straight into `out` for 8-bit RGB and grey images.
pub fn decode_rgb_into(
    bytes: &[u8],
    from: Encoded,
    path: &Path,
    origin: &str,
    out: &mut Vec<u8>,
) -> Result<(usize, usize)> {
    use image::ImageDecoder;
    let bad = |e: &dyn std::fmt::Display| Error::Data {
        path: path.to_path_buf(),
        line: None,
        message: match from {
            Encoded::File => format!("cannot decode image (named at {origin}): {}", one_line(e)),
            Encoded::Member => format!("cannot decode image (in {origin}): {}", one_line(e)),
        },
    };
    let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes));
    match from {
        // As `ImageReader::open`: an unknown extension fails to decode.
        Encoded::File => match image::ImageFormat::from_path(path) {
            Ok(format) => reader.set_format(format),
            Err(e) => return Err(bad(&e)),
        },
        Encoded::Member => reader = reader.with_guessed_format().map_err(|e| bad(&e))?,
    }
    let decoder = reader.into_decoder().map_err(|e| bad(&e))?;
    let (w, h) = decoder.dimensions();
    check_pixels((w, h), max_image_pixels(), path, origin)?;
    let (w, h) = (w as usize, h as usize);
    out.clear();
    match decoder.color_type() {
        image::ColorType::Rgb8 => {
            out.resize(w * h * 3, 0);
            decoder.read_image(out).map_err(|e| bad(&e))?;
        }
        image::ColorType::L8 => {
            out.resize(w * h * 3, 0);
            decoder.read_image(&mut out[..w * h]).map_err(|e| bad(&e))?;
            // Grey to RGB in place, from the end so nothing is overwritten
            // before it is read.
            for i in (0..w * h).rev() {
                let v = out[i];
                out[i * 3..i * 3 + 3].fill(v);
            }
        }
        _ => {
            let img = image::DynamicImage::from_decoder(decoder).map_err(|e| bad(&e))?;
            out.extend_from_slice(img.to_rgb8().as_raw());
        }
    }
    Ok((w, h))
}

/// Row-major RGB bytes to channel-major `[3, H, W]` f32 in `out`, scaled
/// to [0, 1] and normalised with `mean` and `std` per channel: the same
/// values as `data::normalize`, without allocating.
pub fn normalize_into(rgb: &[u8], mean: [f32; 3], std: [f32; 3], out: &mut [f32]) {
    let plane = rgb.len() / 3;
    assert_eq!(out.len(), rgb.len(), "one f32 per byte");
    let (r, rest) = out.split_at_mut(plane);
    let (g, b) = rest.split_at_mut(plane);
    for (p, px) in rgb.chunks_exact(3).enumerate() {
        r[p] = (px[0] as f32 / 255.0 - mean[0]) / std[0];
        g[p] = (px[1] as f32 / 255.0 - mean[1]) / std[1];
        b[p] = (px[2] as f32 / 255.0 - mean[2]) / std[2];
    }
}

/// A new zeroed f32 CPU tensor of `len` values that the loader's workers
/// write the batch's images into as a slice, handed on as the batch's
/// tensor without a copy ([`TensorBuf::into_tensor`]).
pub struct TensorBuf {
    tensor: tch::Tensor,
    len: usize,
}

impl TensorBuf {
    pub fn zeros(len: usize) -> TensorBuf {
        let tensor = tch::Tensor::zeros([len as i64], (tch::Kind::Float, tch::Device::Cpu));
        TensorBuf { tensor, len }
    }

    /// The tensor (1-D, `len` values) with what was written.
    pub fn into_tensor(self) -> tch::Tensor {
        self.tensor
    }
}

impl std::ops::Deref for TensorBuf {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        // SAFETY: a contiguous f32 CPU tensor of `len` initialised (zeroed)
        // values that only this value holds, alive as long as the borrow.
        unsafe { std::slice::from_raw_parts(self.tensor.data_ptr() as *const f32, self.len) }
    }
}

impl std::ops::DerefMut for TensorBuf {
    fn deref_mut(&mut self) -> &mut [f32] {
        // SAFETY: as for `deref`; the borrow of `self` is exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.tensor.data_ptr() as *mut f32, self.len) }
    }
}
