//! Datasets and the batch loader.
//!
//! A [`Dataset`] is a list of image-caption pairs with image ids. The
//! [`Loader`](loader::Loader) prepares batches on worker threads (decode or
//! render, resize, normalise, tokenise) ahead of the training step, in an
//! order fixed by the seed and the epoch, so a resumed run sees the same
//! batches. WebDataset tar shards are streamed instead ([`webdataset`]).

pub mod annotations;
pub mod augment;
pub mod finegrained;
pub mod image;
pub mod index;
pub mod loader;
pub mod samples;
pub mod shards;
pub mod stall;
pub mod synthetic;
pub mod tar;
pub mod webdataset;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use vlmatch_core::{Error, Result};
pub use vlmatch_registry::config::OnError;

/// An encoded image held in memory (a tar member).
#[derive(Clone)]
pub struct ImageBytes(pub Arc<Vec<u8>>);

impl std::fmt::Debug for ImageBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "<{} bytes>", self.0.len())
    }
}

/// Where a pair's image comes from.
#[derive(Debug, Clone)]
pub enum ImageRef {
    /// A built-in scene, rendered on demand.
    Scene(synthetic::Scene),
    /// An image to decode (JPEG or PNG), and where it was named. `bytes`
    /// holds the encoded image when it came from a tar shard; `path` is then
    /// `SHARD/MEMBER`, for messages only.
    File {
        path: PathBuf,
        origin: String,
        bytes: Option<ImageBytes>,
    },
}

/// One image-caption pair.
#[derive(Debug, Clone)]
pub struct Pair {
    pub image: usize,
    pub caption: String,
}

/// Pairs and images kept out of memory and read on demand: an annotation
/// file through its index (`index::AnnotationIndex`).
pub trait PairStore: Send + Sync + std::fmt::Debug {
    /// Pairs (captions).
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Distinct images.
    fn image_count(&self) -> usize;
    /// The image of pair `pair`.
    fn pair_image(&self, pair: usize) -> usize;
    /// Image `image`'s id.
    fn image_id(&self, image: usize) -> i64;
    /// Pair `pair`'s caption.
    fn caption(&self, pair: usize) -> Result<String>;
    /// Where image `image` comes from.
    fn image(&self, image: usize) -> Result<ImageRef>;
}

/// A list of pairs over a list of images; pairs of one image share its id.
///
/// Held in memory (`images`, `image_ids`, `pairs`), or, with `store` set,
/// read from a [`PairStore`] on demand, those three then empty: code that
/// may get either reads through the methods ([`Dataset::len`],
/// [`Dataset::pair_image`], [`Dataset::caption`], [`Dataset::image_id`],
/// [`Dataset::image_ref`]); only the training loader gets a stored one.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub name: String,
    pub images: Vec<ImageRef>,
    pub image_ids: Vec<i64>,
    pub pairs: Vec<Pair>,
    /// Entries dropped while loading (`data.on_error = "skip"`).
    pub skipped: usize,
    /// Where pairs and images are read instead of the three lists.
    pub store: Option<Arc<dyn PairStore>>,
}

impl Dataset {
    /// `images`, `image_ids` and `pairs` held in memory.
    pub fn in_memory(
        name: String,
        images: Vec<ImageRef>,
        image_ids: Vec<i64>,
        pairs: Vec<Pair>,
        skipped: usize,
    ) -> Dataset {
        Dataset {
            name,
            images,
            image_ids,
            pairs,
            skipped,
            store: None,
        }
    }

    /// Pairs and images read from `store` on demand.
    pub fn stored(name: String, store: Arc<dyn PairStore>, skipped: usize) -> Dataset {
        Dataset {
            store: Some(store),
            ..Dataset::in_memory(name, Vec::new(), Vec::new(), Vec::new(), skipped)
        }
    }

    pub fn len(&self) -> usize {
        self.store.as_ref().map_or(self.pairs.len(), |s| s.len())
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Distinct images.
    pub fn image_count(&self) -> usize {
        self.store
            .as_ref()
            .map_or(self.images.len(), |s| s.image_count())
    }

    /// The image of pair `i`.
    pub fn pair_image(&self, i: usize) -> usize {
        match &self.store {
            Some(s) => s.pair_image(i),
            None => self.pairs[i].image,
        }
    }

    /// Pair `i`'s caption (read from the store, or borrowed).
    pub fn caption(&self, i: usize) -> Result<std::borrow::Cow<'_, str>> {
        match &self.store {
            Some(s) => s.caption(i).map(std::borrow::Cow::Owned),
            None => Ok(std::borrow::Cow::Borrowed(&self.pairs[i].caption)),
        }
    }

