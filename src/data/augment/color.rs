//! ALBEF's colour ops on 8-bit RGB (`dataset/randaugment.py`, written on
//! OpenCV and NumPy to give Pillow's `ImageOps`/`ImageEnhance` results):
//! per-channel lookup tables for autocontrast, equalize and brightness, and
//! a blend with a 3x3 smoothing for sharpness.

use image::RgbImage;

/// Each channel of RGB bytes through its own 256-entry table, in place.
fn map_channels(rgb: &mut [u8], tables: &[[u8; 256]; 3]) {
    for px in rgb.chunks_exact_mut(3) {
        for c in 0..3 {
            px[c] = tables[c][usize::from(px[c])];
        }
    }
}

/// `img` with each channel through its table.
fn mapped(img: &RgbImage, f: fn(&mut [u8])) -> RgbImage {
    let mut out = img.clone();
    f(&mut out);
    out
}

/// Counts of each value, per channel.
fn histograms(rgb: &[u8]) -> [[u64; 256]; 3] {
    let mut h = [[0u64; 256]; 3];
    for px in rgb.chunks_exact(3) {
        for c in 0..3 {
            h[c][usize::from(px[c])] += 1;
        }
    }
    h
}

/// Each channel stretched linearly so that its darkest value becomes 0 and
/// its brightest 255 (no cut-off); a constant channel is kept.
pub fn autocontrast(img: &RgbImage) -> RgbImage {
    mapped(img, autocontrast_in_place)
}

/// [`autocontrast`] on RGB bytes, in place.
pub fn autocontrast_in_place(rgb: &mut [u8]) {
    let hist = histograms(rgb);
    let tables = std::array::from_fn(|c| {
        let low = hist[c].iter().position(|&n| n > 0).unwrap_or(0);
        let high = hist[c].iter().rposition(|&n| n > 0).unwrap_or(0);
        std::array::from_fn(|i| {
            if high <= low {
                return i as u8;
            }
            // In f64 and truncated, as NumPy's table is.
            let scale = 255.0 / (high - low) as f64;
            (i as f64 * scale - low as f64 * scale).clamp(0.0, 255.0) as u8
        })
    });
    map_channels(rgb, &tables)
}

/// Pillow's histogram equalisation per channel: values spread by their
/// cumulative count, in steps of (count of all but the last present value)
/// / 255; a channel with too few values to fill a step is kept.
pub fn equalize(img: &RgbImage) -> RgbImage {
    mapped(img, equalize_in_place)
}

/// [`equalize`] on RGB bytes, in place.
pub fn equalize_in_place(rgb: &mut [u8]) {
    let hist = histograms(rgb);
    let tables = std::array::from_fn(|c| {
        let h = &hist[c];
        let last = h.iter().rposition(|&n| n > 0).map_or(0, |i| h[i]);
        let step = (h.iter().sum::<u64>() - last) / 255;
        let mut table = [0u8; 256];
        let mut cum = step / 2;
        for (i, t) in table.iter_mut().enumerate() {
            *t = cum.checked_div(step).map_or(i as u8, |v| v.min(255) as u8);
            cum += h[i];
        }
        table
    });
    map_channels(rgb, &tables)
}

/// Every value times `factor`, clamped to 255 and truncated (in f32, as
/// NumPy's table is).
pub fn brightness(img: &RgbImage, factor: f64) -> RgbImage {
    let mut out = img.clone();
    brightness_in_place(&mut out, factor);
    out
}

/// [`brightness`] on RGB bytes, in place.
pub fn brightness_in_place(rgb: &mut [u8], factor: f64) {
    let f = factor as f32;
    let table: [u8; 256] = std::array::from_fn(|i| (i as f32 * f).clamp(0.0, 255.0) as u8);
    map_channels(rgb, &[table; 3])
}

