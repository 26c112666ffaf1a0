use crate::momentum::{against, check_queue_width, Momentum, MomentumContrast};
use crate::positives::PairKeys;
use crate::{
    Batch, Collective, Discriminator, Encoded, Encoder, EncoderInput, Error, Generator, Result,
};
use std::cell::{Cell, OnceCell};
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
    /// The log of the scale of the similarities in-batch negatives are
    /// drawn from, when an objective other than ITC trains the projections
    /// ([`ContrastiveHead::draw_negatives_with_scale`]).
    negative_log_scale: OnceCell<Tensor>,
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
            negative_log_scale: OnceCell::new(),
        }
    }

    /// Draw in-batch negatives ([`Forward::negative_candidates`]) from the
    /// similarities `exp(log_scale) * x.y` instead of ITC's `x.y / temp`:
    /// an objective that replaces ITC (SigLIP) hands in its own learnt
    /// scale, so hard negatives follow the similarities it trains. Set at
    /// most once per model; `requester` names the objective in the error.
    pub fn draw_negatives_with_scale(&self, log_scale: &Tensor, requester: &str) -> Result<()> {
        self.negative_log_scale
            .set(log_scale.shallow_clone())
            .map_err(|_| {
                Error::Config(format!(
                    "config key `{requester}`: another objective already sets the scale of the \
                     similarities hard negatives are drawn from; enable only one of them"
                ))
            })
    }

    /// The scale set by [`ContrastiveHead::draw_negatives_with_scale`], as
    /// `exp(log_scale)` without gradient.
    pub fn negative_scale(&self) -> Option<Tensor> {
        self.negative_log_scale
            .get()
            .map(|s| tch::no_grad(|| s.exp()))
    }

    /// L2-normalised image embeddings `[B, E]` from `[CLS]` states.
    pub fn embed_image(&self, image: &Encoded) -> Tensor {
        let cls = image.cls().to_kind(Kind::Float);
        let out = cls.apply(&self.vision_proj);
        crate::flops::linear("itc", &cls, &self.vision_proj.ws, &out);
        normalize(&out)
    }

    /// L2-normalised text embeddings `[B, E]` from `[CLS]` states.
    pub fn embed_text(&self, text: &Encoded) -> Tensor {
        let cls = text.cls().to_kind(Kind::Float);
        let out = cls.apply(&self.text_proj);
        crate::flops::linear("itc", &cls, &self.text_proj.ws, &out);
        normalize(&out)
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
        if crate::flops::plain() {
            return Ok(self.fuse(text, image, train)?.position_zero());
        }
        self.fusion
            .forward_cls(EncoderInput::Fused { text, image }, train)
    }

    /// [`VlModel::fuse_cls`] with each distinct image once in `image` and
    /// `image_index` naming each pair's ([`Encoder::forward_cls_indexed`]).
    pub fn fuse_cls_indexed(
        &self,
        text: &Encoded,
        image: &Encoded,
        image_index: &Tensor,
        train: bool,
    ) -> Result<Encoded> {
        if crate::flops::plain() {
            return self.fuse_cls(text, &image.select(image_index), train);
        }
        self.fusion
            .forward_cls_indexed(text, image, image_index, train)
    }
}

/// ITC similarities of a batch's rows against the global batch (every
/// rank's pairs; the local batch when training on one process), already
/// divided by the temperature: `i2t` `[B, G]` is `s(I_i, T_j)` for local
/// image `i` and global text `j`, `t2i` `[B, G]` is `s(I_j, T_i)` for local
/// text `i` and global image `j`. On one process `G = B` and `t2i` is the
/// transpose of `i2t`.
#[derive(Debug)]
pub struct Similarity {
    pub image_embeds: Tensor,
    pub text_embeds: Tensor,
    pub i2t: Tensor,
    pub t2i: Tensor,
}

