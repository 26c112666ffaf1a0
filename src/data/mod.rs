//! Datasets and the batch loader.
//!
//! A [`Dataset`] is a list of image-caption pairs with image ids. The
//! [`Loader`] prepares batches on worker threads (decode or render, resize,
//! normalise, tokenise) ahead of the training step, in an order fixed by the
//! seed and the epoch, so a resumed run sees the same batches.

pub mod annotations;
pub mod loader;
pub mod synthetic;

use std::path::PathBuf;
use vlmatch_core::Result;

/// Where a pair's image comes from.
#[derive(Debug, Clone)]
pub enum ImageRef {
    /// A built-in scene, rendered on demand.
    Scene(synthetic::Scene),
    /// A file to decode (JPEG or PNG), and where it was named.
    File { path: PathBuf, origin: String },
}

/// One image-caption pair.
#[derive(Debug, Clone)]
pub struct Pair {
    pub image: usize,
    pub caption: String,
}

/// A list of pairs over a list of images; pairs of one image share its id.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub name: String,
    pub images: Vec<ImageRef>,
    pub image_ids: Vec<i64>,
    pub pairs: Vec<Pair>,
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.pairs.len()
    }
    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }

    /// Image `i` as `size` x `size` RGB bytes, row-major (rendered or decoded).
    pub fn load_rgb(&self, i: usize, size: usize) -> Result<Vec<u8>> {
        match &self.images[i] {
            ImageRef::Scene(scene) => Ok(scene.render(size)),
            ImageRef::File { path, origin } => loader::decode_resized(path, origin, size),
        }
    }

    /// Image `i` as normalised `[3, size, size]` f32, channel-major.
    pub fn load_image(
        &self,
        i: usize,
        size: usize,
        mean: [f32; 3],
        std: [f32; 3],
    ) -> Result<Vec<f32>> {
        let rgb = self.load_rgb(i, size)?;
        let plane = size * size;
        let mut out = vec![0f32; 3 * plane];
        for (p, px) in rgb.chunks_exact(3).enumerate() {
            for c in 0..3 {
                out[c * plane + p] = (px[c] as f32 / 255.0 - mean[c]) / std[c];
            }
        }
        Ok(out)
    }

    /// The built-in dataset: `scenes` scenes starting at scene `first`,
    /// `captions` captions each.
    pub fn synthetic(name: &str, seed: u64, first: u64, scenes: usize, captions: usize) -> Dataset {
        let mut images = Vec::with_capacity(scenes);
        let mut image_ids = Vec::with_capacity(scenes);
        let mut pairs = Vec::new();
        for s in 0..scenes {
            let index = first + s as u64;
            let scene = synthetic::Scene::generate(seed, index);
            for caption in scene.captions(crate::rng::mix(&[seed, index, 1]), captions) {
                pairs.push(Pair { image: s, caption });
            }
            images.push(ImageRef::Scene(scene));
            image_ids.push(index as i64);
        }
        Dataset {
            name: name.to_string(),
            images,
            image_ids,
            pairs,
        }
    }
}