    /// Image `image`'s id.
    pub fn image_id(&self, image: usize) -> i64 {
        match &self.store {
            Some(s) => s.image_id(image),
            None => self.image_ids[image],
        }
    }

    /// Where image `image` comes from (read from the store, or borrowed).
    pub fn image_ref(&self, image: usize) -> Result<std::borrow::Cow<'_, ImageRef>> {
        match &self.store {
            Some(s) => s.image(image).map(std::borrow::Cow::Owned),
            None => Ok(std::borrow::Cow::Borrowed(&self.images[image])),
        }
    }

    /// Image `i` as `size` x `size` RGB bytes, row-major (rendered or decoded).
    pub fn load_rgb(&self, i: usize, size: usize) -> Result<Vec<u8>> {
        match &*self.image_ref(i)? {
            ImageRef::Scene(scene) => Ok(scene.render(size)),
            ImageRef::File {
                path,
                origin,
                bytes: None,
            } => loader::decode_resized(path, origin, size),
            ImageRef::File {
                path,
                origin,
                bytes: Some(bytes),
            } => loader::decode_bytes_resized(&bytes.0, path, origin, size),
        }
    }

    /// Tells `reading` that image `i` is read now (its file, or its shard
    /// member); a built-in scene is only progress.
    pub fn report_image(&self, i: usize, reading: &stall::Reading) {
        match self.image_ref(i).as_deref() {
            Ok(ImageRef::File { path, .. }) => reading.path(path),
            // A stored image that cannot be read fails when it is loaded.
            Ok(ImageRef::Scene(_)) | Err(_) => reading.progressed(),
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
        Ok(normalize(&self.load_rgb(i, size)?, mean, std))
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
        Dataset::in_memory(name.to_string(), images, image_ids, pairs, 0)
    }
}

/// Whether `--data`-style input names tar shards rather than an annotation
/// file: it ends in `.tar` or holds a brace expression.
pub fn is_shard_pattern(path_or_pattern: &str) -> bool {
    path_or_pattern.ends_with(".tar") || path_or_pattern.contains('{')
}

/// An evaluation dataset from an annotation file
/// ([`annotations::load_split`]) or from tar shards
/// ([`webdataset::load_shards`], when [`is_shard_pattern`]); errors are fatal.
pub fn load_any(
    path_or_pattern: &str,
    image_root: Option<&Path>,
    split: Option<&str>,
) -> Result<Dataset> {
    load_any_with(path_or_pattern, image_root, split, OnError::Fail)
}

/// [`load_any`] with a `data.on_error` policy.
pub fn load_any_with(
    path_or_pattern: &str,
    image_root: Option<&Path>,
    split: Option<&str>,
    on_error: OnError,
) -> Result<Dataset> {
    let limits = (Default::default(), Default::default());
    load_any_limited(path_or_pattern, image_root, split, on_error, limits)
}

/// [`load_any_with`] under the `[data]` section's limits on what is read
/// (tar member sizes, annotation lines, captions per image) and its
/// `on_error`.
pub fn load_any_within(
    path_or_pattern: &str,
    image_root: Option<&Path>,
    split: Option<&str>,
    data: &vlmatch_registry::config::DataConfig,
) -> Result<Dataset> {
    let limits = (
        webdataset::MemberLimits::from_config(data),
        annotations::AnnotationLimits::from_config(data),
    );
    load_any_limited(path_or_pattern, image_root, split, data.on_error, limits)
}

fn load_any_limited(
    path_or_pattern: &str,
    image_root: Option<&Path>,
    split: Option<&str>,
    on_error: OnError,
    (members, annotations): (webdataset::MemberLimits, annotations::AnnotationLimits),
) -> Result<Dataset> {
    if is_shard_pattern(path_or_pattern) {
        if let Some(split) = split {
            return Err(vlmatch_core::Error::Config(format!(
                "split `{split}` given for tar shards `{path_or_pattern}`; splits select \
                 images of Karpathy-format annotation files"
            )));
        }
        webdataset::load_shards_with(path_or_pattern, on_error, members)
    } else {
        let path = Path::new(path_or_pattern);
        annotations::load_checked_within(path, image_root, split, on_error, annotations)
    }
}