/// One batch's forward cache: encoders run once per batch, on first use, and
/// every objective and sampler reads the same states.
///
/// In data-parallel training ([`Forward::with_collective`]) it also holds
/// the global batch's keys, embeddings and states, gathered with gradient
/// ([`crate::Collective`]), and normalises losses over the global batch
/// ([`Forward::global_mean`]).
pub struct Forward<'a> {
    pub model: &'a VlModel,
    pub batch: &'a Batch,
    pub train: bool,
    collective: Option<Rc<dyn Collective>>,
    /// Whether in-batch negatives come from the global batch (BLIP) or
    /// only from this rank's part (ALBEF, cheaper).
    global_negatives: bool,
    /// Drawn once from libtorch's generator (which the trainer seeds per
    /// step, equally on every rank); keys [`Forward::random_keys`].
    draw_seed: i64,
    draws: Cell<i64>,
    image: OnceCell<Encoded>,
    text: OnceCell<Encoded>,
    embeds: OnceCell<(Tensor, Tensor)>,
    similarity: OnceCell<Similarity>,
    negative_similarity: OnceCell<(Tensor, Tensor)>,
    global_keys: OnceCell<PairKeys>,
    global_image: OnceCell<Encoded>,
    global_text: OnceCell<Encoded>,
    /// Momentum distillation ([`crate::momentum`]), when the run has it.
    momentum: Option<&'a Momentum>,
    momentum_image: OnceCell<Encoded>,
    momentum_text: OnceCell<Encoded>,
    momentum_contrast: OnceCell<MomentumContrast>,
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
        let draw_seed =
            Tensor::randint(i64::MAX, [1], (Kind::Int64, Device::Cpu)).int64_value(&[0]);
        Self::continuing(model, batch, train, (draw_seed, 0))
    }

    /// Where this forward's keyed draws stand: the step's seed and how many
    /// draws ([`Forward::random_keys`]) it made so far.
    pub fn draw_state(&self) -> (i64, i64) {
        (self.draw_seed, self.draws.get())
    }

    /// Set how many keyed draws this forward made (a view of it made
    /// draws on its behalf: [`Forward::continuing`]).
    pub fn set_draws(&self, draws: i64) {
        self.draws.set(draws);
    }

    /// A forward whose keyed draws continue `draw_state` (from
    /// [`Forward::draw_state`] of another forward over the same batch),
    /// drawing nothing from libtorch's generator: a view of a forward held
    /// elsewhere, as a dynamic plugin's objective gets, draws what that
    /// forward would.
    pub fn continuing(
        model: &'a VlModel,
        batch: &'a Batch,
        train: bool,
        (draw_seed, draws): (i64, i64),
    ) -> Self {
        Forward {
            model,
            batch,
            train,
            collective: None,
            global_negatives: true,
            draw_seed,
            draws: Cell::new(draws),
            image: OnceCell::new(),
            text: OnceCell::new(),
            embeds: OnceCell::new(),
            similarity: OnceCell::new(),
            negative_similarity: OnceCell::new(),
            global_keys: OnceCell::new(),
            global_image: OnceCell::new(),
            global_text: OnceCell::new(),
            momentum: None,
            momentum_image: OnceCell::new(),
            momentum_text: OnceCell::new(),
            momentum_contrast: OnceCell::new(),
        }
    }

    /// The same forward with momentum distillation: ITC and MLM read the
    /// momentum model's targets ([`Forward::momentum_contrast`]).
    pub fn with_momentum(mut self, momentum: &'a Momentum) -> Self {
        self.momentum = Some(momentum);
        self
    }

    /// The same forward with its ITC embeddings given (`[B, D]` each,
    /// L2-normalised, in batch order): GradCache's accumulated batch, whose
    /// embeddings were computed micro-batch by micro-batch. Encoders then
    /// run only if an objective asks for their states.
    pub fn with_embeds(self, image: Tensor, text: Tensor) -> Self {
        let _ = self.embeds.set((image, text));
        self
    }

    /// The momentum model and queues, when the run distils.
    pub fn momentum(&self) -> Option<&'a Momentum> {
        self.momentum
    }

    /// The same forward as one rank of a data-parallel group.
    pub fn with_collective(mut self, collective: Rc<dyn Collective>) -> Self {
        self.collective = Some(collective);
        self
    }

    /// In-batch negatives from this rank's own pairs only (ALBEF's choice:
    /// no gathered encoder states; ITC stays global).
    pub fn with_local_negatives(mut self) -> Self {
        self.global_negatives = false;
        self
    }

    /// Where in-batch negatives come from: local rows' ITC similarities
    /// `(i2t, t2i)` against the candidates and the candidates' positives
    /// (`[B, C]` each); `C` is the global batch, or the local one with
    /// [`Forward::with_local_negatives`] (and on one process).
    ///
    /// The similarities are ITC's ([`Forward::similarity`]), or, when an
    /// objective set a scale of its own
    /// ([`ContrastiveHead::draw_negatives_with_scale`]), `scale * x.y` of
    /// the same embeddings, without gradient.
    pub fn negative_candidates(&self) -> Result<(Tensor, Tensor, Tensor)> {
        let (i2t, t2i) = self.negative_similarity()?;
        let positives = self.positives()?;
        match (&self.collective, self.global_negatives) {
            (Some(c), false) => {
                let b = self.batch.len();
                let start = c.rank() as i64 * b;
                Ok((
                    i2t.narrow(1, start, b),
                    t2i.narrow(1, start, b),
                    positives.narrow(1, start, b),
                ))
            }
            _ => Ok((i2t.shallow_clone(), t2i.shallow_clone(), positives)),
        }
    }

    /// `(i2t, t2i)` of local rows against the global batch, as in
    /// [`Similarity`], for drawing negatives (see
    /// [`Forward::negative_candidates`]).
    fn negative_similarity(&self) -> Result<&(Tensor, Tensor)> {
        cached(&self.negative_similarity, || {
            let Some(scale) = self.model.contrastive.negative_scale() else {
                let sim = self.similarity()?;
                return Ok((sim.i2t.shallow_clone(), sim.t2i.shallow_clone()));
            };
            let (images, texts) = self.embeds()?;
            tch::no_grad(|| {
                let (all_images, all_texts) = match &self.collective {
                    None => (images.shallow_clone(), texts.shallow_clone()),
                    Some(c) => (c.all_gather(images)?, c.all_gather(texts)?),
                };
                Ok((
                    images.matmul(&all_texts.tr()) * &scale,
                    texts.matmul(&all_images.tr()) * &scale,
                ))
            })
        })
    }

    /// `[B]` i64: each local row's own pair among the candidates of
    /// [`Forward::negative_candidates`].
    pub fn own_candidates(&self) -> Tensor {
        let b = self.batch.len();
        let offset = match (&self.collective, self.global_negatives) {
            (Some(c), true) => c.rank() as i64 * b,
            _ => 0,
        };
        Tensor::arange(b, (Kind::Int64, self.batch.images.device())) + offset
    }

    /// The text states that in-batch negative indices point into (see
    /// [`Forward::negative_candidates`]).
    pub fn negative_texts(&self) -> Result<&Encoded> {
        if self.global_negatives {
            self.global_text()
        } else {
            self.text()
        }
    }

    /// The image states that in-batch negative indices point into.
    pub fn negative_images(&self) -> Result<&Encoded> {
        if self.global_negatives {
            self.global_image()
        } else {
            self.image()
        }
    }

    /// The process group, when training on several ranks.
    pub fn collective(&self) -> Option<&dyn Collective> {
        self.collective.as_deref()
    }

    /// Ranks holding a part of the global batch (1 on one process).
    pub fn world_size(&self) -> usize {
        self.collective.as_ref().map_or(1, |c| c.world_size())
    }

    /// `[B]` i64 keys for one random draw over the batch's rows: a function
    /// of each row's [`Batch::sample_keys`], the step's seed and how many
    /// draws this forward made before, so every call gives a fresh stream
    /// and a row draws the same whichever rank holds it. Use with
    /// [`crate::random::uniform`].
    pub fn random_keys(&self) -> Tensor {
        let salt = self.next_salt();
        crate::random::combine(
            &self.batch.sample_keys,
            &Tensor::from(salt).to_device(self.batch.sample_keys.device()),
        )
    }

    /// [`Forward::random_keys`] on the host (the same keys, and the same
    /// place in the sequence of draws), for samplers whose draws are used on
    /// the host (word swaps): no read-back from the device.
    pub fn random_keys_host(&self) -> Vec<i64> {
        let salt = self.next_salt();
        self.batch
            .sample_keys_host
            .iter()
            .map(|&k| crate::random::combine_host(k, salt))
            .collect()
    }

    fn next_salt(&self) -> i64 {
        let n = self.draws.get();
        self.draws.set(n + 1);
        crate::random::combine_u64(self.draw_seed as u64, n as u64)
    }

    /// `sum / count` over the global batch: `sum` is this rank's part of a
    /// loss's numerator (with gradient), `count` its part of the
    /// denominator (masked tokens, weighted pairs; no gradient). On `R`
    /// ranks this is `R * sum / (sum of every rank's count)`, so that the
    /// trainer's average over ranks is the global mean.
    pub fn global_mean(&self, sum: &Tensor, count: &Tensor) -> Result<Tensor> {
        let count = count.detach().to_kind(Kind::Float);
        match &self.collective {
            None => Ok(sum / count.clamp_min(1.0)),
            Some(c) => {
                let total = c.all_reduce_sum(&count)?;
                Ok(sum * c.world_size() as f64 / total.clamp_min(1.0))
            }
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

    /// The identity keys of the global batch ([`crate::positives`]).
    pub fn global_keys(&self) -> Result<&PairKeys> {
        cached(&self.global_keys, || {
            let keys = self.batch.keys();
            match &self.collective {
                None => Ok(keys),
                Some(c) => Ok(PairKeys {
                    image_ids: c.all_gather(&keys.image_ids)?,
                    image_keys: c.all_gather(&keys.image_keys)?,
                    text_keys: c.all_gather(&keys.text_keys)?,
                }),
            }
        })
    }

    /// `[B, G]` bool: which pairs of the global batch are positives of each
    /// local row (`[B, B]`, [`Batch::positives`], on one process).
    pub fn positives(&self) -> Result<Tensor> {
        Ok(self
            .batch
            .keys()
            .relation(self.global_keys()?, self.batch.positive_rule))
    }

    /// `E_v` states of the global batch `[G, N, D]`, with gradient to each
    /// rank's own part (this rank's [`Forward::image`] on one process).
    pub fn global_image(&self) -> Result<&Encoded> {
        match &self.collective {
            None => self.image(),
            Some(c) => cached(&self.global_image, || {
                gather_encoded(c.as_ref(), self.image()?)
            }),
        }
    }

    /// `E_t` states of the global batch `[G, L, D]` (every rank's padded to
    /// the longest), with gradient to each rank's own part.
    pub fn global_text(&self) -> Result<&Encoded> {
        match &self.collective {
            None => self.text(),
            Some(c) => cached(&self.global_text, || {
                gather_encoded(c.as_ref(), self.text()?)
            }),
        }
    }

    /// L2-normalised ITC embeddings of the local images and texts, with
    /// gradient.
    pub fn embeds(&self) -> Result<&(Tensor, Tensor)> {
        cached(&self.embeds, || {
            Ok((
                self.model.contrastive.embed_image(self.image()?),
                self.model.contrastive.embed_text(self.text()?),
            ))
        })
    }

    /// ITC similarities, with gradient.
    pub fn similarity(&self) -> Result<&Similarity> {
        cached(&self.similarity, || {
            let (image_embeds, text_embeds) = self.embeds()?;
            let (image_embeds, text_embeds) =
                (image_embeds.shallow_clone(), text_embeds.shallow_clone());
            let temp = self.model.contrastive.temperature();
            let (i2t, t2i) = match &self.collective {
                None => {
                    let i2t = image_embeds.matmul(&text_embeds.tr()) / &temp;
                    crate::flops::linear("itc", &image_embeds, &text_embeds, &i2t);
                    let t2i = i2t.tr();
                    (i2t, t2i)
                }
                Some(c) => {
                    let all_images = c.all_gather_with_grad(&image_embeds)?;
                    let all_texts = c.all_gather_with_grad(&text_embeds)?;
                    let i2t = image_embeds.matmul(&all_texts.tr()) / &temp;
                    let t2i = text_embeds.matmul(&all_images.tr()) / &temp;
                    crate::flops::linear("itc", &image_embeds, &all_texts, &i2t);
                    crate::flops::linear("itc", &text_embeds, &all_images, &t2i);
                    (i2t, t2i)
                }
            };
            Ok(Similarity {
                image_embeds,
                text_embeds,
                i2t,
                t2i,
            })
        })
    }

    /// The momentum model's `E_v(images)` (no gradient); `None` without
    /// momentum distillation.
    pub fn momentum_image(&self) -> Result<Option<&Encoded>> {
        let Some(m) = self.momentum else {
            return Ok(None);
        };
        cached(&self.momentum_image, || {
            tch::no_grad(|| {
                m.model
                    .image
                    .forward_t(EncoderInput::Image(&self.batch.images), self.train)
            })
        })
        .map(Some)
    }

    /// The momentum model's `E_t(text)` of the uncorrupted captions.
    pub fn momentum_text(&self) -> Result<Option<&Encoded>> {
        let Some(m) = self.momentum else {
            return Ok(None);
        };
        cached(&self.momentum_text, || {
            tch::no_grad(|| {
                m.model
                    .text
                    .forward_t(EncoderInput::Text(&self.batch.text), self.train)
            })
        })
        .map(Some)
    }

    /// ITC of the local rows against `[global momentum batch; queue]`
    /// ([`MomentumContrast`]); `None` without momentum distillation. The
    /// momentum features are gathered from every rank (no gradient), so
    /// `R` ranks see the columns one process of the global batch sees.
    pub fn momentum_contrast(&self) -> Result<Option<&MomentumContrast>> {
        let Some(m) = self.momentum else {
            return Ok(None);
        };
        cached(&self.momentum_contrast, || {
            let (image_embeds, text_embeds) = self.embeds()?;
            let temp = self.model.contrastive.temperature();
            let image_m = self.momentum_image()?.expect("momentum");
            let text_m = self.momentum_text()?.expect("momentum");
            let (img_m, txt_m) = tch::no_grad(|| {
                (
                    m.model.contrastive.embed_image(image_m),
                    m.model.contrastive.embed_text(text_m),
                )
            });
            let (img_g, txt_g) = match &self.collective {
                None => (img_m.shallow_clone(), txt_m.shallow_clone()),
                Some(c) => (c.all_gather(&img_m)?, c.all_gather(&txt_m)?),
            };
            let keys = self.global_keys()?.shallow_clone();
            let queue = m.queue();
            check_queue_width(&queue, &img_g)?;
            let image_cols = Tensor::cat(&[&img_g, &queue.image], 0);
            let text_cols = Tensor::cat(&[&txt_g, &queue.text], 0);
            let col_keys = PairKeys::cat(&[&keys, &queue.keys]);
            let positives = self
                .batch
                .keys()
                .relation(&col_keys, self.batch.positive_rule);
            let (i2t_m, t2i_m) = tch::no_grad(|| {
                (
                    against(&img_m, &text_cols, &temp),
                    against(&txt_m, &image_cols, &temp),
                )
            });
            Ok(MomentumContrast {
                i2t: against(image_embeds, &text_cols, &temp),
                t2i: against(text_embeds, &image_cols, &temp),
                i2t_m,
                t2i_m,
                positives,
                image_feats: img_g,
                text_feats: txt_g,
                keys,
            })
        })
        .map(Some)
    }

    /// Put this batch's momentum features into the queue, if an objective
    /// computed them (the trainer calls it after the objectives ran).
    pub fn enqueue_momentum(&self) {
        if let (Some(m), Some(c)) = (self.momentum, self.momentum_contrast.get()) {
            m.queue_mut()
                .enqueue(&c.image_feats, &c.text_feats, &c.keys);
        }
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

/// Every rank's states, padded along the sequence to the longest rank's
/// length (padding masked out), gathered with gradient.
fn gather_encoded(c: &dyn Collective, local: &Encoded) -> Result<Encoded> {
    let len = local.hidden.size()[1];
    let lens = c.all_gather(&Tensor::from_slice(&[len]).to_device(local.hidden.device()))?;
    let padded = local.pad_to(crate::readback::to_vec::<i64>(&lens.max())?[0]);
    Ok(Encoded {
        hidden: c.all_gather_with_grad(&padded.hidden)?,
        mask: c.all_gather(&padded.mask)?,
    })
}
