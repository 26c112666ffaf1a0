//! Geometric ops: the horizontal flip, and ALBEF's shear, translate and
//! rotate, which are OpenCV `warpAffine` calls. The warp is computed as
//! OpenCV computes it for 8-bit images with bilinear interpolation: the
//! forward matrix inverted, each output pixel's source position in fixed
//! point rounded to 1/32 of a pixel, integer bilinear weights in units of
//! 2^-15, and neighbours outside the image taking the fill colour
//! (`BORDER_CONSTANT`).

use image::RgbImage;

/// `img` mirrored left to right.
pub fn hflip(img: &RgbImage) -> RgbImage {
    image::imageops::flip_horizontal(img)
}

/// Sub-pixel steps per pixel of the source position (OpenCV's
/// `INTER_TAB_SIZE`), and the fixed-point bits of its computation
/// (`AB_BITS`).
const TAB_BITS: u32 = 5;
const AB_BITS: u32 = 10;

/// `img` warped by the forward affine map `m` (`[a, b, c, d, e, f]`: a
/// source pixel `(x, y)` lands at `(a x + b y + c, d x + e y + f)`), the
/// same size, uncovered pixels `fill`.
pub fn warp_affine(img: &RgbImage, m: [f64; 6], fill: [u8; 3]) -> RgbImage {
    let det = m[0] * m[4] - m[1] * m[3];
    let det = if det != 0.0 { 1.0 / det } else { 0.0 };
    let (i0, i1, i3, i4) = (m[4] * det, -m[1] * det, -m[3] * det, m[0] * det);
    let (i2, i5) = (-i0 * m[2] - i1 * m[5], -i3 * m[2] - i4 * m[5]);
    let scale = f64::from(1u32 << AB_BITS);
    let fixed = |v: f64| (v * scale).round_ties_even() as i64;
    let round = 1i64 << (AB_BITS - TAB_BITS - 1);
    let tab = 1i64 << TAB_BITS;
    let (w, h) = (img.width() as i64, img.height() as i64);
    let src = img.as_raw();
    let at = |x: i64, y: i64, c: usize| -> i64 {
        if x < 0 || y < 0 || x >= w || y >= h {
            i64::from(fill[c])
        } else {
            i64::from(src[((y * w + x) * 3) as usize + c])
        }
    };
    let mut out = vec![0u8; src.len()];
    for y in 0..h {
        let (x0, y0) = (
            fixed(i1 * y as f64 + i2) + round,
            fixed(i4 * y as f64 + i5) + round,
        );
        for x in 0..w {
            let sx = (x0 + fixed(i0 * x as f64)) >> (AB_BITS - TAB_BITS);
            let sy = (y0 + fixed(i3 * x as f64)) >> (AB_BITS - TAB_BITS);
            let (ix, fx) = (sx >> TAB_BITS, sx & (tab - 1));
            let (iy, fy) = (sy >> TAB_BITS, sy & (tab - 1));
            // Weights in units of 2^-15 that sum to exactly 2^15.
            let unit = (1i64 << 15) / (tab * tab);
            let wts = [
                (tab - fx) * (tab - fy) * unit,
                fx * (tab - fy) * unit,
                (tab - fx) * fy * unit,
                fx * fy * unit,
            ];
            for c in 0..3 {
                let v = at(ix, iy, c) * wts[0]
                    + at(ix + 1, iy, c) * wts[1]
                    + at(ix, iy + 1, c) * wts[2]
                    + at(ix + 1, iy + 1, c) * wts[3];
                out[((y * w + x) * 3) as usize + c] = ((v + (1 << 14)) >> 15).clamp(0, 255) as u8;
            }
        }
    }
    RgbImage::from_raw(w as u32, h as u32, out).expect("sized buffer")
}

/// A single-precision matrix entry, as ALBEF builds its shear and
/// translate matrices (`np.float32`).
fn f32_entry(v: f64) -> f64 {
    f64::from(v as f32)
}

/// ALBEF's `ShearX`: `x' = x + factor * y`, about the top-left corner.
pub fn shear_x(img: &RgbImage, factor: f64, fill: [u8; 3]) -> RgbImage {
    warp_affine(img, [1.0, f32_entry(factor), 0.0, 0.0, 1.0, 0.0], fill)
}

/// ALBEF's `ShearY`: `y' = y + factor * x`.
pub fn shear_y(img: &RgbImage, factor: f64, fill: [u8; 3]) -> RgbImage {
    warp_affine(img, [1.0, 0.0, 0.0, f32_entry(factor), 1.0, 0.0], fill)
}

/// ALBEF's `TranslateX`: the content moves `offset` pixels left
/// (`x' = x - offset`).
pub fn translate_x(img: &RgbImage, offset: f64, fill: [u8; 3]) -> RgbImage {
    warp_affine(img, [1.0, 0.0, f32_entry(-offset), 0.0, 1.0, 0.0], fill)
}

/// ALBEF's `TranslateY`: the content moves `offset` pixels up.
pub fn translate_y(img: &RgbImage, offset: f64, fill: [u8; 3]) -> RgbImage {
    warp_affine(img, [1.0, 0.0, 0.0, 0.0, 1.0, f32_entry(-offset)], fill)
}

/// ALBEF's `Rotate`: `degrees` counter-clockwise about `(W / 2, H / 2)`
/// (OpenCV's `getRotationMatrix2D`).
pub fn rotate(img: &RgbImage, degrees: f64, fill: [u8; 3]) -> RgbImage {
    let (cx, cy) = (f64::from(img.width()) / 2.0, f64::from(img.height()) / 2.0);
    let (sin, cos) = degrees.to_radians().sin_cos();
    warp_affine(
        img,
        [
            cos,
            sin,
            (1.0 - cos) * cx - sin * cy,
            -sin,
            cos,
            sin * cx + (1.0 - cos) * cy,
        ],
        fill,
    )
}
