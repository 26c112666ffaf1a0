use crate::{Batch, Discriminator, Encoded, Encoder, EncoderInput, Error, Generator, Result};
use std::cell::OnceCell;
use std::rc::Rc;
use tch::{nn, Device, Kind, Tensor};

/// The ITC projections `g_v`, `g_t` and the learnable temperature `tau`
/// (`shared/method.md`, ITC). Parameters: `vision_proj.*`, `text_proj.*`,
/// `temp` under the path it is built on, as in ALBEF.
#[derive(Debug)]
pub struct ContrastiveHead {
    vision_proj: nn::Linear,
    text_proj: nn::Linear,
    temp: Tensor,
}

impl ContrastiveHead {
    pub const TEMP_INIT: f64 = 0.07;
    pub const TEMP_MIN: f64 = 0.001;
    pub const TEMP_MAX: f64 = 0.5;

    pub fn new(p: &nn::Path, image_width: i64, text_width: i64, embed_dim: i64) -> Self {
        let cfg = nn::LinearConfig {
            ws_init: nn::Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            },
            bs_init: Some(nn::Init::Const(0.0)),
            bias: true,
        };
        ContrastiveHead {
            vision_proj: nn::linear(p / "vision_proj", image_width, embed_dim, cfg),
            text_proj: nn::linear(p / "text_proj", text_width, embed_dim, cfg),
            temp: p.var("temp", &[], nn::Init::Const(Self::TEMP_INIT)),
        }
    }

    /// L2-normalised image embeddings `[B, E]` from `[CLS]` states.
    pub fn embed_image(&self, image: &Encoded) -> Tensor {
        normalize(&image.cls().to_kind(Kind::Float).apply(&self.vision_proj))
    }

    /// L2-normalised text embeddings `[B, E]` from `[CLS]` states.
    pub fn embed_text(&self, text: &Encoded) -> Tensor {
        normalize(&text.cls().to_kind(Kind::Float).apply(&self.text_proj))
    }

    /// The temperature, clamped in place to `[0.001, 0.5]` first (as ALBEF
    /// does before every forward).
    pub fn temperature(&self) -> Tensor {
        tch::no_grad(|| {
            let _ = self
                .temp
                .shallow_clone()
                .clamp_(Self::TEMP_MIN, Self::TEMP_MAX);
        });
        self.temp.shallow_clone()
    }
}

fn normalize(x: &Tensor) -> Tensor {
    x / x.norm_scalaropt_dim(2, [-1], true).clamp_min(1e-12)
}

/// The assembled vision-language model: the encoders and heads that
/// objectives share. Built by the registry from configuration.
pub struct VlModel {
    pub image: Rc<dyn Encoder>,
    pub text: Rc<dyn Encoder>,
    pub fusion: Rc<dyn Encoder>,
    pub contrastive: ContrastiveHead,
    pub discriminator: Rc<dyn Discriminator>,
    /// Present when an objective or sampler needs an MLM head.
    pub generator: Option<Rc<dyn Generator>>,
    pub device: Device,
}

impl VlModel {
    /// Fuse text states with image states through `E_m`.
    pub fn fuse(&self, text: &Encoded, image: &Encoded, train: bool) -> Result<Encoded> {
        self.fusion
            .forward_t(EncoderInput::Fused { text, image }, train)
    }

    /// [`VlModel::fuse`] for pair-level heads: only the fused `[CLS]`,
    /// `[B, 1, D]` (see [`Encoder::forward_cls`]).
    pub fn fuse_cls(&self, text: &Encoded, image: &Encoded, train: bool) -> Result<Encoded> {
        self.fusion
            .forward_cls(EncoderInput::Fused { text, image }, train)
    }
}

/// ITC similarities of a batch: `i2t` `[B, B]` is `s(I_i, T_j)` (already
/// divided by the temperature), `t2i` its transpose.
#[derive(Debug)]
pub struct Similarity {
    pub image_embeds: Tensor,
    pub text_embeds: Tensor,
    pub i2t: Tensor,
    pub t2i: Tensor,
}

/// One batch's forward cache: encoders run once per batch, on first use, and
/// every objective and sampler reads the same states.
pub struct Forward<'a> {
    pub model: &'a VlModel,
    pub batch: &'a Batch,
    pub train: bool,
    image: OnceCell<Encoded>,
    text: OnceCell<Encoded>,
    similarity: OnceCell<Similarity>,
}

fn cached<T>(cell: &OnceCell<T>, init: impl FnOnce() -> Result<T>) -> Result<&T> {
    if cell.get().is_none() {
        let value = init()?;
        let _ = cell.set(value);
    }
    Ok(cell.get().expect("just set"))
}

impl<'a> Forward<'a> {
    pub fn new(model: &'a VlModel, batch: &'a Batch, train: bool) -> Self {
        Forward {
            model,
            batch,
            train,
            image: OnceCell::new(),
            text: OnceCell::new(),
            similarity: OnceCell::new(),
        }
    }

    /// `E_v(images)`.
    pub fn image(&self) -> Result<&Encoded> {
        cached(&self.image, || {
            self.model
                .image
                .forward_t(EncoderInput::Image(&self.batch.images), self.train)
        })
    }

    /// `E_t(text)` of the batch's (uncorrupted) captions.
    pub fn text(&self) -> Result<&Encoded> {
        cached(&self.text, || {
            self.model
                .text
                .forward_t(EncoderInput::Text(&self.batch.text), self.train)
        })
    }

    /// ITC similarities, with gradient.
    pub fn similarity(&self) -> Result<&Similarity> {
        cached(&self.similarity, || {
            let image_embeds = self.model.contrastive.embed_image(self.image()?);
            let text_embeds = self.model.contrastive.embed_text(self.text()?);
            let temp = self.model.contrastive.temperature();
            let i2t = image_embeds.matmul(&text_embeds.tr()) / &temp;
            let t2i = i2t.tr();
            Ok(Similarity {
                image_embeds,
                text_embeds,
                i2t,
                t2i,
            })
        })
    }

    /// The fused `[CLS]` of the batch's positive pairs (for ITM).
    pub fn fuse_positive_cls(&self) -> Result<Encoded> {
        self.model.fuse_cls(self.text()?, self.image()?, self.train)
    }

    /// The generator, or an error naming who needed it.
    pub fn generator(&self, needed_by: &str) -> Result<&Rc<dyn Generator>> {
        self.model.generator.as_ref().ok_or_else(|| {
            Error::plugin(
                needed_by,
                "needs an MLM generator: set `model.generator.plugin` in the config",
            )
        })
    }
}
