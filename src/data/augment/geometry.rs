//! Geometric ops: the horizontal flip, and ALBEF's shear, translate and
//! rotate, which are OpenCV `warpAffine` calls (bilinear, constant border).
//! The warp is computed as OpenCV 5.1 computes it for 8-bit images: the
//! forward matrix inverted in double precision, then in single precision
//! each output pixel's source position, its bilinear interpolation as two
//! horizontal blends and a vertical one, rounded half to even; neighbours
//! outside the image take the fill colour. (OpenCV 4's fixed-point path,
//! positions rounded to 1/32 pixel, differs from it by up to 2/255.)

use image::RgbImage;

/// `img` mirrored left to right.
pub fn hflip(img: &RgbImage) -> RgbImage {
    image::imageops::flip_horizontal(img)
}

/// `w` x `h` RGB bytes mirrored left to right, in place.
pub fn hflip_in_place(rgb: &mut [u8], w: usize) {
    for row in rgb.chunks_exact_mut(w * 3) {
        for x in 0..w / 2 {
            let (a, b) = (x * 3, (w - 1 - x) * 3);
            for c in 0..3 {
                row.swap(a + c, b + c);
            }
        }
    }
}

/// `img` warped by the forward affine map `m` (`[a, b, c, d, e, f]`: a
/// source pixel `(x, y)` lands at `(a x + b y + c, d x + e y + f)`), the
/// same size, uncovered pixels `fill`.
pub fn warp_affine(img: &RgbImage, m: [f64; 6], fill: [u8; 3]) -> RgbImage {
    let (w, h) = (img.width(), img.height());
    let mut out = Vec::new();
    warp_affine_into(img, (w as usize, h as usize), m, fill, &mut out);
    RgbImage::from_raw(w, h, out).expect("sized buffer")
}

