//! The process group as objectives and samplers see it (data-parallel
//! training, `vlmatch-dist` implements it over libtorch's c10d).
//!
//! Conventions, which make `R` ranks holding `b` pairs each compute what one
//! process holding the global batch of `R * b` pairs computes:
//! - every rank's loss is its share of the global loss times `R`, and the
//!   trainer averages gradients over ranks; so a loss that is a mean over
//!   local rows is already right when every rank has the same row count,
//!   and a loss normalised by a count that differs between ranks (masked
//!   tokens, weighted pairs) goes through [`crate::Forward::global_mean`];
//! - [`Collective::all_gather_with_grad`] returns every rank's tensor and
//!   its backward sums the gradients that all ranks' losses send to a
//!   rank's part back into that rank's tensor, as
//!   `torch.distributed.nn.all_gather` does. Backward thereby runs a
//!   collective: every rank must build the same graph of gathers.

use crate::Result;
use tch::Tensor;

pub trait Collective {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Every rank's `t` (equal shapes) concatenated along dim 0, in rank
    /// order, with gradient (see the module).
    fn all_gather_with_grad(&self, t: &Tensor) -> Result<Tensor>;
    /// Every rank's `t` (equal shapes) concatenated along dim 0, in rank
    /// order, without gradient.
    fn all_gather(&self, t: &Tensor) -> Result<Tensor>;
    /// The element-wise sum of every rank's `t`, without gradient.
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor>;
}
