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

/// A fixed-point sum back to a byte, clamped. Sums stay within `i32`, as
/// in Pillow: weights of one tap set add up to `2^22` and their absolute
/// values to less than `1.3 * 2^22`.
fn clip8(acc: i32) -> u8 {
    (acc >> BITS).clamp(0, 255) as u8
}

/// The rounding half added to every sum.
const HALF: i32 = 1 << (BITS - 1);

/// A `w` x `h` RGB buffer resampled along its rows to `out_w` pixels.
fn horizontal(src: &[u8], (w, h): (usize, usize), out_w: usize) -> Vec<u8> {
    let taps = taps(w, out_w);
    let mut dst = vec![0u8; out_w * h * 3];
    for (row, out) in src.chunks_exact(w * 3).zip(dst.chunks_exact_mut(out_w * 3)) {
        for (t, px) in taps.iter().zip(out.chunks_exact_mut(3)) {
            let mut acc = [HALF; 3];
            let from = &row[t.first * 3..(t.first + t.weights.len()) * 3];
            for (p, &wt) in from.chunks_exact(3).zip(&t.weights) {
                for c in 0..3 {
                    acc[c] += i32::from(p[c]) * wt;
                }
            }
            for c in 0..3 {
                px[c] = clip8(acc[c]);
            }
        }
    }
    dst
}

/// A `w` x `h` RGB buffer resampled along its columns to `out_h` pixels,
/// a whole row of sums at a time.
fn vertical(src: &[u8], (w, h): (usize, usize), out_h: usize) -> Vec<u8> {
    let taps = taps(h, out_h);
    let stride = w * 3;
    let mut dst = vec![0u8; stride * out_h];
    let mut acc = vec![HALF; stride];
    for (t, out) in taps.iter().zip(dst.chunks_exact_mut(stride)) {
        acc.fill(HALF);
        for (k, &wt) in t.weights.iter().enumerate() {
            let row = &src[(t.first + k) * stride..(t.first + k + 1) * stride];
            for (a, &p) in acc.iter_mut().zip(row) {
                *a += i32::from(p) * wt;
            }
        }
        for (o, &a) in out.iter_mut().zip(&acc) {
            *o = clip8(a);
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
    for along_rows in [!vertical_first, vertical_first] {
        if along_rows && dims.0 != out_w {
            buf = horizontal(&buf, dims, out_w);
            dims.0 = out_w;
        } else if !along_rows && dims.1 != out_h {
            buf = vertical(&buf, dims, out_h);
            dims.1 = out_h;
        }
    }
    RgbImage::from_raw(out_w as u32, out_h as u32, buf).expect("sized buffer")
}