/// [`warp_affine`] of `w` x `h` RGB bytes into `out`: compiled a second
/// time for AVX2 (and so SSE4.1's rounding instructions, not calls to the
/// C library's `floorf` and `rintf`), used where the CPU has it; the same
/// IEEE operations either way.
pub fn warp_affine_into(
    src: &[u8],
    size: (usize, usize),
    m: [f64; 6],
    fill: [u8; 3],
    out: &mut Vec<u8>,
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2.
        return unsafe { warp_avx2(src, size, m, fill, out) };
    }
    warp(src, size, m, fill, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn warp_avx2(src: &[u8], size: (usize, usize), m: [f64; 6], fill: [u8; 3], out: &mut Vec<u8>) {
    warp(src, size, m, fill, out)
}

#[inline(always)]
fn warp(src: &[u8], (w, h): (usize, usize), m: [f64; 6], fill: [u8; 3], out: &mut Vec<u8>) {
    let det = m[0] * m[4] - m[1] * m[3];
    let det = if det != 0.0 { 1.0 / det } else { 0.0 };
    let (i0, i1, i3, i4) = (m[4] * det, -m[1] * det, -m[3] * det, m[0] * det);
    let (i2, i5) = (-i0 * m[2] - i1 * m[5], -i3 * m[2] - i4 * m[5]);
    let [i0, i1, i2, i3, i4, i5] = [i0, i1, i2, i3, i4, i5].map(|v| v as f32);
    if [i0, i1, i3, i4] == [1.0, 0.0, 0.0, 1.0] && i2.fract() == 0.0 && i5.fract() == 0.0 {
        // A whole-pixel translation (ALBEF's translate at any magnitude):
        // every blend weight is 0, so each pixel is its source pixel, or
        // the fill outside the image.
        return shifted(src, (w, h), (i2, i5), fill, out);
    }
    let (w, h) = (w as i64, h as i64);
    let at = |x: i64, y: i64, c: usize| -> f32 {
        if x < 0 || y < 0 || x >= w || y >= h {
            f32::from(fill[c])
        } else {
            f32::from(src[((y * w + x) * 3) as usize + c])
        }
    };
    out.clear();
    out.resize(src.len(), 0);
    let stride = (w * 3) as usize;
    for (y, row) in out.chunks_exact_mut(stride.max(1)).enumerate() {
        let y = y as i64;
        let (row_x, row_y) = (i1 * y as f32 + i2, i4 * y as f32 + i5);
        for (x, px) in row.chunks_exact_mut(3).enumerate() {
            let sx = i0 * x as f32 + row_x;
            let sy = i3 * x as f32 + row_y;
            let (fx0, fy0) = (sx.floor(), sy.floor());
            let (ax, ay) = (sx - fx0, sy - fy0);
            let (ix, iy) = (fx0 as i64, fy0 as i64);
            let inside = ix >= 0 && iy >= 0 && ix + 1 < w && iy + 1 < h;
            // The four neighbours' channels: two 6-byte runs inside the
            // image, else pixel by pixel with the fill outside.
            let (mut top, mut bottom) = ([0f32; 6], [0f32; 6]);
            if inside {
                let i = ((iy * w + ix) * 3) as usize;
                let (a, b) = (&src[i..i + 6], &src[i + stride..i + stride + 6]);
                for k in 0..6 {
                    top[k] = f32::from(a[k]);
                    bottom[k] = f32::from(b[k]);
                }
            } else {
                for c in 0..3 {
                    top[c] = at(ix, iy, c);
                    top[c + 3] = at(ix + 1, iy, c);
                    bottom[c] = at(ix, iy + 1, c);
                    bottom[c + 3] = at(ix + 1, iy + 1, c);
                }
            }
            for c in 0..3 {
                let (p00, p01, p10, p11) = (top[c], top[c + 3], bottom[c], bottom[c + 3]);
                let t = p00 + ax * (p01 - p00);
                let b = p10 + ax * (p11 - p10);
                let v = t + ay * (b - t);
                px[c] = v.round_ties_even().clamp(0.0, 255.0) as u8;
            }
        }
    }
}

/// `w` x `h` RGB bytes moved by whole pixels: output `(x, y)` is source
/// `(x + dx, y + dy)`, or `fill` where that is outside.
fn shifted(
    src: &[u8],
    (w, h): (usize, usize),
    (dx, dy): (f32, f32),
    fill: [u8; 3],
    out: &mut Vec<u8>,
) {
    out.clear();
    out.resize(src.len(), 0);
    // Offsets beyond the image only fill; clamped so the casts are exact.
    let limit = (w.max(h) + 1) as f32;
    let (dx, dy) = (
        dx.clamp(-limit, limit) as i64,
        dy.clamp(-limit, limit) as i64,
    );
    let (wi, hi) = (w as i64, h as i64);
    // The output columns whose source column is inside.
    let (x0, x1) = ((-dx).clamp(0, wi), (wi - dx).clamp(0, wi));
    for (y, row) in out.chunks_exact_mut(w * 3).enumerate() {
        let sy = y as i64 + dy;
        for px in row.chunks_exact_mut(3) {
            px.copy_from_slice(&fill);
        }
        if sy < 0 || sy >= hi || x0 >= x1 {
            continue;
        }
        let from = ((sy * wi + x0 + dx) * 3) as usize;
        let n = ((x1 - x0) * 3) as usize;
        row[(x0 * 3) as usize..(x0 * 3) as usize + n].copy_from_slice(&src[from..from + n]);
    }
}

/// A single-precision matrix entry, as ALBEF builds its shear and
/// translate matrices (`np.float32`).
fn f32_entry(v: f64) -> f64 {
    f64::from(v as f32)
}

/// ALBEF's `ShearX`: `x' = x + factor * y`, about the top-left corner.
pub fn shear_x(img: &RgbImage, factor: f64, fill: [u8; 3]) -> RgbImage {
    warp_affine(img, shear_x_matrix(factor), fill)
}

/// ALBEF's `ShearY`: `y' = y + factor * x`.
pub fn shear_y(img: &RgbImage, factor: f64, fill: [u8; 3]) -> RgbImage {
    warp_affine(img, shear_y_matrix(factor), fill)
}

/// ALBEF's `TranslateX`: the content moves `offset` pixels left
/// (`x' = x - offset`).
pub fn translate_x(img: &RgbImage, offset: f64, fill: [u8; 3]) -> RgbImage {
    warp_affine(img, translate_x_matrix(offset), fill)
}

/// ALBEF's `TranslateY`: the content moves `offset` pixels up.
pub fn translate_y(img: &RgbImage, offset: f64, fill: [u8; 3]) -> RgbImage {
    warp_affine(img, translate_y_matrix(offset), fill)
}

/// ALBEF's `Rotate`: `degrees` counter-clockwise about `(W / 2, H / 2)`
/// (OpenCV's `getRotationMatrix2D`).
pub fn rotate(img: &RgbImage, degrees: f64, fill: [u8; 3]) -> RgbImage {
    let size = (img.width() as usize, img.height() as usize);
    warp_affine(img, rotate_matrix(degrees, size), fill)
}

/// The forward matrix of [`shear_x`].
pub fn shear_x_matrix(factor: f64) -> [f64; 6] {
    [1.0, f32_entry(factor), 0.0, 0.0, 1.0, 0.0]
}

/// The forward matrix of [`shear_y`].
pub fn shear_y_matrix(factor: f64) -> [f64; 6] {
    [1.0, 0.0, 0.0, f32_entry(factor), 1.0, 0.0]
}

/// The forward matrix of [`translate_x`].
pub fn translate_x_matrix(offset: f64) -> [f64; 6] {
    [1.0, 0.0, f32_entry(-offset), 0.0, 1.0, 0.0]
}

/// The forward matrix of [`translate_y`].
pub fn translate_y_matrix(offset: f64) -> [f64; 6] {
    [1.0, 0.0, 0.0, 0.0, 1.0, f32_entry(-offset)]
}

/// The forward matrix of [`rotate`] on a `w` x `h` image.
pub fn rotate_matrix(degrees: f64, (w, h): (usize, usize)) -> [f64; 6] {
    let (cx, cy) = (w as f64 / 2.0, h as f64 / 2.0);
    let (sin, cos) = degrees.to_radians().sin_cos();
    [
        cos,
        sin,
        (1.0 - cos) * cx - sin * cy,
        -sin,
        cos,
        sin * cx + (1.0 - cos) * cy,
    ]
}
