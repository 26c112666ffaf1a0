//! Bicubic resampling as Pillow's `Image.resize(..., BICUBIC)` computes it
//! (what torchvision's `RandomResizedCrop` runs on a PIL image): a separable
//! convolution with the Keys cubic (a = -0.5) whose support widens by the
//! downscaling factor (antialiasing), weights normalised per output pixel
//! and rounded to 22-bit fixed point, the horizontal pass first into an
//! 8-bit intermediate image, then the vertical pass.

use image::RgbImage;

/// Fixed-point fraction bits of the weights (Pillow's `PRECISION_BITS`).
const BITS: u32 = 32 - 8 - 2;

/// The Keys cubic convolution kernel with a = -0.5, support 2.
fn cubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// One output pixel's taps: the first input index and fixed-point weights.
struct Taps {
    first: usize,
    weights: Vec<i32>,
}

/// The taps of each of `out` output pixels over an input axis `size` long.
fn taps(size: usize, out: usize) -> Vec<Taps> {
    let scale = size as f64 / out as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    (0..out)
        .map(|o| {
            let centre = (o as f64 + 0.5) * scale;
            // Truncation toward zero after adding a half, as Pillow rounds.
            let lo = ((centre - support + 0.5) as i64).max(0) as usize;
            let hi = ((centre + support + 0.5) as i64).min(size as i64) as usize;
            let raw: Vec<f64> = (lo..hi)
                .map(|x| cubic((x as f64 - centre + 0.5) / filterscale))
                .collect();
            let sum: f64 = raw.iter().sum();
            let weights = raw
                .iter()
                .map(|&w| {
                    let w = if sum != 0.0 { w / sum } else { w };
                    let f = w * f64::from(1u32 << BITS);
                    (if w < 0.0 { f - 0.5 } else { f + 0.5 }) as i32
                })
                .collect();
            Taps { first: lo, weights }
        })
        .collect()
}

/// A fixed-point sum back to a byte, clamped.
fn clip8(acc: i64) -> u8 {
    (acc >> BITS).clamp(0, 255) as u8
}

/// One pass along rows (`horizontal`) or columns of a `w` x `h` RGB
/// buffer, to `out` pixels along that axis.
fn pass(src: &[u8], (w, h): (usize, usize), out: usize, horizontal: bool) -> Vec<u8> {
    let (len, across) = if horizontal { (w, h) } else { (h, w) };
    let (ow, oh) = if horizontal { (out, h) } else { (w, out) };
    let half = 1i64 << (BITS - 1);
    let mut dst = vec![0u8; ow * oh * 3];
    for (o, t) in taps(len, out).iter().enumerate() {
        for a in 0..across {
            for c in 0..3 {
                let mut acc = half;
                for (k, &wt) in t.weights.iter().enumerate() {
                    let (x, y) = if horizontal {
                        (t.first + k, a)
                    } else {
                        (a, t.first + k)
                    };
                    acc += i64::from(src[(y * w + x) * 3 + c]) * i64::from(wt);
                }
                let (x, y) = if horizontal { (o, a) } else { (a, o) };
                dst[(y * ow + x) * 3 + c] = clip8(acc);
            }
        }
    }
    dst
}

/// `img`'s box `(left, top, width, height)` resized to `out_w` x `out_h`,
/// as Pillow's `img.crop(box).resize((out_w, out_h), BICUBIC)`: the crop
/// is cut first, so the filter clamps at the box's edges. Each pass rounds
/// to bytes; the vertical pass comes first when it shrinks and the
/// horizontal one grows (Pillow runs the reducing pass first then), else
/// the horizontal one; an axis whose size is kept is not filtered.
pub fn resized_crop(
    img: &RgbImage,
    (left, top, w, h): (usize, usize, usize, usize),
    out_w: usize,
    out_h: usize,
) -> RgbImage {
    let (iw, ih) = (img.width() as usize, img.height() as usize);
    assert!(
        left + w <= iw && top + h <= ih && w > 0 && h > 0 && out_w > 0 && out_h > 0,
        "crop box {w} x {h} at ({left}, {top}) inside the {iw} x {ih} image"
    );
    let src = img.as_raw();
    let mut buf: Vec<u8> = (top..top + h)
        .flat_map(|y| &src[(y * iw + left) * 3..(y * iw + left + w) * 3])
        .copied()
        .collect();
    let mut dims = (w, h);
    let vertical_first = out_w > w && out_h < h;
    for horizontal in [!vertical_first, vertical_first] {
        let (from, to) = if horizontal {
            (dims.0, out_w)
        } else {
            (dims.1, out_h)
        };
        if from != to {
            buf = pass(&buf, dims, to, horizontal);
            dims = if horizontal {
                (to, dims.1)
            } else {
                (dims.0, to)
            };
        }
    }
    RgbImage::from_raw(out_w as u32, out_h as u32, buf).expect("sized buffer")
}