/// `w` x `h` RGB bytes smoothed with OpenCV's `filter2D` and the kernel
/// `[[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13`, borders mirrored without
/// repeating the edge (`BORDER_REFLECT_101`), rounded to bytes, into `out`.
/// Compiled a second time for AVX2 (SSE4.1's rounding instruction, not a
/// call to `rintf`), used where the CPU has it.
fn smoothed(src: &[u8], size: (usize, usize), out: &mut Vec<u8>) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2.
        return unsafe { smoothed_avx2(src, size, out) };
    }
    smoothed_body(src, size, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn smoothed_avx2(src: &[u8], size: (usize, usize), out: &mut Vec<u8>) {
    smoothed_body(src, size, out)
}

#[inline(always)]
fn smoothed_body(src: &[u8], (w, h): (usize, usize), out: &mut Vec<u8>) {
    let reflect = |v: usize, d: usize, n: usize| match (v + d).checked_sub(1) {
        _ if n == 1 => 0,
        None => 1,
        Some(i) if i >= n => n - 2,
        Some(i) => i,
    };
    let (side, centre) = (1.0f32 / 13.0, 5.0f32 / 13.0);
    out.clear();
    out.resize(src.len(), 0);
    for y in 0..h {
        for x in 0..w {
            let interior = x > 0 && y > 0 && x + 1 < w && y + 1 < h;
            // The 3 x 3 neighbourhood's pixel offsets, row by row.
            let mut at = [0usize; 9];
            for (k, a) in at.iter_mut().enumerate() {
                let (dx, dy) = (k % 3, k / 3);
                let (sx, sy) = if interior {
                    (x + dx - 1, y + dy - 1)
                } else {
                    (reflect(x, dx, w), reflect(y, dy, h))
                };
                *a = (sy * w + sx) * 3;
            }
            for c in 0..3 {
                let mut acc = 0f32;
                for (k, &a) in at.iter().enumerate() {
                    acc += f32::from(src[a + c]) * if k == 4 { centre } else { side };
                }
                out[(y * w + x) * 3 + c] = acc.round_ties_even().clamp(0.0, 255.0) as u8;
            }
        }
    }
}

/// ALBEF's sharpness: `degenerate + factor * (img - degenerate)` on the
/// interior (the one-pixel border is kept), with `degenerate` the smoothed
/// image; factor 0 is the smoothed image, 1 the image. Truncated to bytes
/// after clamping to [0, 255], where ALBEF's unclamped NumPy cast wraps
/// values out of range around (an overshoot of 255 became dark); Pillow's
/// `ImageEnhance.Sharpness`, which ALBEF means to reproduce, clamps.
pub fn sharpness(img: &RgbImage, factor: f64) -> RgbImage {
    let (w, h) = (img.width(), img.height());
    let mut out = Vec::new();
    sharpness_into(img, (w as usize, h as usize), factor, &mut out);
    RgbImage::from_raw(w, h, out).expect("sized buffer")
}

/// [`sharpness`] of `w` x `h` RGB bytes into `out`.
pub fn sharpness_into(src: &[u8], (w, h): (usize, usize), factor: f64, out: &mut Vec<u8>) {
    if factor == 1.0 {
        out.clear();
        out.extend_from_slice(src);
        return;
    }
    // The smoothed image; then, unless the factor is 0, the border from
    // the image and the interior blended.
    smoothed(src, (w, h), out);
    if factor == 0.0 {
        return;
    }
    let f = factor as f32;
    for y in 0..h {
        let row = y * w * 3..(y + 1) * w * 3;
        let (s, o) = (&src[row.clone()], &mut out[row]);
        if y == 0 || y + 1 >= h {
            o.copy_from_slice(s);
            continue;
        }
        o[..3].copy_from_slice(&s[..3]);
        let last = (w - 1) * 3;
        if w > 1 {
            o[last..].copy_from_slice(&s[last..]);
        }
        for i in 3..last {
            let d = f32::from(o[i]);
            let v = f32::from(s[i]);
            o[i] = (d + f * (v - d)).clamp(0.0, 255.0) as u8;
        }
    }
}