/// `e` with the hint that `data.on_error = "skip"` would have handled it
/// The file an entry's image path `rel` names under `root`
/// (`data.image_root`, or the annotation file's folder): `root/rel`, with
/// `.` and `..` resolved within `rel`. A path that leads out of the root
/// (`../secret.png`, `a/../../b`) is refused; an absolute one only where
/// the root is `/`, which allows any. Symbolic links under the root are
/// followed: the user placed them. `Err` says why, for the caller's error
/// naming the file and line.
pub fn resolve_under(root: &Path, rel: &str) -> std::result::Result<PathBuf, String> {
    use std::path::Component;
    let p = Path::new(rel);
    let escape = || {
        format!(
            "image path `{rel}` leads outside the image root `{}`; image paths must stay under \
             data.image_root (set it to \"/\" to allow absolute paths)",
            root.display()
        )
    };
    if p.has_root() {
        if root.components().eq([Component::RootDir]) {
            return Ok(p.to_path_buf());
        }
        return Err(escape());
    }
    let mut parts: Vec<&std::ffi::OsStr> = Vec::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::Normal(x) => parts.push(x),
            Component::ParentDir => {
                if parts.pop().is_none() {
                    return Err(escape());
                }
            }
            Component::RootDir | Component::Prefix(_) => return Err(escape()),
        }
    }
    Ok(root.join(parts.iter().collect::<PathBuf>()))
}

/// (`what`: "drops such entries", "replaces such pairs", ...).
pub(crate) fn with_skip_hint(e: Error, what: &str) -> Error {
    match e {
        Error::Data {
            path,
            line,
            message,
        } => Error::Data {
            path,
            line,
            message: format!("{message} (data.on_error = \"skip\" {what})"),
        },
        other => other,
    }
}

/// Row-major RGB bytes to channel-major `[3, H, W]` f32, scaled to [0, 1]
/// and normalised with `mean` and `std` per channel.
pub fn normalize(rgb: &[u8], mean: [f32; 3], std: [f32; 3]) -> Vec<f32> {
    let plane = rgb.len() / 3;
    let mut out = vec![0f32; rgb.len()];
    for (p, px) in rgb.chunks_exact(3).enumerate() {
        for c in 0..3 {
            out[c * plane + p] = (px[c] as f32 / 255.0 - mean[c]) / std[c];
        }
    }
    out
}

#[cfg(test)]
mod resolve_tests {
    use super::resolve_under;
    use proptest::prelude::*;
    use std::path::{Component, Path};

    proptest! {
        /// Whatever an annotation says, the resolved path stays lexically
        /// under the root: it starts with the root and nothing after it
        /// climbs (`..`); and a path without `..` resolves to root/path.
        #[test]
        fn image_paths_never_resolve_outside_their_root(
            root in prop::sample::select(vec!["images", "data/coco", "/srv/images", "", "."]),
            parts in prop::collection::vec(
                prop::sample::select(vec!["a", "b.png", "..", ".", "", "/", "c d"]), 0..8),
        ) {
            let rel = parts.join("/");
            let root = Path::new(root);
            if let Ok(file) = resolve_under(root, &rel) {
                let rest = file.strip_prefix(root).expect("under the root");
                prop_assert!(!rest.components().any(|c| c == Component::ParentDir), "{}", file.display());
                prop_assert!(!rest.has_root(), "{}", file.display());
            }
            if !rel.split('/').any(|p| p == "..") && !rel.starts_with('/') {
                prop_assert!(resolve_under(root, &rel).is_ok());
            }
        }
    }

    #[test]
    fn escapes_are_refused_and_the_slash_root_allows_absolute_paths() {
        let images = Path::new("images");
        assert!(resolve_under(images, "../secret/s.png")
            .unwrap_err()
            .contains("leads outside"));
        assert!(resolve_under(images, "a/../../s.png").is_err());
        assert!(resolve_under(images, "/etc/passwd").is_err());
        assert_eq!(
            resolve_under(images, "a/./b/../c.png").unwrap(),
            Path::new("images/a/c.png")
        );
        assert_eq!(
            resolve_under(Path::new("/"), "/etc/x.png").unwrap(),
            Path::new("/etc/x.png")
        );
    }
}
